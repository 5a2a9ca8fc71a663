"""Postgres connections are killed under load: calls in flight fail with a StorageError, the tracker
reconnects by itself, nothing acknowledged is lost, and the sweeper and gossip tasks live on."""

from __future__ import annotations

import asyncio
import itertools
import random
from pathlib import Path

import asyncpg
import asyncpg.transaction
import pytest
from gossip_helpers import KEY, LocalNet
from sqlalchemy.engine import make_url
from stored import stored_outcomes

from tracker import AvailabilityTracker, TrackerConfig
from tracker.errors import CommitOutcomeUnknown, StorageError
from tracker.gossip.agent import GossipAgent
from tracker.gossip.config import GossipConfig


async def _kill_connections(url: str) -> int:
    admin = await asyncpg.connect(
        make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    )
    try:
        rows = await admin.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return len(rows)
    finally:
        await admin.close()


@pytest.mark.parametrize("engine_name", ["postgresql"], indirect=True)
async def test_killed_connections_cost_only_the_calls_in_flight(db_url: str, tmp_path: Path) -> None:
    config = TrackerConfig(database_url=db_url, run_sweeper=True, update_interval=0.2, sweep_jitter=0.0)
    tracker = await AvailabilityTracker.open(config)
    other = await AvailabilityTracker.open(
        TrackerConfig(database_url=f"sqlite+aiosqlite:///{tmp_path / 'o.db'}")
    )
    net = LocalNet()
    gossip_cfg = GossipConfig(keys=(KEY,), interval_s=0.2, jitter=0.0, backoff_max_s=0.4)
    agent = GossipAgent(
        tracker, GossipConfig(**{**gossip_cfg.__dict__, "neighbors": ("http://other",)}), transport=net
    )
    net.agents["http://other"] = GossipAgent(other, gossip_cfg, transport=net)
    gossiping = asyncio.create_task(agent.run())
    sequence = itertools.count()
    acked: set[int] = set()
    errors: list[BaseException] = []
    stop = asyncio.Event()

    async def writer() -> None:
        while not stop.is_set():
            seq = next(sequence)
            try:
                await tracker.record_upload_success("outage-peer", bytes=seq)
            except StorageError as error:
                errors.append(error)
                continue
            acked.add(seq)

    async def reader() -> None:
        while not stop.is_set():
            try:
                await tracker.select_best_peers("nothing", 3)
            except StorageError as error:
                errors.append(error)

    try:
        tasks = [asyncio.create_task(writer()) for _ in range(8)] + [asyncio.create_task(reader())]
        rng = random.Random(3)
        killed = 0
        for _ in range(4):
            await asyncio.sleep(rng.uniform(0.3, 0.6))
            killed += await _kill_connections(db_url)
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*tasks)
        assert killed > 0
        sweeps_before, rounds_before = tracker.sweeper_state.passes, agent.stats.rounds
        # Working again, by itself: writes, reads, the sweeper and gossip all go on.
        await tracker.record_upload_success("outage-peer", bytes=10**9)
        acked.add(10**9)
        assert (await tracker.get_peer_metrics("outage-peer")) is not None
        # Each failed pass doubles the sweeper's wait, up to 10 intervals (2 s here): killed connections
        # can leave it backing off for longer than the outage lasted. It must resume within that bound.
        deadline = asyncio.get_running_loop().time() + 10 * config.update_interval + 1.0
        while not (
            tracker.sweeper_state.passes > sweeps_before
            and agent.stats.rounds > rounds_before + 1  # a whole round after the write above
            and await other.get_peer_metrics("outage-peer") is not None  # gossip carried it out
        ):
            assert asyncio.get_running_loop().time() < deadline, (
                f"not resumed: {tracker.sweeper_state}, {agent.stats.rounds - rounds_before} gossip rounds"
            )
            await asyncio.sleep(0.05)
        assert not gossiping.done()
        async with tracker.engine.connect() as conn:
            stored, served = await stored_outcomes(conn, "outage-peer", tracker.node_id)
        assert acked <= stored and served == len(stored)
        assert all(isinstance(e, StorageError) for e in errors)
        print(f"outage: {killed} connections killed, {len(errors)} calls failed, {len(acked)} acknowledged")
    finally:
        stop.set()
        gossiping.cancel()
        await asyncio.gather(gossiping, return_exceptions=True)
        await tracker.close()
        await other.close()


@pytest.mark.parametrize("engine_name", ["postgresql"], indirect=True)
async def test_a_commit_whose_answer_is_lost_fails_its_group_and_is_never_applied_twice(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server commits and the connection drops before it says so: re-running the group's requests
    one by one (as for any other failure of a shared transaction) stored every outcome twice."""
    tracker = await AvailabilityTracker.open(TrackerConfig(database_url=db_url))
    real_commit = asyncpg.transaction.Transaction.commit
    lose_next = [True]

    async def commit_then_lose_the_answer(self: asyncpg.transaction.Transaction) -> None:
        await real_commit(self)
        if lose_next[0]:
            lose_next[0] = False
            raise asyncpg.exceptions.ConnectionDoesNotExistError("connection lost after COMMIT was sent")

    monkeypatch.setattr(asyncpg.transaction.Transaction, "commit", commit_then_lose_the_answer)
    try:
        results = await asyncio.gather(
            *(tracker.record_upload_success("ambiguous") for _ in range(10)), return_exceptions=True
        )
        assert all(isinstance(r, CommitOutcomeUnknown) for r in results), results
        assert tracker.ingest_stats.isolated_retries == 0
        metrics = await tracker.get_peer_metrics("ambiguous")
        assert metrics is not None and metrics.chunks_served == 10  # committed once, as the server did
        await tracker.record_upload_success("ambiguous")  # the next connection works
        metrics = await tracker.get_peer_metrics("ambiguous")
        assert metrics is not None and metrics.chunks_served == 11
    finally:
        await tracker.close()

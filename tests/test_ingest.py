"""Group commit: concurrent writers share transactions, and no request's failure is another's."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

import asyncpg
import httpx
import pytest
from conftest import _dsn
from sqlalchemy.engine import make_url

from tracker import AvailabilityTracker, TrackerConfig
from tracker.errors import CommitOutcomeUnknown, TrackerClosed
from tracker.events import PeerOnline, UploadOutcome
from tracker.ingest import GroupCommitter
from tracker.queries import Timed
from tracker.service import create_app
from tracker.testing import ManualClock


async def test_concurrent_callers_share_transactions_and_every_event_lands(
    tracker: AvailabilityTracker,
) -> None:
    async def caller(k: int) -> None:
        for i in range(20):
            await tracker.record_upload_success(f"peer-{k % 7}", cid=f"c{i}")

    await asyncio.gather(*(caller(k) for k in range(100)))
    stats = tracker.ingest_stats
    assert stats.requests == 2000 and stats.events == 2000
    assert stats.transactions < stats.requests / 5, stats
    served = 0
    for k in range(7):
        metrics = await tracker.get_peer_metrics(f"peer-{k}")
        assert metrics is not None
        served += metrics.chunks_served
    assert served == 2000


async def test_close_commits_what_was_acknowledged_and_what_was_queued(config: TrackerConfig) -> None:
    tracker = await AvailabilityTracker.open(config)
    writers = [asyncio.create_task(tracker.record_upload_success("p")) for _ in range(300)]
    await asyncio.sleep(0)  # let every writer queue its request
    await tracker.close()
    await asyncio.gather(*writers)
    async with AvailabilityTracker(config) as reopened:
        metrics = await reopened.get_peer_metrics("p")
    assert metrics is not None and metrics.chunks_served == 300


def _timed(peer: str) -> list[Timed]:
    return [Timed(PeerOnline(peer), 1.0)]


async def test_a_failing_request_fails_alone_and_the_rest_of_its_group_commits() -> None:
    committed: list[list[str]] = []

    async def apply(events: Sequence[Timed]) -> None:
        await asyncio.sleep(0)  # a transaction takes a moment, so requests pile up behind it
        keys = [t.event.peer_id for t in events]
        if "poison" in keys:
            raise RuntimeError("constraint violated by poison")
        committed.append(keys)

    committer = GroupCommitter(apply, max_events=1000)
    results = await asyncio.gather(
        *(committer.submit(_timed(p)) for p in ["a", "b", "poison", "c", "d"]), return_exceptions=True
    )
    assert [type(r).__name__ for r in results] == [
        "NoneType",
        "NoneType",
        "RuntimeError",
        "NoneType",
        "NoneType",
    ]
    assert sorted(k for keys in committed for k in keys) == ["a", "b", "c", "d"]
    assert committer.stats.isolated_retries == 1


async def test_groups_never_exceed_the_event_limit() -> None:
    sizes: list[int] = []

    async def apply(events: Sequence[Timed]) -> None:
        await asyncio.sleep(0)
        sizes.append(len(events))

    committer = GroupCommitter(apply, max_events=10)
    await asyncio.gather(*(committer.submit(_timed(str(i)) * 3) for i in range(20)))
    assert sum(sizes) == 60 and max(sizes) <= 10


async def test_groups_never_exceed_the_rounds_of_one_peer() -> None:
    """50 requests of 1,000 heartbeats of one peer, each within the per-peer limit, made one
    transaction of 50,000 rounds for that peer (QA round 57): a group takes requests until the sum
    of their most events of one peer reaches ``max_rounds``."""
    groups: list[list[str]] = []

    async def apply(events: Sequence[Timed]) -> None:
        await asyncio.sleep(0)
        groups.append([t.event.peer_id for t in events])

    committer = GroupCommitter(apply, max_events=1_000, max_rounds=10)
    await asyncio.gather(
        *(committer.submit(_timed("hot") * 4, 4) for _ in range(6)),
        *(committer.submit(_timed(f"p{i}")) for i in range(12)),
    )
    assert sum(len(g) for g in groups) == 36
    assert max(g.count("hot") + sum(1 for p in g if p != "hot") for g in groups) <= 10
    assert max(g.count("hot") for g in groups) == 8  # two requests of 4 fit; a third would be 12


async def test_a_cancelled_caller_does_not_strand_the_others() -> None:
    release = asyncio.Event()

    async def apply(events: Sequence[Timed]) -> None:
        await release.wait()

    committer = GroupCommitter(apply, max_events=1000)
    first = asyncio.create_task(committer.submit(_timed("first")))
    await asyncio.sleep(0)
    others = [asyncio.create_task(committer.submit(_timed(f"o{i}"))) for i in range(5)]
    await asyncio.sleep(0)
    first.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.gather(*others)
    # The cancelled request was already in the transaction in flight: it commits, unacknowledged.
    assert committer.stats.requests == 6


async def test_writing_after_close_is_refused(config: TrackerConfig) -> None:
    from tracker import TrackerClosed

    tracker = await AvailabilityTracker.open(config)
    await tracker.close()
    with pytest.raises(TrackerClosed):
        await tracker.record_batch([UploadOutcome("p", True)])


async def test_close_returns_while_others_keep_writing_and_refuses_what_comes_after(
    config: TrackerConfig,
) -> None:
    """A drain that accepted new writes never ended while 16 tasks kept writing (found by QA)."""
    from tracker import TrackerClosed

    tracker = await AvailabilityTracker.open(config)
    acknowledged = [0]

    async def keep_writing(k: int) -> None:
        while True:
            try:
                await tracker.record_upload_success(f"p{k % 4}")
            except TrackerClosed:
                return
            acknowledged[0] += 1

    writers = [asyncio.create_task(keep_writing(k)) for k in range(16)]
    while acknowledged[0] < 50:  # everyone is writing
        await asyncio.sleep(0.001)
    await asyncio.wait_for(tracker.close(), timeout=30)
    await asyncio.wait_for(asyncio.gather(*writers), timeout=30)  # each got TrackerClosed
    async with AvailabilityTracker(config) as reopened:
        served = 0
        for k in range(4):
            metrics = await reopened.get_peer_metrics(f"p{k}")
            served += metrics.chunks_served if metrics is not None else 0
    assert served == acknowledged[0]  # everything acknowledged is there, nothing else


async def test_abandon_fails_the_transaction_in_flight_and_the_queue_and_drain_returns() -> None:
    """A forced shutdown: the group waiting on the database may have committed, the queued ones not."""
    started = asyncio.Event()

    async def blocked(_: Sequence[Timed]) -> None:
        started.set()
        await asyncio.Event().wait()  # a lock that is never released

    committer = GroupCommitter(blocked, max_events=1)
    in_flight = asyncio.create_task(committer.submit(_timed("p")))
    await started.wait()
    queued = asyncio.create_task(committer.submit(_timed("p")))
    await asyncio.sleep(0)
    draining = asyncio.create_task(committer.drain())
    await asyncio.sleep(0)
    committer.abandon()
    await asyncio.wait_for(draining, 1)
    with pytest.raises(CommitOutcomeUnknown):
        await in_flight
    with pytest.raises(TrackerClosed):
        await queued


async def test_the_oldest_waiting_write_is_measured_while_a_lock_holds_the_queue(
    config: TrackerConfig, clock: ManualClock
) -> None:
    """Held behind an operator's row lock, ingest stopped for 130 s and /metrics showed nothing: the
    latencies of finished requests say nothing until one finishes (QA round 19)."""
    async with AvailabilityTracker(replace(config, monotonic=clock.monotonic)) as tracker:
        app = httpx.AsyncClient(transport=httpx.ASGITransport(create_app(tracker)), base_url="http://t")
        await tracker.record_peer_online("p")
        assert tracker.ingest_oldest_wait_s() == 0.0
        async with _operator_holding_peer(tracker, "p"):
            first = asyncio.create_task(tracker.record_peer_online("p"))
            await asyncio.sleep(0.2)  # in flight, waiting for the lock
            clock.advance(40)
            second = asyncio.create_task(tracker.record_peer_online("other"))  # queued behind it
            await asyncio.sleep(0.05)
            clock.advance(5)
            assert tracker.ingest_oldest_wait_s() == pytest.approx(45)
            assert "tracker_ingest_oldest_wait_seconds 45.0" in (await app.get("/metrics")).text
            assert not first.done() and not second.done()
            # A caller that gives up (its deadline) leaves its events in the stuck transaction:
            # forgotten with its future, the gauge fell to 0 while the lock still held (QA round 23).
            first.cancel()
            second.cancel()
            await asyncio.sleep(0.01)
            assert tracker.ingest_oldest_wait_s() == pytest.approx(45)
        await asyncio.wait_for(asyncio.gather(first, second, return_exceptions=True), 30)
        for _ in range(300):  # the stuck transaction ends once the lock is gone
            if tracker.ingest_oldest_wait_s() == 0.0:
                break
            await asyncio.sleep(0.01)
        assert tracker.ingest_oldest_wait_s() == 0.0
        await app.aclose()


@contextlib.asynccontextmanager
async def _operator_holding_peer(tracker: AvailabilityTracker, peer: str) -> AsyncIterator[None]:
    """An operator's session that locks one peer's row (Postgres) or takes the write lock (SQLite)."""
    url = make_url(tracker.config.database_url)
    if url.get_backend_name() == "sqlite":
        held = sqlite3.connect(str(url.database), isolation_level=None)
        held.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            held.execute("ROLLBACK")
            held.close()
        return
    conn = await asyncpg.connect(_dsn(tracker.config.database_url))
    try:
        await conn.execute(f"BEGIN; SELECT 1 FROM peers WHERE peer_key = '{peer}' FOR UPDATE")
        yield
        await conn.execute("ROLLBACK")
    finally:
        await conn.close()


def test_requests_retried_alone_are_chained_by_peer_in_the_order_they_came() -> None:
    """Chains share no peer; within one, the order submitted (QA round 71)."""
    from tracker.ingest import _chains

    def request(*peers: str) -> tuple[list[Timed], Any]:
        return [Timed(PeerOnline(p), 0.0) for p in peers], object()

    a1, b, a2, ac, c, d = (
        request("a"),
        request("b"),
        request("a"),
        request("a", "c"),
        request("c"),
        request("d"),
    )
    chains = _chains([a1, b, a2, ac, c, d])  # type: ignore[arg-type]
    assert chains == [[a1, a2, ac, c], [b], [d]]

"""A backlog of local changes is stamped a slice per transaction, so writers are not held behind it.

Stamped in one transaction, 600,000 changed rows (an ingest of 100,000 peers) held SQLite's write
lock for 1.3 s and, on Postgres, the rows' locks for 7.4 s: a heartbeat waited as long (QA round 20).
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from gossip_helpers import KEY, LocalNet, merged_view
from sqlalchemy import event, select

import tracker.queries.gossip as q
from tracker import AvailabilityTracker, ContentAvailable, PeerOnline, SpeedSample, TrackerConfig
from tracker.db import run_read, run_write
from tracker.gossip.agent import GossipAgent
from tracker.gossip.config import GossipConfig
from tracker.schema import content_peers, nodes, peer_stats

PEERS, HELD = 90, 3  # 90 peer rows and 270 mappings changed: 360 rows to stamp
CHUNK, SLICE = 8, 40


async def _backlog(tracker: AvailabilityTracker) -> None:
    events: list[Any] = []
    for i in range(PEERS):
        events.append(PeerOnline(peer_id=f"peer-{i:03}"))
        events.append(SpeedSample(peer_id=f"peer-{i:03}", bytes_per_sec=1_000 + i))
        events.extend(
            ContentAvailable(cid=f"cid-{(i + k) % 17}", peer_id=f"peer-{i:03}") for k in range(HELD)
        )
    await tracker.record_batch(events)


async def _versions(tracker: AvailabilityTracker) -> list[int | None]:
    async def work(conn: Any) -> list[int | None]:
        rows: list[int | None] = []
        for table in (peer_stats, content_peers):
            found = await conn.execute(select(table.c.version).where(table.c.node_id == tracker.node_id))
            rows.extend(found.scalars().all())
        return rows

    return await run_read(tracker.engine, work)


@pytest.fixture
async def pair(
    tracker: AvailabilityTracker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[GossipAgent, GossipAgent]]:
    """``tracker``, holding the backlog, gossiping as http://a with a neighbour on a fresh SQLite file
    at http://b; stamps in slices of ``SLICE`` rows."""
    monkeypatch.setattr(q, "SLICE_ROWS", SLICE)
    await _backlog(tracker)
    other = await AvailabilityTracker.open(
        TrackerConfig(database_url=f"sqlite+aiosqlite:///{tmp_path / 'other.db'}", clock=tracker.config.clock)
    )
    net = LocalNet()
    config = GossipConfig(keys=(KEY,), stamp_chunk=CHUNK, max_rows=100)
    agent = GossipAgent(tracker, config, transport=net.transport_for("http://a"), rng=random.Random(1))
    neighbour = GossipAgent(other, config, transport=net.transport_for("http://b"), rng=random.Random(2))
    net.agents = {"http://a": agent, "http://b": neighbour}
    try:
        yield agent, neighbour
    finally:
        await other.close()


@pytest.fixture
def stamped_per_transaction(tracker: AvailabilityTracker) -> Iterator[list[int]]:
    """Rows the stamper wrote in each committed transaction on the tracker's engine (its UPDATE
    statements' row counts)."""
    engine, committed, current = tracker.engine.sync_engine, [], [0]

    def begin(conn: Any) -> None:
        current[0] = 0

    def executed(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith(("UPDATE peer_stats SET version", "UPDATE content_peers SET version")):
            current[0] += cursor.rowcount

    def commit(conn: Any) -> None:
        if current[0]:
            committed.append(current[0])

    listeners = [("begin", begin), ("after_cursor_execute", executed), ("commit", commit)]
    for name, listener in listeners:
        event.listen(engine, name, listener)
    yield committed
    for name, listener in listeners:
        event.remove(engine, name, listener)


async def test_a_stamp_with_a_budget_stops_there_and_the_next_goes_on(tracker: AvailabilityTracker) -> None:
    await _backlog(tracker)
    dialect, node = tracker.config.dialect, tracker.node_id
    total = PEERS * (1 + HELD)
    rounds = []
    while True:
        before = sum(v is not None for v in await _versions(tracker))
        done = await run_write(
            tracker.engine, lambda conn: q.stamp(conn, dialect, node, CHUNK, SLICE, at=0), 3
        )
        rounds.append(sum(v is not None for v in await _versions(tracker)) - before)
        if done.complete:
            break
    # Whole versions: a budget is passed by less than one chunk; every row stamped once, in the
    # versions 1..clock, none holding more than a chunk, and the node's clock at the last of them.
    assert all(0 < n < SLICE + CHUNK for n in rounds[:-1]), rounds
    assert sum(rounds) == total and len(rounds) >= total // (SLICE + CHUNK)
    versions = await _versions(tracker)
    assert None not in versions
    counts = {v: versions.count(v) for v in set(versions)}
    assert sorted(counts) == list(range(1, done.clock + 1))
    assert max(counts.values()) <= CHUNK
    clock = await run_read(
        tracker.engine, lambda c: c.scalar(select(nodes.c.clock).where(nodes.c.id == node))
    )
    assert clock == done.clock
    # Nothing left: a further stamp changes nothing and says so.
    again = await run_write(tracker.engine, lambda conn: q.stamp(conn, dialect, node, CHUNK, SLICE, at=0), 3)
    assert again == (done.clock, True)


async def test_an_exchange_stamps_a_backlog_in_short_transactions(
    tracker: AvailabilityTracker,
    stamped_per_transaction: list[int],
    pair: tuple[GossipAgent, GossipAgent],
) -> None:
    """The initiator stamps its backlog a slice at a time before it sends; the neighbour still ends
    up with all of it."""
    agent, neighbour = pair
    await agent.exchange("http://b")
    total = PEERS * (1 + HELD)
    assert sum(stamped_per_transaction) == total
    assert len(stamped_per_transaction) >= total // (SLICE + CHUNK), stamped_per_transaction
    assert max(stamped_per_transaction) < SLICE + CHUNK, stamped_per_transaction
    for _ in range(10):  # follow-ups carry max_rows at a time
        await agent.exchange("http://b")
    cids = [f"cid-{k}" for k in range(17)]
    assert await merged_view(neighbour.tracker, cids) == await merged_view(tracker, cids)


async def test_a_received_sync_stamps_one_slice(
    tracker: AvailabilityTracker,
    stamped_per_transaction: list[int],
    pair: tuple[GossipAgent, GossipAgent],
) -> None:
    """Answering a neighbour stamps within the merge's transaction, one slice of the backlog only; the
    rest waits for this node's own exchanges (or the next sync it answers)."""
    _, neighbour = pair
    await neighbour.exchange("http://a")
    assert stamped_per_transaction and max(stamped_per_transaction) < SLICE + CHUNK
    versions = await _versions(tracker)
    assert 0 < sum(v is not None for v in versions) < len(versions)


async def test_a_tracker_that_only_answers_sends_its_whole_backlog_within_an_exchange_or_two(
    tracker: AvailabilityTracker, pair: tuple[GossipAgent, GossipAgent]
) -> None:
    """A tracker without neighbours of its own never stamps in its own exchanges: answering, it
    stamped one slice per exchange and its replies did not say there was more, so a backlog of
    600,000 rows took ~120 exchanges (an hour at 30 s) to leave (QA round 25). Its replies now say
    so while a backlog remains, and the sender's follow-ups take the next slices."""
    _, neighbour = pair
    for _ in range(2):
        await neighbour.exchange("http://a")
    cids = [f"cid-{k}" for k in range(17)]
    assert await merged_view(neighbour.tracker, cids) == await merged_view(tracker, cids)
    assert None not in await _versions(tracker)

"""A gossip merge takes its row locks in the write path's order, so it cannot deadlock with ingest
batches or selections on Postgres (QA round 66: 4 deadlocks in a 36-minute soak, all retried).

Each test holds one row from a second connection, as a batch or a selection in the middle of its
transaction would, lets a merge run into it, and then asks for the row the batch would lock next
(``NOWAIT``): a merge that had taken that row first, out of order, would be the other half of a
deadlock. SQLite has one writer at a time and no row locks: nothing to order there.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncConnection

from tracker import AvailabilityTracker
from tracker.events import ContentAvailable, PeerOnline
from tracker.gossip.protocol import MappingState, OriginDelta
from tracker.queries import gossip as gq
from tracker.queries import lock_peers

pytestmark = pytest.mark.parametrize("engine_name", ["postgresql"], indirect=True)


def _mapping(cid: str, peer: str, since: float, changed_at: float) -> MappingState:
    return MappingState(
        cid=cid, peer=peer, available=True, since=since, last_confirmed=changed_at, changed_at=changed_at,
        version=1,
    )  # fmt: skip


_CONTENT_PEER = (
    "SELECT 1 FROM content_peers WHERE content_id = (SELECT id FROM contents WHERE content_key = '{cid}')"
    " AND peer_id = (SELECT id FROM peers WHERE peer_key = '{peer}') FOR UPDATE{nowait}"
)
_PEER = "SELECT 1 FROM peers WHERE peer_key = '{peer}' FOR NO KEY UPDATE{nowait}"


@pytest.fixture
async def holder(tracker: AvailabilityTracker) -> AsyncIterator[AsyncConnection]:
    """A second connection in a transaction: the batch or selection holding rows."""
    async with tracker.engine.connect() as conn:
        async with conn.begin():
            yield conn


async def _merging(tracker: AvailabilityTracker, deltas: list[OriginDelta]) -> asyncio.Task[Any]:
    """A merge of ``deltas`` in its own transaction, started and left running until it waits for a lock."""

    async def merge() -> gq.MergeCounts:
        async with tracker.engine.begin() as conn:
            await conn.exec_driver_sql("SET LOCAL lock_timeout = '20s'")
            return await gq.merge(conn, "postgresql", tracker.node_key, deltas, 10, tracker.now())

    task = asyncio.create_task(merge())
    async with tracker.engine.connect() as probe:
        for _ in range(600):
            waiting = await probe.exec_driver_sql(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            if waiting.scalar():
                return task
            await probe.rollback()  # pg_stat_activity is read once per transaction
            assert not task.done(), "the merge took no lock the holder has"
            await asyncio.sleep(0.05)
        activity = (
            await probe.exec_driver_sql(
                "SELECT state, wait_event_type, wait_event, left(query, 80) FROM pg_stat_activity"
                " WHERE datname = current_database()"
            )
        ).all()
    task.cancel()
    raise AssertionError(f"the merge never waited for the held row: {activity}")


async def test_a_merge_locks_mappings_of_all_origins_in_content_then_peer_key_order(
    tracker: AvailabilityTracker, holder: AsyncConnection
) -> None:
    """Origin "n1" sends (c2, p), origin "n2" (c1, p): merged origin by origin, (c2, p) was locked
    before (c1, p), the reverse of a batch's order."""
    now = tracker.now()
    await tracker.record_batch([ContentAvailable("c1", "p"), ContentAvailable("c2", "p")])
    deltas = [
        OriginDelta(origin="n1", base=0, upto=1, mappings=[_mapping("c2", "p", now, now + 10)]),
        OriginDelta(origin="n2", base=0, upto=1, mappings=[_mapping("c1", "p", now, now + 10)]),
    ]
    await holder.exec_driver_sql(_CONTENT_PEER.format(cid="c1", peer="p", nowait=""))
    task = await _merging(tracker, deltas)
    # The batch goes on to its next row; the merge, waiting for (c1, p), must not hold it.
    await holder.exec_driver_sql(_CONTENT_PEER.format(cid="c2", peer="p", nowait=" NOWAIT"))
    await holder.commit()
    counts = await asyncio.wait_for(task, 30)
    assert counts.mappings == 2


async def test_a_merge_writes_the_keys_of_all_origins_in_key_order(
    tracker: AvailabilityTracker, holder: AsyncConnection
) -> None:
    """Origin "n1" knows an earlier sighting of "pz", origin "n2" of "pa": written origin by origin,
    "pz" was locked before "pa"."""
    now = tracker.now()
    await tracker.record_batch([PeerOnline("pa"), PeerOnline("pz")])
    deltas = [
        OriginDelta(origin="n1", base=0, upto=1, mappings=[_mapping("c", "pz", now - 100, now)]),
        OriginDelta(origin="n2", base=0, upto=1, mappings=[_mapping("c", "pa", now - 100, now)]),
    ]
    await holder.exec_driver_sql(_PEER.format(peer="pa", nowait=""))
    task = await _merging(tracker, deltas)
    await holder.exec_driver_sql(_PEER.format(peer="pz", nowait=" NOWAIT"))
    await holder.commit()
    await asyncio.wait_for(task, 30)
    seen = {p.peer_id: p.first_seen.timestamp() for p in await tracker.list_peers(limit=10)}
    assert seen == {"pa": now - 100, "pz": now - 100}


async def test_a_selection_holding_peers_does_not_block_a_merge_referring_to_them(
    tracker: AvailabilityTracker, holder: AsyncConnection
) -> None:
    """A selection locked its peers ``FOR UPDATE``, which blocks the key-share lock an insert that
    refers to a peer takes: a merge adding another origin's rows waited, and holding the key-share
    of one peer while it waited for another's, deadlocked with selections."""
    now = tracker.now()
    await tracker.record_batch([PeerOnline("pa"), PeerOnline("pb")])
    assert await lock_peers(holder, "postgresql", ["pa", "pb"]) == ["pa", "pb"]
    deltas = [
        OriginDelta(
            origin="n1",
            base=0,
            upto=1,
            mappings=[_mapping("c", "pa", now, now), _mapping("c", "pb", now, now)],
        )
    ]

    async def merge() -> gq.MergeCounts:
        async with tracker.engine.begin() as conn:
            await conn.exec_driver_sql("SET LOCAL lock_timeout = '3s'")
            return await gq.merge(conn, "postgresql", tracker.node_key, deltas, 10, tracker.now())

    counts = await merge()  # while the selection still holds both peers
    assert counts.mappings == 2
    await holder.commit()
    assert await tracker.get_available_peers("c") == ["pa", "pb"]

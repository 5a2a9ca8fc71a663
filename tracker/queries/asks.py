"""Mappings the sweeper deleted without a removal, and asking their origins for them again.

A mapping whose origin never removed it (that tracker is gone for good, never sweeps, or was cut off
from this one) is deleted here once its peer has been unseen for the retention and the tombstones'
time (``sweep.prune_departed_mappings``, ``forget.forget_rowless_mappings``). This node's clock of
that origin still covers the row, so gossip never sends it again: if the peer never left (it stayed
on its origin while this tracker was cut off, QA round 30) the live mapping would stay missing here
for good. Lowering the clock below the row's version (an *ask*) has the next exchange send the
origin's rows from there again.

When to ask. At every deletion (until 2026-12-06) two sweeping trackers holding the never-removed
mapping of an origin gone for good sent it back to each other about hourly, with that origin's rows
since its version, for as long as they ran, and its peer and content were never forgotten (QA round
34); asking only once news of the origin came lost a quiet origin's live mapping for good when the
peer's sightings reached this tracker from another (QA round 35). The deletion judged the *peer*
departed, so news of the peer is what can prove it wrong: each deletion is remembered
(``deleted_mappings``, in the deleting transaction: a restart loses nothing, QA round 32) and the
origin is asked once any origin has seen the peer at or after the deletion's cutoff: by the merge
that brings such a row, in its transaction (``ask_for_merged``), and by the sweeper's pass for
sightings made here (``ask_for_returned``). A peer that is back is not departed, so what the ask
brings back stays, and a catch-up in slices can no longer delete it again before it ends (what the
hour's hold after each ask was for, QA round 33); a peer that never comes back costs nothing after
its deletion.

Until the row is back. An ask is answered by whichever neighbour answers first, and one that had
deleted the mapping too sent the origin's rows as complete as its clock, without it: this node's
clock passed the version again and the mapping was lost for good (QA round 37). So a record stays
until a row of its mapping is here again, and while the clock claims the version without it the
pass asks again, ``ASK_AGAIN_S`` after the first ask and twice as long after each: an origin that
no longer holds the mapping (gone, and nobody else does either) costs a few resends, not one a pass.

A record is forgotten ``forget_after_s`` after the deletion, as long as the peer's own rows outlive
their origin's last write: a tracker cut off from an origin for longer than the retention, the
tombstones' time and that loses the live mappings its peers never announced again.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Integer, delete, exists, literal, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncConnection

from ..db import insert_for
from ..schema import content_peers, deleted_mappings, nodes, peer_stats
from ._sql import IN_CHUNK, least, one_of

#: A deleted mapping: its content, its peer, its origin (``node_id``) and its version (``None``:
#: this node's, not stamped yet).
Deleted = tuple[int, int, int, int | None]

#: How long after an ask that went unanswered (this node's clock of the origin passed the version
#: again, and no row of the mapping came) it is made again; doubled at every ask. The neighbour that
#: answered may have deleted the mapping too, and get it back from the origin a moment later.
ASK_AGAIN_S = 600.0
#: Asks beyond this many wait no longer: 600 s x 2^16 is over a year.
_MAX_DOUBLINGS = 16


async def delete_returning(conn: AsyncConnection, stmt: Any) -> list[Deleted]:
    """Run a ``DELETE`` of ``content_peers`` and return what it deleted, for ``remember_deleted``."""
    cp = content_peers.c
    rows = (await conn.execute(stmt.returning(cp.content_id, cp.peer_id, cp.node_id, cp.version))).all()
    return [
        (int(content), int(peer), int(node), None if version is None else int(version))
        for content, peer, node, version in rows
    ]


async def remember_deleted(
    conn: AsyncConnection, local_id: int, deleted: list[Deleted], unseen_since: float, now: float
) -> int:
    """Remember the other origins' mappings in ``deleted`` (this node's own are no row it could be
    sent: its clock is its own), deleted because no origin had seen their peers since
    ``unseen_since``; returns the records written. A mapping deleted again (it came back, and its
    peer left again) starts over.

    In the deleting transaction: remembered later, a crash between lost the ask, and with it the
    mapping (QA round 32, for asks put off in the process)."""
    rows = [
        {
            "content_id": content_id,
            "peer_id": peer_id,
            "node_id": node_id,
            "version": version,
            "unseen_since": unseen_since,
            "deleted_at": now,
            "asked_at": None,
            "ask_after": None,
            "asks": 0,
        }
        for content_id, peer_id, node_id, version in sorted(deleted)  # one lock order
        if version is not None and node_id != local_id
    ]
    if not rows:
        return 0
    d = deleted_mappings.c
    ins = insert_for(conn.dialect.name, deleted_mappings)
    replaced = ("node_id", "version", "unseen_since", "deleted_at", "asked_at", "ask_after", "asks")
    stmt = ins.on_conflict_do_update(
        index_elements=[d.content_id, d.peer_id], set_={name: ins.excluded[name] for name in replaced}
    )
    await conn.execute(stmt, rows)
    return len(rows)


def _seen_again() -> Any:
    """Some origin has seen the record's peer since the deletion judged it departed."""
    d, ps = deleted_mappings.c, peer_stats.c
    return exists().where(ps.peer_id == d.peer_id, ps.last_seen >= d.unseen_since)


def _back() -> Any:
    """A row of the record's mapping is here again: the origin's, or newer news of it."""
    d, cp = deleted_mappings.c, content_peers.c
    return exists().where(cp.content_id == d.content_id, cp.peer_id == d.peer_id)


async def _ask(conn: AsyncConnection, which: Any, now: float) -> int:
    """Ask for the records ``which`` selects (and whose peer was seen again, and whose row is not
    back), and note when to ask again; how many."""
    d = deleted_mappings.c
    doublings = least(conn.dialect.name, d.asks, literal(_MAX_DOUBLINGS, Integer()))
    stmt = (
        update(deleted_mappings)
        .where(which, _seen_again(), ~_back())
        .values(
            asked_at=now,
            asks=d.asks + 1,
            ask_after=now + ASK_AGAIN_S * literal(1, Integer()).op("<<")(doublings),
        )
        .returning(d.node_id, d.version)
    )
    rows = (await conn.execute(stmt)).all()
    await ask_again(conn, [(int(node), int(version)) for node, version in rows])
    return len(rows)


async def ask_for_returned(
    conn: AsyncConnection, now: float, after: int, limit: int
) -> tuple[int, int | None]:
    """The sweeper's pass over the records of the next ``limit`` contents after ``after``: forget
    those whose mapping is back; ask for those whose peer was seen again (a sighting here, which no
    merge saw) and not asked for yet, or asked for in vain (this node's clock of the origin passed
    the version again, and nothing came) long enough ago; returns how many were asked for and where
    the next slice starts (``None``: done)."""
    d, n = deleted_mappings.c, nodes.c
    found = select(d.content_id).where(d.content_id > after).order_by(d.content_id).offset(limit - 1).limit(1)
    end = (await conn.execute(found)).scalar()
    upto = None if end is None else int(end)
    in_slice = d.content_id > after if upto is None else (d.content_id > after) & (d.content_id <= upto)
    await conn.execute(delete(deleted_mappings).where(in_slice, _back()))
    claimed = exists().where(n.id == d.node_id, n.clock >= d.version)
    due = d.asked_at.is_(None) | ((d.ask_after <= now) & claimed)
    return await _ask(conn, in_slice & due, now), upto


async def ask_for_merged(conn: AsyncConnection, dialect: str, peer_ids: Iterable[int], now: float) -> int:
    """The merge's: ask for the records not asked for yet of the peers whose rows it just applied,
    if seen again, in its transaction.

    Left to the sweeper's next pass, a relay that had deleted the mapping too took the peer's new
    row and, with it, claimed the origin's rows complete past the mapping's version; a node that
    asked that relay meanwhile was sent the rest without the mapping, and its clock passed it (the
    pass asks again, ``ASK_AGAIN_S`` later). Asked in the same transaction, the relay never claims
    more than it holds."""
    ids = sorted(set(peer_ids))
    if not ids or (await conn.execute(select(exists().select_from(deleted_mappings)))).scalar() is not True:
        return 0
    d = deleted_mappings.c
    asked = 0
    for start in range(0, len(ids), IN_CHUNK):
        which = one_of(dialect, d.peer_id, ids[start : start + IN_CHUNK]) & d.asked_at.is_(None)
        asked += await _ask(conn, which, now)
    return asked


async def ask_again(conn: AsyncConnection, deleted: list[tuple[int, int]]) -> None:
    """Lower this node's clock of each origin in ``deleted`` (origin, version) below the lowest
    version given, so that gossip sends that origin's rows from there on again. Never this node's
    own clock, and never a clock already below."""
    lowest: dict[int, int] = {}
    for node_id, version in deleted:
        lowest[node_id] = min(version, lowest.get(node_id, version))
    n = nodes.c
    for node_id, version in sorted(lowest.items()):  # one lock order for concurrent writers
        await conn.execute(
            update(nodes)
            .where(n.id == node_id, ~n.is_local, n.clock >= version)
            .values(clock=max(version - 1, 0))
        )


async def forget_deleted(conn: AsyncConnection, cutoff: float, limit: int) -> int:
    """Forget up to ``limit`` records whose deletion was before ``cutoff``."""
    d = deleted_mappings.c
    oldest = select(d.content_id, d.peer_id).where(d.deleted_at < cutoff).order_by(d.deleted_at).limit(limit)
    doomed = delete(deleted_mappings).where(
        tuple_(d.content_id, d.peer_id).in_(oldest), d.deleted_at < cutoff
    )
    return int((await conn.execute(doomed)).rowcount or 0)

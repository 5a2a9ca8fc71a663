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
departed, so news of the peer is what can prove it wrong: each deletion is remembered per peer and
origin (``deleted_mappings``, in the deleting transaction: a restart loses nothing, QA round 32) and
the origin is asked once any origin has seen the peer at or after the deletion's cutoff: by the
merge that brings such a row, in its transaction (``ask_for_merged``), and by the sweeper's pass for
sightings made here (``ask_for_returned``). A peer that is back is not departed, so what the ask
brings back stays, and a catch-up in slices can no longer delete it again before it ends (what the
hour's hold after each ask was for, QA round 33); a peer that never comes back costs nothing after
its deletion.

A record is forgotten ``forget_after_s`` after its latest deletion, as long as the peer's own rows
outlive their origin's last write: a tracker cut off from an origin for longer than the retention,
the tombstones' time and that loses the live mappings its peers never announced again.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import delete, exists, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncConnection

from ..db import insert_for
from ..schema import content_peers, deleted_mappings, nodes, peer_stats
from ._sql import IN_CHUNK, greatest, least, one_of

#: A deleted mapping: its peer, its origin (``node_id``) and its version (``None``: this node's, not
#: stamped yet).
Deleted = tuple[int, int, int | None]


async def delete_returning(conn: AsyncConnection, stmt: Any) -> list[Deleted]:
    """Run a ``DELETE`` of ``content_peers`` and return what it deleted, for ``remember_deleted``."""
    cp = content_peers.c
    rows = (await conn.execute(stmt.returning(cp.peer_id, cp.node_id, cp.version))).all()
    return [(int(peer), int(node), None if version is None else int(version)) for peer, node, version in rows]


async def remember_deleted(
    conn: AsyncConnection, local_id: int, deleted: list[Deleted], unseen_since: float, now: float
) -> int:
    """Remember, per peer and origin, the lowest version of other origins' mappings in ``deleted``
    (this node's own are no row it could be sent: its clock is its own), deleted because no origin
    had seen their peers since ``unseen_since``; returns the records written.

    In the deleting transaction: remembered later, a crash between lost the ask, and with it the
    mapping (QA round 32, for asks put off in the process)."""
    lowest: dict[tuple[int, int], int] = {}
    for peer_id, node_id, version in deleted:
        if version is not None and node_id != local_id:
            key = (peer_id, node_id)
            lowest[key] = min(version, lowest.get(key, version))
    if not lowest:
        return 0
    d = deleted_mappings.c
    dialect = conn.dialect.name
    ins = insert_for(dialect, deleted_mappings)
    stmt = ins.on_conflict_do_update(
        index_elements=[d.peer_id, d.node_id],
        set_={
            "version": least(dialect, d.version, ins.excluded.version),
            "unseen_since": greatest(dialect, d.unseen_since, ins.excluded.unseen_since),
            "deleted_at": greatest(dialect, d.deleted_at, ins.excluded.deleted_at),
        },
    )
    rows = [
        {
            "peer_id": peer_id,
            "node_id": node_id,
            "version": version,
            "unseen_since": unseen_since,
            "deleted_at": now,
        }
        for (peer_id, node_id), version in sorted(lowest.items())  # one lock order for concurrent sweepers
    ]
    await conn.execute(stmt, rows)
    return len(rows)


def _seen_again() -> Any:
    """Some origin has seen the record's peer since the deletion judged it departed."""
    d, ps = deleted_mappings.c, peer_stats.c
    return exists().where(ps.peer_id == d.peer_id, ps.last_seen >= d.unseen_since)


async def _ask(conn: AsyncConnection, which: Any) -> int:
    """Ask for the records ``which`` selects whose peer was seen again, and forget them."""
    d = deleted_mappings.c
    stmt = delete(deleted_mappings).where(which, _seen_again()).returning(d.node_id, d.version)
    rows = (await conn.execute(stmt)).all()
    await ask_again(conn, [(int(node), int(version)) for node, version in rows])
    return len(rows)


async def ask_for_returned(conn: AsyncConnection, after: int, limit: int) -> tuple[int, int | None]:
    """The sweeper's pass over every record: ask for those, among the next ``limit`` records' peers
    after ``after``, whose peer was seen again (a sighting here, which no merge saw); returns how
    many were asked for and where the next slice starts (``None``: done)."""
    d = deleted_mappings.c
    found = select(d.peer_id).where(d.peer_id > after).order_by(d.peer_id).offset(limit - 1).limit(1)
    end = (await conn.execute(found)).scalar()
    upto = None if end is None else int(end)
    in_slice = d.peer_id > after if upto is None else (d.peer_id > after) & (d.peer_id <= upto)
    return await _ask(conn, in_slice), upto


async def ask_for_merged(conn: AsyncConnection, dialect: str, peer_ids: Iterable[int]) -> int:
    """The merge's: ask for the records of the peers whose rows it just applied, if seen again, in
    its transaction.

    Left to the sweeper's next pass, a relay that had deleted the mapping too took the peer's new
    row and, with it, claimed the origin's rows complete past the mapping's version; a node that
    asked that relay meanwhile was sent the rest without the mapping, and its clock passed it, for
    good. Asked in the same transaction, the relay never claims more than it holds."""
    ids = sorted(set(peer_ids))
    if not ids or (await conn.execute(select(exists().select_from(deleted_mappings)))).scalar() is not True:
        return 0
    asked = 0
    for start in range(0, len(ids), IN_CHUNK):
        asked += await _ask(conn, one_of(dialect, deleted_mappings.c.peer_id, ids[start : start + IN_CHUNK]))
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
    """Forget up to ``limit`` records whose latest deletion was before ``cutoff``."""
    d = deleted_mappings.c
    oldest = select(d.peer_id, d.node_id).where(d.deleted_at < cutoff).order_by(d.deleted_at).limit(limit)
    doomed = delete(deleted_mappings).where(tuple_(d.peer_id, d.node_id).in_(oldest), d.deleted_at < cutoff)
    return int((await conn.execute(doomed)).rowcount or 0)

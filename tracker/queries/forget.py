"""Forgetting departed peers: the rows their origins stopped writing, then the ids left with nothing.

Each function works on one slice of a table's key range, in the caller's short transaction, and
returns how many rows it deleted and where the next slice starts (``None``: the range is done). The
sweeper runs them at most hourly (``sweeper.FORGET_EVERY_S``): they walk whole tables, and a row
forgotten an hour late costs only its room.

Why a row's own ``updated_at`` decides: it is the origin's clock at the origin's last write, carried
by gossip with the row, so every tracker holding the row reaches the same verdict at the same time
(within their clocks' skew), whatever else it has heard of the peer. A rule on the peer as a whole
(its latest sighting anywhere) did not converge: a peer back on one tracker between two trackers'
passes kept its old rows there and lost them elsewhere. A neighbour that has not swept yet may send
a forgotten row again (a first contact, a snapshot): it is taken, and goes again at the next pass.
Left out by the merge instead, its peer's mappings, which came in the same exchange, had no row
left to date the departure by (QA round 27).

Rows go only after their peer's mappings (``TrackerConfig.forget_after_s``): a mapping is deleted
by what its peer's rows say. Their absence is also how a mapping looks that arrived before its
peer's row (a rule on absence deleted such a live mapping in a new tracker's first sync, and gossip
never sent it again: QA round 27), so a mapping without rows goes only when it is as old as a
departed peer's would be, and its origin is asked for its rows again (``forget_rowless_mappings``).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, delete, exists, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from ..schema import (
    bandwidth_samples,
    content_peers,
    contents,
    peer_leases,
    peer_stats,
    peers,
    upload_outcomes,
)
from ._sql import IN_CHUNK
from .sweep import Deleted, deleted_mappings, not_held, pair_in


async def _slice_end(conn: AsyncConnection, key: Any, after: int, limit: int) -> int | None:
    """Where a slice ends: the ``limit``-th key after ``after``, or ``None`` past the last one."""
    stmt = select(key).where(key > after).order_by(key).offset(limit - 1).limit(1)
    found = (await conn.execute(stmt)).scalar()
    return None if found is None else int(found)


def _in_slice(key: Any, after: int, upto: int | None) -> Any:
    return key > after if upto is None else and_(key > after, key <= upto)


async def forget_peer_rows(
    conn: AsyncConnection, cutoff: float, mappings_cutoff: float, after: int, limit: int
) -> tuple[int, int | None]:
    """Delete the ``peer_stats`` rows, of any origin, whose origin last wrote them before ``cutoff``,
    with their samples, for peers in the next ``limit`` peer ids of ``peer_stats`` after ``after``;
    not while the peer has an available mapping announced since ``mappings_cutoff``.

    Such a mapping says its origin saw the peer then, so ``prune_departed_mappings`` keeps it while
    its own row may be on its way; and once the rows were gone, nothing would ever date it again:
    a mapping of a tracker gone for good, whose row never came, kept its peer and content for good
    (QA round 29). The rows wait for it (days at most), and go at the pass after it.

    The rows go first, and then the samples of exactly the rows that went: on Postgres a write that
    revives a row between the two statements keeps it (the ``DELETE`` checks ``updated_at`` again on
    the newer row) and with it its samples."""
    ps, cp = peer_stats.c, content_peers.c
    upto = await _slice_end(conn, ps.peer_id, after, limit)
    announced = exists().where(
        cp.peer_id == ps.peer_id,
        cp.available,
        or_(cp.changed_at >= mappings_cutoff, cp.last_confirmed >= mappings_cutoff),
    )
    gone = (
        await conn.execute(
            delete(peer_stats)
            .where(_in_slice(ps.peer_id, after, upto), ps.updated_at < cutoff, ~announced)
            .returning(ps.peer_id, ps.node_id)
        )
    ).all()
    by_origin: dict[int, list[int]] = {}
    for peer_id, node_id in gone:
        by_origin.setdefault(int(node_id), []).append(int(peer_id))
    s = bandwidth_samples.c
    for node_id, peer_ids in sorted(by_origin.items()):
        # Per origin, as key lookups: a row-value IN list made SQLite scan the samples per statement
        # (11 s for a 100,000-peer swarm, against 1.2 s for the raw deletes).
        for chunk in _chunks(sorted(peer_ids)):
            await conn.execute(delete(bandwidth_samples).where(s.node_id == node_id, s.peer_id.in_(chunk)))
    return len(gone), upto


async def forget_rowless_mappings(
    conn: AsyncConnection, mappings_cutoff: float, after: int, limit: int, held: frozenset[int] = frozenset()
) -> tuple[list[Deleted], int | None]:
    """Delete the available mappings, of peers among the next ``limit`` peer ids after ``after``, whose
    peer has no ``peer_stats`` row and which nobody announced since ``mappings_cutoff``; returns them
    and where the next slice starts. Not those of the origins in ``held`` (asked lately).

    Such a mapping came after its peer's rows were forgotten: from a neighbour that never sweeps, or
    an import that brought a snapshot's rows and mappings apart (QA round 30); no rule on the rows
    would ever take it, and it kept its peer and content for good. One that only came before its
    row (a first sync in slices) is a live peer's: the sweeper asks its origin for its rows again
    from that version, and it comes back with its row (``queries.sweep.ask_again``)."""
    p, cp = peers.c, content_peers.c
    upto = await _slice_end(conn, p.id, after, limit)
    rowless = ~exists().where(peer_stats.c.peer_id == cp.peer_id)
    announced = or_(cp.changed_at >= mappings_cutoff, cp.last_confirmed >= mappings_cutoff)
    victims = (
        select(cp.content_id, cp.peer_id)
        .where(_in_slice(cp.peer_id, after, upto), cp.available, ~announced, rowless, not_held(held))
        .limit(limit)
    )
    deleted = await deleted_mappings(conn, delete(content_peers).where(pair_in(victims)))
    # At most ``limit`` mappings a transaction (one peer may hold 150,000: QA round 33); a full
    # one takes the same slice again.
    return deleted, after if len(deleted) == limit else upto


def _peer_unused() -> list[Any]:
    """A peer nothing refers to but its samples (which mean nothing without its rows)."""
    p = peers.c
    return [
        ~exists().where(peer_stats.c.peer_id == p.id),
        ~exists().where(content_peers.c.peer_id == p.id),
        ~exists().where(upload_outcomes.c.peer_id == p.id),
        ~exists().where(peer_leases.c.peer_id == p.id),
    ]


def _content_unused() -> list[Any]:
    """A content no mapping or lease names (its outcomes keep their rows, the content set to null;
    migration 0014 indexes both references, which the delete's foreign keys visit)."""
    c = contents.c
    return [
        ~exists().where(content_peers.c.content_id == c.id),
        ~exists().where(peer_leases.c.content_id == c.id),
    ]


async def forget_unused_peers(
    conn: AsyncConnection, dialect: str, after: int, limit: int
) -> tuple[int, int | None]:
    """Delete the peers among the next ``limit`` ids after ``after`` that nothing refers to any more."""
    return await _forget_unused(conn, dialect, peers, _peer_unused, after, limit, samples=True)


async def forget_unused_contents(
    conn: AsyncConnection, dialect: str, after: int, limit: int
) -> tuple[int, int | None]:
    """Delete the contents among the next ``limit`` ids after ``after`` that nothing refers to any more."""
    return await _forget_unused(conn, dialect, contents, _content_unused, after, limit, samples=False)


async def _forget_unused(
    conn: AsyncConnection,
    dialect: str,
    table: Any,
    unused: Any,
    after: int,
    limit: int,
    *,
    samples: bool,
) -> tuple[int, int | None]:
    """On Postgres the candidates are locked first (``SKIP LOCKED``: a writer holding one, having
    just upserted its key, is about to refer to it) and checked again by a second statement, whose
    snapshot sees every writer that referred to them before the lock. Checked and deleted in one
    statement, a reference committed between its snapshot and its lock went unseen, and the
    ``CASCADE`` deleted it with the key. On SQLite the write transaction excludes every writer."""
    key = table.c.id
    upto = await _slice_end(conn, key, after, limit)
    found = select(key).where(_in_slice(key, after, upto), *unused())
    if dialect == "postgresql":
        locked = [int(i) for i in (await conn.scalars(found.with_for_update(skip_locked=True))).all()]
        doomed = []
        for chunk in _chunks(locked):  # bounded lists: asyncpg takes at most 32,767 parameters
            doomed += [
                int(i) for i in (await conn.scalars(select(key).where(key.in_(chunk), *unused()))).all()
            ]
    else:
        doomed = [int(i) for i in (await conn.scalars(found)).all()]
    deleted = 0
    for chunk in _chunks(doomed):
        if samples:
            await conn.execute(delete(bandwidth_samples).where(bandwidth_samples.c.peer_id.in_(chunk)))
        deleted += int((await conn.execute(delete(table).where(key.in_(chunk)))).rowcount or 0)
    return deleted, upto


def _chunks(ids: list[int]) -> list[list[int]]:
    return [ids[start : start + IN_CHUNK] for start in range(0, len(ids), IN_CHUNK)]

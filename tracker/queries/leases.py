"""Lease statements: how much load each peer carries, granting leases under a cap, closing and expiring them.

The cap holds atomically: selection re-counts the chosen peers' open leases in the transaction that
grants them, while holding their rows (``FOR NO KEY UPDATE`` on Postgres; SQLite's write transaction is
already exclusive), so two selectors can never both take a peer's last slot.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

from sqlalchemy import Double, Integer, bindparam, case, delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import ColumnElement

from ..compiled import Precompiled
from ..db import DriverSQL
from ..schema import peer_leases, peers
from ._sql import content_id_of, peer_id_of


async def lock_peers(
    conn: AsyncConnection, dialect: str, peer_keys: Sequence[str], *, skip_locked: bool = False
) -> list[str]:
    """Hold the chosen peers' rows until commit (Postgres), in peer_key order like the write path,
    so a selection and an ingest batch can never deadlock; returns the keys in the order locked.
    ``skip_locked``: leave out, without waiting, the rows other transactions hold (a selection
    granting them, a batch writing them).

    The write path sorts keys in Python, by code point; so does ``COLLATE "C"`` on UTF-8, whatever
    the database's own collation. Ordered by that instead (QA round 6: on an ICU "en-US" database,
    mixed-case ids deadlocked selections against batches 15 times in 20 s)."""
    if dialect != "postgresql" or not peer_keys:
        return []
    stmt = (
        select(peers.c.peer_key)
        .where(peers.c.peer_key.in_(list(peer_keys)))
        .order_by(peers.c.peer_key.collate("C"))
        # FOR NO KEY UPDATE: it still orders selections and ingest batches (which lock the rows alike)
        # on each peer, but leaves alone the key-share lock every insert referring to the peer takes
        # (a gossip merge's rows of another origin, a lease): FOR UPDATE blocked those, and a merge
        # holding one peer's key-share while waiting for another's deadlocked against selections.
        .with_for_update(skip_locked=skip_locked, key_share=True)
    )
    return list((await conn.execute(stmt)).scalars())


async def probe_loads(
    conn: AsyncConnection, candidates: Sequence[tuple[str, int]], want: int, now: float
) -> tuple[dict[str, int], set[str]]:
    """Postgres: lock the ``(peer_key, capacity)`` candidates one at a time, in the order given,
    passing over those other transactions hold, until ``want`` are below their capacity. Returns the
    open leases of those locked, and the keys passed over (worth a look again once those commit).

    One at a time: concurrent callers that rank alike, each locking all its candidates at once, left
    each other nothing unlocked (QA round 43)."""
    loads: dict[str, int] = {}
    held: set[str] = set()
    free = 0
    for key, capacity in candidates:
        if not await lock_peers(conn, "postgresql", [key], skip_locked=True):
            held.add(key)
            continue
        loads[key] = (await open_loads(conn, [key], now)).get(key, 0)
        free += loads[key] < capacity
        if free == want:
            break
    return loads, held


# Built once, with an expanding IN parameter, so SQLAlchemy's compiled cache serves every call.
_OPEN_LOADS = (
    select(peers.c.peer_key, func.count(peer_leases.c.id))
    .join(peer_leases, peer_leases.c.peer_id == peers.c.id)
    .where(
        peers.c.peer_key.in_(bindparam("keys", expanding=True)),
        peer_leases.c.expires_at > bindparam("now", type_=Double()),
        peer_leases.c.closed_at.is_(None),
    )
    .group_by(peers.c.peer_key)
)


async def current_loads(
    conn: DriverSQL, dialect: str, peer_keys: Sequence[str], now: float
) -> dict[str, int]:
    """Open leases per peer as of ``now``, counted so that no other selector can change them before
    this write transaction commits: Postgres locks the peers' rows first (``lock_peers``); SQLite's
    transaction is exclusive already, and there each peer is one index probe in the lane thread
    (a few tens of microseconds for the ``2n`` candidates, in the same crossing as the grant).
    Every key counted is in the result (a peer deleted since the ranking is not).
    """
    if dialect == "postgresql":
        assert isinstance(conn, AsyncConnection)  # the lanes are SQLite's; Postgres runs on the engine
        locked = await lock_peers(conn, dialect, peer_keys)
        counted = await open_loads(conn, locked, now)
        return {key: counted.get(key, 0) for key in locked}
    probe = _load_of(dialect)
    loads: dict[str, int] = {}
    for key in peer_keys:
        rows = await probe.fetch(conn, {"peer_key": key, "now": now})
        loads[key] = int(rows[0][0])
    return loads


@cache
def _load_of(dialect: str) -> Precompiled:
    lease = peer_leases.c
    stmt = select(func.count(lease.id)).where(
        lease.peer_id == peer_id_of("peer_key"),
        lease.expires_at > bindparam("now", type_=Double()),
        lease.closed_at.is_(None),
    )
    return Precompiled(stmt, dialect)


async def open_loads(conn: AsyncConnection, peer_keys: Sequence[str], now: float) -> dict[str, int]:
    """Open (unexpired) leases per peer, as of ``now``."""
    if not peer_keys:
        return {}
    rows = await conn.execute(_OPEN_LOADS, {"keys": list(peer_keys), "now": now})
    return {key: int(count) for key, count in rows.all()}


async def grant_leases(
    conn: DriverSQL,
    dialect: str,
    node_id: int,
    cid: str,
    peer_keys: Sequence[str],
    now: float,
    ttl_s: float,
) -> None:
    """One lease per chosen peer, for ``cid``, expiring after ``ttl_s``."""
    if peer_keys:
        await _grant(dialect).executemany(
            conn,
            [
                {"peer_key": key, "cid": cid, "node_id": node_id, "p_now": now, "p_expires": now + ttl_s}
                for key in peer_keys
            ],
        )


@cache
def _grant(dialect: str) -> Precompiled:
    stmt = insert(peer_leases).values(
        peer_id=peer_id_of("peer_key"),
        content_id=content_id_of("cid"),
        node_id=bindparam("node_id", type_=Integer()),
        leased_at=bindparam("p_now", type_=Double()),
        expires_at=bindparam("p_expires", type_=Double()),
    )
    return Precompiled(stmt, dialect)


async def close_oldest_leases(conn: DriverSQL, dialect: str, outcomes: list[dict[str, Any]]) -> None:
    """For each outcome (``peer_key``, ``cid`` or None, ``p_now``, ``p_granted_by``), close the peer's
    oldest open lease granted by ``p_granted_by``, preferring one for the same content. Closed leases
    stay until they expire: selection reads them to know when each peer was last handed out.

    Open means open at the tracker's ``p_now``, and it is closed then: the outcome's own time is the
    client's clock, which only bounds which leases it can answer (``p_granted_by``: its time plus
    the allowed skew). Judged by the outcome's time, an outcome from a clock 59 s fast closed no 60 s
    lease, and one reported long after its transfer closed a lease granted since, for another one.
    """
    if outcomes:
        await _close(dialect).executemany(conn, outcomes)


@cache
def _close(dialect: str) -> Precompiled:
    lease = peer_leases.c
    now: ColumnElement[float] = bindparam("p_now", type_=Double())
    granted_by: ColumnElement[float] = bindparam("p_granted_by", type_=Double())
    oldest = (
        select(lease.id)
        .where(
            lease.peer_id == peer_id_of("peer_key"),
            lease.expires_at > now,
            lease.closed_at.is_(None),
            lease.leased_at <= granted_by,
        )
        .order_by(case((lease.content_id == content_id_of("cid"), 0), else_=1), lease.leased_at, lease.id)
        .limit(1)
    )
    if dialect == "postgresql":
        # Two outcomes for one peer in concurrent transactions must close two different leases.
        oldest = oldest.with_for_update(skip_locked=True)
    stmt = update(peer_leases).where(lease.id == oldest.scalar_subquery()).values(closed_at=now)
    return Precompiled(stmt, dialect)


async def prune_expired_leases(conn: AsyncConnection, now: float, limit: int) -> int:
    """Delete up to ``limit`` lapsed leases, open or closed (queries already ignore them)."""
    lapsed = (
        select(peer_leases.c.id)
        .where(peer_leases.c.expires_at <= now)
        .order_by(peer_leases.c.expires_at)
        .limit(limit)
    )
    result = await conn.execute(delete(peer_leases).where(peer_leases.c.id.in_(lapsed)))
    return int(result.rowcount or 0)


async def shift_held_leases(
    conn: AsyncConnection, node_id: int, moved_at: float, leap: float, tolerance: float
) -> int:
    """Move this node's leases granted by the clock held before a leap of ``leap`` seconds, and open
    by that clock when the new one reads ``moved_at``, forward by the leap: by the new clock they
    would lapse the leap early (all at once, for a leap beyond ``lease_ttl_s``).

    Only those. Granted by the held clock means no later than its time at the move,
    ``moved_at - leap`` (plus ``tolerance``, the skew a clock may have): leases granted on a correct
    clock (after the move, or by another process or host of this database) and leases already
    moved (by a process that accepted the same leap before) are dated later whenever the leap
    exceeds their age plus the tolerance; for a smaller leap such a lease may be moved, and then
    counts for at most the leap longer (QA: a restart after an acceptance moved lapsed ones a day).
    A lease open by the held clock is not left to lapse early, which would let its peer be handed
    out past its cap. ``tracker.leaseclock`` decides when this runs: between the work done with
    held readings and the work done with new ones (until it runs, readings are the held clock's,
    so the move is dated by when it runs, not by the acceptance).
    """
    lease = peer_leases.c
    held_now = moved_at - leap
    stmt = (
        update(peer_leases)
        .where(
            lease.node_id == node_id,
            lease.leased_at <= held_now + tolerance,
            lease.expires_at > held_now,
        )
        .values(leased_at=lease.leased_at + leap, expires_at=lease.expires_at + leap)
    )
    return int((await conn.execute(stmt)).rowcount or 0)

"""Reading deltas: what this node holds per origin (its vectors), and the rows a neighbour lacks.

Rows are read in version order per origin, within a row budget, and turned into the wire's
``PeerState`` / ``MappingState``; a peer row carries its samples only where the neighbour lacks them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from ...gossip.protocol import MappingState, OriginDelta, PeerState
from ...schema import bandwidth_samples, content_peers, contents, nodes, peer_stats, peers
from .._sql import IN_CHUNK, PEER_STATE_COLUMNS


async def vectors(conn: AsyncConnection) -> tuple[dict[str, int], dict[str, int]]:
    """What a message tells the other side this node holds, per origin: the version vector (the
    highest version held completely) and the samples vector (every row whose samples changed by
    then is held with them; not the local node)."""
    n = nodes.c
    rows = (await conn.execute(select(n.node_key, n.clock, n.samples_clock, n.is_local))).all()
    # A clock below 0 (stored by a merge before 2026-12-05 from a row that asked for samples of
    # "version 0") holds what 0 does, nothing; sent as it is, it failed the message's validation.
    return (
        {str(key): max(int(clock), 0) for key, clock, _, _ in rows},
        {str(key): max(int(samples), 0) for key, _, samples, local in rows if not local},
    )


# -- reading deltas -----------------------------------------------------------------------------


async def _rows_lacking(
    conn: AsyncConnection, origins: Sequence[tuple[int, int, int]], cap: int
) -> dict[int, int]:
    """Per origin (node id, the other side's clock of it, this node's), the rows stamped between the
    two, each table's count stopped at ``cap``: each origin walks at most ``cap`` entries of each
    table's (node_id, version) index, so a backlog of 600,000 rows costs what 5,000 do. One
    statement on Postgres (arrays: one text, so one prepared statement), one per ``IN_CHUNK``
    origins on SQLite."""
    if not origins:
        return {}
    if conn.dialect.name == "postgresql":
        ids, bases, clocks = (list(column) for column in zip(*origins, strict=True))
        rows = await conn.execute(
            text(_LACKING_PG), {"ids": ids, "bases": bases, "clocks": clocks, "cap": cap}
        )
        return {int(n): int(count) for n, count in rows.all()}
    counts: dict[int, int] = {}
    for start in range(0, len(origins), IN_CHUNK):
        chunk = origins[start : start + IN_CHUNK]
        binds: dict[str, int] = {"cap": cap}
        for i, (node_id, base, clock) in enumerate(chunk):
            binds.update({f"n{i}": node_id, f"b{i}": base, f"c{i}": clock})
        values = ", ".join(f"(:n{i}, :b{i}, :c{i})" for i in range(len(chunk)))
        rows = await conn.execute(
            text(f"WITH o (node_id, base, clock) AS (VALUES {values}) {_LACKING}"), binds
        )
        counts.update((int(n), int(count)) for n, count in rows.all())
    return counts


_LACKING_IN = (
    "(SELECT count(*) FROM (SELECT 1 FROM {table} t WHERE t.node_id = o.node_id AND t.version > o.base "
    "AND t.version <= o.clock LIMIT :cap) AS {table}_lacking)"
)
#: Correlated, bounded counts over the origins in ``o`` (both engines take a subquery in FROM that
#: names the outer query's row).
_LACKING = (
    "SELECT o.node_id, "
    + _LACKING_IN.format(table="peer_stats")
    + " + "
    + _LACKING_IN.format(table="content_peers")
    + " FROM o"
)
_LACKING_PG = (
    "WITH o AS (SELECT * FROM unnest(CAST(:ids AS BIGINT[]), CAST(:bases AS BIGINT[]), "
    "CAST(:clocks AS BIGINT[])) AS u (node_id, base, clock)) " + _LACKING
)

#: Origins a message visits at most (an eighth of them the most behind); the rest go in the
#: follow-ups (``more``). Each costs four statements and a thread hop (~2 ms), rows or not: an
#: origin gone for good, whose rows every tracker has forgotten, still has a clock to send (it
#: answers another tracker's ask for that origin: skipping it lost a live mapping for good, QA
#: round 53). 10,000 of them took 70 s to build a new neighbour's first message, past its timeout
#: at every round, and it never joined (QA round 50).
MAX_ORIGINS = 256


@dataclass(slots=True)
class Delta:
    """Rows of one origin for one neighbour, and whether limits cut it short."""

    deltas: list[OriginDelta]
    truncated: bool


async def read_deltas(
    conn: AsyncConnection,
    vector: dict[str, int],
    skip: Iterable[str],
    max_rows: int,
    window: int,
    *,
    samples: dict[str, int] | None = None,
    every_sample: bool = False,
) -> Delta:
    """Every origin's rows with versions above ``vector`` (what the other side holds), up to ``max_rows``.

    Rows are read in version order; when a table fills the budget, the delta ends before the last
    version read (which may be incomplete) and says so with ``upto``, so the receiver's clock never
    claims a version it does not fully hold. A version is never split: one bigger than what is left
    of the budget (another tracker's ``stamp_chunk`` above this one's ``max_rows``) goes whole and
    ends the message, so every origin reached completes at least one version.

    A peer row carries its samples only if they changed after that origin's entry in ``samples``,
    the other side's samples clocks (all of them without, or with ``every_sample``, for a version 1
    neighbour).
    """
    samples_clocks = {} if samples is None or every_sample else samples
    skipped = set(skip)
    out: list[OriginDelta] = []
    budget, truncated = max_rows, False
    origins = [
        (int(node_id), str(key), int(clock))
        for node_id, key, clock in (
            await conn.execute(select(nodes.c.id, nodes.c.node_key, nodes.c.clock))
        ).all()
        if key not in skipped and clock > vector.get(key, 0)
    ]
    # The origins with the fewest rows the other side lacks go first: a few fresh rows of every
    # tracker reach it in the next message while a big backlog (a new tracker's first contact, a
    # relay's catch-up) takes the rest of the budget, where key order held everyone sorted after such
    # an origin back until it was drained, for as many rounds as that took. Counted, not read off the
    # versions: they follow the clock in milliseconds, and an origin quiet for 30 s with one new row
    # was 30,000 behind a backlog stamped in one second (QA round 67).
    lacking = await _rows_lacking(
        conn, [(node_id, vector.get(key, 0), clock) for node_id, key, clock in origins], max_rows + 1
    )
    pending = sorted(
        ((lacking[node_id], key, node_id, clock) for node_id, key, clock in origins),
        key=lambda origin: (origin[0], origin[1]),
    )
    if len(pending) > MAX_ORIGINS:
        # The most behind get a few places too, still after the others: cut at MAX_ORIGINS alone,
        # origins that each changed between two messages, that many, kept a backlog out of every
        # message for good, and a newcomer got live data only after every forgotten origin, whose
        # clocks are small (QA round 54).
        most_behind = min(MAX_ORIGINS - 1, max(1, MAX_ORIGINS // 8))
        pending = pending[: MAX_ORIGINS - most_behind] + pending[len(pending) - most_behind :]
        truncated = True
    for _, key, node_id, clock in pending:
        base = vector.get(key, 0)
        if budget <= 0:
            truncated = True
            break
        # Not above the clock: rows held beyond it (after an ask lowered it below a deleted mapping,
        # or a merge whose base was above it) are not all there is up to them, and the first of them
        # passed for a version too big for the budget below, claimed complete with the deleted
        # mapping missing (QA round 38: a tracker that synced that origin from here never got it).
        peer_rows = await _peer_rows(conn, node_id, base, budget + 1, clock)
        mapping_rows = await _mapping_rows(conn, node_id, base, budget + 1, clock)
        upto = int(clock)
        for rows in (peer_rows, mapping_rows):
            if len(rows) > budget:  # this table alone fills the budget: stop before its last version
                upto = min(upto, int(rows[budget - 1].version) - 1)
        # The first version held above base (none: the rows up to the clock changed again since, and
        # the delta only raises the receiver's clock).
        first = min((int(rows[0].version) for rows in (peer_rows, mapping_rows) if rows), default=upto)
        peer_rows = [r for r in peer_rows if r.version <= upto]
        mapping_rows = [r for r in mapping_rows if r.version <= upto]
        while len(peer_rows) + len(mapping_rows) > budget:  # together too many: cut the newest version
            upto = max([r.version for r in peer_rows] + [r.version for r in mapping_rows]) - 1
            peer_rows = [r for r in peer_rows if r.version <= upto]
            mapping_rows = [r for r in mapping_rows if r.version <= upto]
        if upto < first:
            # Not even the first version fits what is left of the budget (stamped by a tracker whose
            # stamp_chunk is above this one's max_rows, or the origins before it used the budget):
            # it goes whole, over the budget, and ends the message. Stopping here starved this
            # origin and every later one for good (QA round 6); leaving it to a message where it
            # came first starved it while fresh versions of other origins always came first (QA
            # round 9). A message is so at most max_rows - 1 rows plus one version.
            truncated = True
            upto = first
            peer_rows = await _peer_rows(conn, node_id, base, None, upto)
            mapping_rows = await _mapping_rows(conn, node_id, base, None, upto)
        if upto < clock:
            truncated = True
        samples_base = min(samples_clocks.get(key, 0), base)
        carried = {r.peer_id for r in peer_rows if _carries(r, samples_base)}
        found = await _samples(conn, node_id, sorted(carried), window)
        samples_upto = await _samples_upto(conn, node_id, samples_base, upto)
        # Validating a full message's rows is 50-100 ms of CPU: in a thread, so the event loop
        # serves selections meanwhile (it held them up to ~0.2 s a message, measured).
        out.append(
            await asyncio.to_thread(
                _origin_delta,
                peer_rows,
                {peer: found.get(peer, []) for peer in carried},
                mapping_rows,
                origin=key,
                base=base,
                upto=upto,
                samples_base=samples_base,
                samples_upto=samples_upto,
            )
        )
        # A cut origin does not end the message: a later one may fit in what the cut left.
        budget -= len(peer_rows) + len(mapping_rows)
    return Delta(out, truncated)


def _origin_delta(
    peer_rows: Sequence[Any],
    samples: dict[int, list[tuple[float, int]]],
    mapping_rows: Sequence[Any],
    **head: Any,
) -> OriginDelta:
    """The rows as the wire's; a peer row carries its samples if ``samples`` has its peer."""
    return OriginDelta(
        **head,
        peers=[_peer_state(r, samples.get(r[0])) for r in peer_rows],
        mappings=[_mapping_state(r) for r in mapping_rows],
    )


def _carries(row: Any, samples_base: int) -> bool:
    """Whether the receiver may lack the row's samples: they changed after its samples clock.

    A stamped row always has a samples version; a null one would be sent with its samples, which is
    never wrong. So is one of version 0 (a snapshot's, relayed): sent bare it would ask the receiver
    for samples from before any version, which no message can carry (fuzzing).
    """
    version = row.samples_version
    return version is None or version == 0 or version > samples_base


async def _samples_upto(conn: AsyncConnection, node_id: int, samples_base: int, upto: int) -> int:
    """How far the receiver's samples clock may go once it holds this delta.

    Every row whose samples changed in (samples_base, upto] must be in it, with them. One that is
    not (its version is past ``upto``: the delta was cut, or the row changed again after the stamp
    and awaits the next) stops the clock just before its samples version.
    """
    ps = peer_stats.c
    pending = func.min(ps.samples_version)
    first = upto + 1
    for outside in (ps.version > upto, ps.version.is_(None)):  # two index ranges, not an OR
        stmt = select(pending).where(ps.node_id == node_id, outside, ps.samples_version > samples_base)
        found = (await conn.execute(stmt)).scalar()
        if found is not None:
            first = min(first, int(found))
    return min(upto, first - 1)


# Both row reads order by version alone, the order of the (node_id, version) index, so a read stops
# after ``limit`` rows whatever the planner believes. Tie-breakers within a version (the delta cuts
# whole versions, so they never mattered) made Postgres sort every row past ``base`` when its
# statistics predated the stamping (version all NULL at the last ANALYZE: an estimate of one row): a
# first contact of the 100k benchmark swarm read each 5,000-row message in ~1.5 s, 218 s in all.


async def _peer_rows(
    conn: AsyncConnection, node_id: int, base: int, limit: int | None, upto: int | None = None
) -> Sequence[Any]:
    ps = peer_stats.c
    stmt = (
        select(ps.peer_id, *PEER_STATE_COLUMNS, ps.updated_at, ps.version, ps.samples_version)
        .join(peers, peers.c.id == ps.peer_id)
        .where(ps.node_id == node_id, ps.version > base)
        .order_by(ps.version)
        .limit(limit)
    )
    if upto is not None:
        stmt = stmt.where(ps.version <= upto)
    return (await conn.execute(stmt)).all()


async def _mapping_rows(
    conn: AsyncConnection, node_id: int, base: int, limit: int | None, upto: int | None = None
) -> Sequence[Any]:
    cp = content_peers.c
    stmt = (
        select(
            contents.c.content_key,
            peers.c.peer_key,
            cp.available,
            cp.since,
            cp.last_confirmed,
            cp.changed_at,
            cp.version,
        )
        .join(contents, contents.c.id == cp.content_id)
        .join(peers, peers.c.id == cp.peer_id)
        .where(cp.node_id == node_id, cp.version > base)
        .order_by(cp.version)
        .limit(limit)
    )
    if upto is not None:
        stmt = stmt.where(cp.version <= upto)
    return (await conn.execute(stmt)).all()


async def _samples(
    conn: AsyncConnection, node_id: int, peer_ids: list[int], window: int
) -> dict[int, list[tuple[float, int]]]:
    """Each peer's latest ``window`` samples from this origin, newest first."""
    s = bandwidth_samples.c
    found: dict[int, list[tuple[float, int]]] = {}
    for start in range(0, len(peer_ids), IN_CHUNK):
        ranked = (
            select(
                s.peer_id,
                s.at,
                s.bytes_per_sec,
                func.row_number()
                .over(partition_by=s.peer_id, order_by=(s.at.desc(), s.id.desc()))
                .label("rn"),
            )
            .where(s.node_id == node_id, s.peer_id.in_(peer_ids[start : start + IN_CHUNK]))
            .subquery()
        )
        stmt = select(ranked.c.peer_id, ranked.c.at, ranked.c.bytes_per_sec).where(ranked.c.rn <= window)
        # Rows come grouped by peer, typed by the driver (double and bigint columns): no per-sample
        # lookups or conversions, which were a third of reading a first contact's samples.
        peer: int | None = None
        held: list[tuple[float, int]] = []
        for peer_id, at, bps in (await conn.execute(stmt.order_by(ranked.c.peer_id, ranked.c.rn))).all():
            if peer_id != peer:
                peer, held = peer_id, []
                found[peer_id] = held
            held.append((at, bps))
    return found


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


# Rows are unpacked by position: attribute access on a result row cost ~11 us per peer row, as much
# as validating the PeerState; the column order is _peer_rows' and _mapping_rows' select list.


def _peer_state(r: Any, samples: list[tuple[float, int]] | None) -> PeerState:
    (_, key, first_seen, online, online_since, last_seen, uptime_s, served, failed) = r[:9]
    (success_weight, failure_weight, evidence_at, updated_at, version, samples_version) = r[9:]
    return PeerState(
        peer=key,
        first_seen=float(first_seen),
        online=bool(online),
        online_since=_float_or_none(online_since),
        last_seen=float(last_seen),
        uptime_s=float(uptime_s),
        served=int(served),
        failed=int(failed),
        success_weight=float(success_weight),
        failure_weight=float(failure_weight),
        evidence_at=_float_or_none(evidence_at),
        updated_at=float(updated_at),
        version=int(version),
        samples=samples,
        samples_version=int(version if samples_version is None else samples_version),
    )


def _mapping_state(r: Any) -> MappingState:
    cid, peer, available, since, last_confirmed, changed_at, version = r
    return MappingState(
        cid=cid,
        peer=peer,
        available=bool(available),
        since=float(since),
        last_confirmed=float(last_confirmed),
        changed_at=float(changed_at),
        version=int(version),
    )

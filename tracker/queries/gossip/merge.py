"""Merging what neighbours send, and remembering message nonces against replays.

The merge rules (docs/gossip.md), each a join-semilattice so that messages can be applied any number of
times, in any order, through any relay path:

- ``peer_stats`` rows are registers owned by their origin: a row replaces the stored one only with a
  higher version (a snapshot's rows, all version 0, replace a snapshot's by ``updated_at``); the
  lifetime counters take the maximum anyway, so no message lowers them, unless the origin wrote the
  newer row more than ``MIN_PEER_RETENTION_S`` after the stored one: it may have forgotten the row
  meanwhile and started it again, and its counters are then the ones that stand
  (without a reset between, counters only grow at their origin, and the two rules agree).
- ``content_peers`` rows are last-writer-wins by ``(changed_at, origin key)``, and for the same
  origin by version (``lww_newer`` plus the version): the same rule as the local write path.
- ``peers.first_seen`` and ``contents.first_seen`` take the minimum.
- an origin's samples are replaced with its peer row. A row sent without them (its samples version is
  within the receiver's samples clock) applies only over a stored row at least as new as its
  samples; otherwise the receiver keeps its row and lowers its clocks of that origin, so the next
  delta brings it with its samples.
Nothing a message says about the receiving node's own origin is applied; but a sender's vector
holding versions of it beyond the node's own clock (its database was restored from a copy) raises
that clock, and its rows are sent again (``catch_up_own_clock``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from operator import itemgetter
from typing import Any

from sqlalchemy import BigInteger, Integer, and_, bindparam, case, delete, func, literal, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from ...compiled import BulkInsert, Precompiled, Rows, RowsStatement
from ...config import MIN_PEER_RETENTION_S
from ...db import insert_for
from ...gossip.protocol import MappingState, OriginDelta, PeerState
from ...schema import bandwidth_samples, content_peers, contents, gossip_nonces, nodes, peer_stats, peers
from .._sql import IN_CHUNK, custom_plans, greatest, node_key_of, one_of
from ..writes import upsert_keys

#: Lookups by key take bigger IN lists than IN_CHUNK: a round of heartbeats resolves every peer
#: of the message.
_KEY_CHUNK = 2000


@dataclass(slots=True)
class MergeCounts:
    peers: int = 0
    mappings: int = 0
    #: Origins whose clock was lowered because rows came without samples this node lacks.
    waiting: int = 0


async def catch_up_own_clock(conn: AsyncConnection, local_key: str, upto: int) -> bool:
    """Raise this node's clock to ``upto``, a neighbour's vector entry for it, if that is ahead, and
    mark every row of its own origin changed; whether it was behind (its database went back in time:
    a file restored from a copy).

    The neighbour holds every version up to ``upto``; left as it was, the node would stamp new
    changes with versions they already have, and they would ignore them. Re-stamped above ``upto``,
    its whole state travels again (counters still take the maximum of old and new on the far side).
    """
    local = (await conn.execute(select(nodes.c.id, nodes.c.clock).where(nodes.c.node_key == local_key))).one()
    if upto <= local.clock:
        return False
    for table in (peer_stats, content_peers):
        values: dict[str, Any] = {"version": None}
        if table is peer_stats:
            values["samples_version"] = None
        await conn.execute(update(table).where(table.c.node_id == local.id).values(**values))
    await conn.execute(update(nodes).where(nodes.c.id == local.id).values(clock=upto))
    return True


async def claim_nonce(
    conn: AsyncConnection, dialect: str, nonce: str, node_key: str, expires_at: float, now: float
) -> bool:
    """Remember a message's nonce; ``False`` if it was seen before (a replay). Forgets expired ones."""
    await conn.execute(delete(gossip_nonces).where(gossip_nonces.c.expires_at < now))
    stmt = (
        insert_for(dialect, gossip_nonces)
        .values(nonce=nonce, node_key=node_key, expires_at=expires_at)
        .on_conflict_do_nothing()
    )
    return bool((await conn.execute(stmt)).rowcount)


async def merge(
    conn: AsyncConnection,
    dialect: str,
    local_key: str,
    deltas: Sequence[OriginDelta],
    window: int,
    now: float,
) -> MergeCounts:
    """Apply deltas in the caller's transaction; returns how many rows changed.

    ``now`` is when this node takes them: a removal it applies is kept ``tombstone_keep_s`` from
    then, however old its date (a neighbour back from a partition, a late relay).

    An origin named twice in a message (nothing refuses it) is applied copy after copy, in rounds
    of one copy per origin: a round reads what is stored before it writes, and a second copy read
    with the first it found its rows missing and waited for them (QA round 71)."""
    copies: dict[str, list[OriginDelta]] = {}
    for delta in deltas:
        if delta.origin != local_key:  # this node is the authority on its own observations
            copies.setdefault(delta.origin, []).append(delta)
    counts = MergeCounts()
    for nth in range(max((len(c) for c in copies.values()), default=0)):
        done = await _merge_round(
            conn, dialect, [c[nth] for c in copies.values() if nth < len(c)], window, now
        )
        counts.peers += done.peers
        counts.mappings += done.mappings
        counts.waiting += done.waiting
    return counts


async def _merge_round(
    conn: AsyncConnection, dialect: str, deltas: Sequence[OriginDelta], window: int, now: float
) -> MergeCounts:
    """``merge`` of deltas of distinct origins."""
    counts = MergeCounts()
    # Each table's rows are locked in one order over the whole message, the write path's (keys by
    # code point: peers, then contents, then mappings by content and peer key), and the tables in
    # its order too; per origin only the origin's own rows (and its tracker_nodes row, last, origins
    # in key order). Origin by origin, each with its keys and mappings in order, a merge locked a
    # later key of one origin before an earlier one of the next: it deadlocked against ingest
    # batches (QA round 66: 4 in a 36-minute soak, all retried).
    origins = sorted(deltas, key=lambda d: d.origin)
    node_ids = [await _origin_id(conn, dialect, delta.origin) for delta in origins]
    # The earliest sighting anywhere in the message (min is what keeps first_seen order-free).
    sightings = [
        _earliest([(p.peer, p.first_seen) for p in d.peers] + [(m.peer, m.since) for m in d.mappings])
        for d in origins
    ]
    peer_ids, stored = await _ensure_keys(
        conn, dialect, peers, peers.c.peer_key, list(zip(sightings, node_ids, strict=True))
    )
    waiting: list[tuple[int, int] | None] = []
    for delta, node_id, held in zip(origins, node_ids, stored, strict=True):
        missing = None
        if delta.peers:
            applied, missing = await _merge_peers(conn, dialect, node_id, delta.peers, peer_ids, held, window)
            counts.peers += applied
        waiting.append(missing)
    if any(delta.mappings for delta in origins):
        cids = _earliest((m.cid, m.since) for delta in origins for m in delta.mappings)
        content_ids, _ = await _ensure_keys(conn, dialect, contents, contents.c.content_key, [(cids, None)])
        counts.mappings += await _merge_mappings(
            conn, dialect, list(zip(origins, node_ids, strict=True)), content_ids, peer_ids, now
        )
    for delta, node_id, missing in zip(origins, node_ids, waiting, strict=True):
        n = nodes.c
        # The samples clock first: it may move only if this node held what the sender assumed for both.
        await conn.execute(
            update(nodes)
            .where(n.id == node_id, n.clock >= delta.base, n.samples_clock >= delta.samples_base)
            .values(samples_clock=greatest(dialect, n.samples_clock, _const(delta.samples_upto)))
        )
        await conn.execute(
            update(nodes)
            .where(n.id == node_id, n.clock >= delta.base)
            .values(clock=greatest(dialect, n.clock, _const(delta.upto)))
        )
        if missing is not None:  # rows left out for want of their samples: ask for them again
            version, samples_version = missing  # never below 0: nothing held (QA, a clock of -1)
            await conn.execute(
                update(nodes).where(n.id == node_id, n.clock >= version).values(clock=max(version - 1, 0))
            )
            await conn.execute(
                update(nodes)
                .where(n.id == node_id, n.samples_clock >= samples_version)
                .values(samples_clock=max(samples_version - 1, 0))
            )
            counts.waiting += 1
    return counts


def _const(value: int) -> Any:
    return literal(value, BigInteger())


def _earliest(pairs: Iterable[tuple[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, at in pairs:
        if key not in out or at < out[key]:
            out[key] = at
    return out


async def _origin_id(conn: AsyncConnection, dialect: str, key: str) -> int:
    await conn.execute(
        insert_for(dialect, nodes)
        .values(node_key=key, is_local=False, created_at=0.0, clock=0)
        .on_conflict_do_nothing(index_elements=["node_key"])
    )
    return int((await conn.execute(select(nodes.c.id).where(nodes.c.node_key == key))).scalar_one())


async def _ensure_keys(
    conn: AsyncConnection,
    dialect: str,
    table: Any,
    key_column: Any,
    sightings: Sequence[tuple[dict[str, float], int | None]],
) -> tuple[dict[str, int], list[dict[int, int]]]:
    """Key -> id for every key of ``sightings`` (each a key -> earliest sighting map), inserting
    unknown keys and lowering ``first_seen`` where the message knows an earlier sighting; with a
    node id beside a map (peers, per origin), also that origin's stored version of each known peer.

    Known keys are read first and only the others written: in a round of heartbeats every key is
    known, and an upsert per key locked each row for nothing (ON CONFLICT DO UPDATE locks the row even
    when its WHERE is false): ~10 us a key on Postgres. The stored versions come in the same read.
    Every map is read before anything is written, and the writes are one sorted upsert for all of
    them: the write path's lock order (``merge``).
    """
    ids: dict[str, int] = {}
    versions: list[dict[int, int]] = []
    todo: dict[str, float] = {}
    async with custom_plans(conn, dialect):  # the tables may have grown since a plan was cached
        for first_seen, stats_of in sightings:
            if stats_of is None:
                read = select(key_column, table.c.id, table.c.first_seen, literal(None))
            else:
                # A probe of the key per peer: as a join, Postgres (stale statistics) hashed every row
                # of the origin for each chunk of keys.
                ps = peer_stats.c
                version = select(ps.version).where(ps.peer_id == table.c.id, ps.node_id == stats_of)
                read = select(key_column, table.c.id, table.c.first_seen, version.scalar_subquery())
            found = await _chunked(conn, dialect, read, key_column, sorted(first_seen))
            ids.update({str(key): int(id_) for key, id_, _, _ in found})
            versions.append({int(id_): int(version) for _, id_, _, version in found if version is not None})
            known = {str(key): seen for key, _, seen, _ in found}
            for key, at in first_seen.items():
                if (key not in known or at < known[key]) and at < todo.get(key, float("inf")):
                    todo[key] = at
        if todo:
            await upsert_keys(conn, dialect, table.name, todo.items())  # sorted by key
        # A key inserted here (or by a concurrent writer since the read) has no stored row worth reading.
        unknown = sorted(key for key in todo if key not in ids)
        inserted = await _chunked(conn, dialect, select(key_column, table.c.id), key_column, unknown)
    ids.update({str(k): int(i) for k, i in inserted})
    return ids, versions


async def _chunked(
    conn: AsyncConnection, dialect: str, read: Any, key_column: Any, keys: list[str]
) -> list[Any]:
    """The rows of ``read`` for ``keys``, a bounded statement per ``_KEY_CHUNK`` keys."""
    rows: list[Any] = []
    for start in range(0, len(keys), _KEY_CHUNK):
        where = one_of(dialect, key_column, keys[start : start + _KEY_CHUNK])
        rows.extend((await conn.execute(read.where(where))).all())
    return rows


_ROW_FIELDS = (
    "online",
    "online_since",
    "last_seen",
    "uptime_s",
    "success_weight",
    "failure_weight",
    "evidence_at",
    "updated_at",
    "version",
)


#: A peer row's columns as the merge writes them; the precompiled UPDATE binds them with a prefix,
#: as a bind may not share its column's name there.
_ROW_KEYS = (
    "peer_id",
    "node_id",
    "online",
    "online_since",
    "last_seen",
    "uptime_s",
    "served_count",
    "failed_count",
    "success_weight",
    "failure_weight",
    "evidence_at",
    "speed_bps",
    "updated_at",
    "version",
    "samples_version",
)
_BARE_KEYS = tuple(f"b_{key}" for key in _ROW_KEYS)


def _row(
    state: PeerState,
    peer_id: int,
    node_id: int,
    keys: tuple[str, ...] = _ROW_KEYS,
    speed: float | None = None,
) -> dict[str, Any]:
    values = (
        peer_id,
        node_id,
        state.online,
        state.online_since,
        state.last_seen,
        state.uptime_s,
        state.served,
        state.failed,
        state.success_weight,
        state.failure_weight,
        state.evidence_at,
        speed,
        state.updated_at,
        state.version,
        state.samples_at,
    )
    return dict(zip(keys, values, strict=True))


async def _merge_peers(
    conn: AsyncConnection,
    dialect: str,
    node_id: int,
    states: Sequence[PeerState],
    peer_ids: dict[str, int],
    stored: dict[int, int],
    window: int,
) -> tuple[int, tuple[int, int] | None]:
    """Apply peer rows; returns how many changed and, if some could not be, the lowest version and
    samples version among those. ``stored`` holds the versions of this origin's rows as read with the
    peer ids.

    Rows with samples replace older rows and their samples. A row without them is applied only over a
    stored row at least as new as its samples (an origin's samples change only at a stamp, so that
    row holds the very same ones): a stored row always holds its own samples, and relays forward
    consistent rows. Anything else is left for a delta that carries the samples, which the caller
    asks for by lowering its clocks of the origin.
    """
    latest: dict[str, PeerState] = {}
    for state in states:  # one row per peer per statement (Postgres refuses to update a row twice)
        held = latest.get(state.peer)
        if held is None or (state.version, state.samples is not None) > (
            held.version,
            held.samples is not None,
        ):
            latest[state.peer] = state
    ordered = sorted(latest.values(), key=lambda s: peer_ids[s.peer])  # lock order, as ingest does
    carried = [s for s in ordered if s.samples is not None]
    bare = [s for s in ordered if s.samples is None]
    applied, missing = 0, None
    if carried:
        applied += await _merge_with_samples(conn, dialect, node_id, carried, peer_ids, window)
    if bare:
        done, missing = await _merge_without_samples(conn, dialect, node_id, bare, peer_ids, stored)
        applied += done
    return applied, missing


def _row_update(dialect: str, old: Any, new: Any) -> dict[str, Any]:
    """The columns a newer row of the same origin replaces; the counters never go down but after a
    restart of the row (``_counter``)."""
    return {
        **{name: getattr(new, name) for name in _ROW_FIELDS},
        "served_count": _counter(dialect, old, old.served_count, new.updated_at, new.served_count),
        "failed_count": _counter(dialect, old, old.failed_count, new.updated_at, new.failed_count),
    }


def _counter(dialect: str, old: Any, stored: Any, updated_at: Any, incoming: Any) -> Any:
    """The maximum of the two counts, or the incoming one if its origin wrote it more than
    ``MIN_PEER_RETENTION_S`` after the stored row: the origin may have forgotten that row and
    started again from nothing (module doc)."""
    restarted = updated_at - old.updated_at > literal(MIN_PEER_RETENTION_S)
    return case((restarted, incoming), else_=greatest(dialect, stored, incoming))


async def _merge_with_samples(
    conn: AsyncConnection,
    dialect: str,
    node_id: int,
    states: Sequence[PeerState],
    peer_ids: dict[str, int],
    window: int,
) -> int:
    rows = [_row(s, peer_ids[s.peer], node_id, speed=_rolling_speed(s.samples or [], window)) for s in states]
    ins = insert_for(dialect, peer_stats)
    new, old = ins.excluded, peer_stats.c
    stmt = ins.on_conflict_do_update(
        index_elements=[old.peer_id, old.node_id],
        set_={
            **_row_update(dialect, old, new),
            "samples_version": new.samples_version,
            "speed_bps": new.speed_bps,
        },
        where=or_(
            old.version.is_(None),
            new.version > old.version,
            # Snapshot rows (version 0, no versions to compare) over snapshot rows: the origin's
            # newer row. The first snapshot of an origin imported stayed for good, and restoring a
            # newer backup of it changed none of its peers (QA round 72).
            and_(new.version == 0, old.version == 0, new.updated_at > old.updated_at),
        ),
    ).returning(peer_stats.c.peer_id)
    applied: set[int] = set()
    for start in range(0, len(rows), IN_CHUNK):
        result = await conn.execute(stmt, rows[start : start + IN_CHUNK])
        applied.update(int(r[0]) for r in result.all())
    if not applied:
        return 0
    changed = sorted(applied)
    s = bandwidth_samples.c
    for start in range(0, len(changed), IN_CHUNK):
        await conn.execute(
            delete(bandwidth_samples).where(
                s.node_id == node_id, s.peer_id.in_(changed[start : start + IN_CHUNK])
            )
        )
    by_id = {peer_ids[state.peer]: state for state in states}
    samples = [(pid, node_id, at, bps) for pid in changed for at, bps in reversed(by_id[pid].samples or [])]
    await _samples_insert(dialect).run(conn, samples)
    return len(applied)


@cache
def _samples_insert(dialect: str) -> BulkInsert:
    return BulkInsert(bandwidth_samples, ("peer_id", "node_id", "at", "bytes_per_sec"), dialect)


def _rolling_speed(samples: Sequence[tuple[float, int]], window: int) -> float | None:
    """The mean of the latest ``window`` samples, as the write path's SQL computes it over the stored
    ones (newest ``at`` first; among equal times the one listed first, inserted last); none: null.

    Computed from the message instead of read back: the replaced row's speed was a second UPDATE
    with a subquery per peer. Equal to the SQL's on SQLite; Postgres averages in ``numeric`` and may
    round the last bit of the double differently (1 in 3,000 random cases).
    """
    latest = sorted(samples, key=itemgetter(0), reverse=True)[:window]  # stable: ties keep their order
    if not latest:
        return None
    return sum(bps for _, bps in latest) / len(latest)


def _bind(name: str) -> Any:
    return bindparam(name, type_=BigInteger())


_NEW_UPDATED_AT = bindparam("b_updated_at", type_=peer_stats.c.updated_at.type)


@cache
def _bare_update(dialect: str) -> Precompiled:
    """A newer row over the stored one, if that holds the samples it names (is at least as new).

    The version guard again in SQL: a concurrent merge in another process may have moved the row
    since. Compiled once: SQLAlchemy's per-row parameter handling cost more than the
    UPDATE itself for a round of heartbeats.
    """
    ps = peer_stats.c
    return Precompiled(
        update(peer_stats)
        .where(
            ps.peer_id == bindparam("b_peer_id", type_=BigInteger()),
            ps.node_id == bindparam("b_node_id", type_=Integer()),
            # Never NULL on another origin's row; COALESCE keeps Postgres's generic plan of this
            # prepared statement off the (node_id, version) index, which it preferred to the key
            # (a range over every row of the origin per UPDATE: minutes for one round).
            # The stored row was at least as new as the samples when read, and versions only grow.
            func.coalesce(ps.version, -1) < bindparam("b_version", type_=BigInteger()),
        )
        .values(
            **{name: bindparam(f"b_{name}", type_=peer_stats.c[name].type) for name in _ROW_FIELDS},
            samples_version=bindparam("b_samples_version", type_=BigInteger()),
            served_count=_counter(dialect, ps, ps.served_count, _NEW_UPDATED_AT, _bind("b_served_count")),
            failed_count=_counter(dialect, ps, ps.failed_count, _NEW_UPDATED_AT, _bind("b_failed_count")),
        ),
        dialect,
    )


async def _merge_without_samples(
    conn: AsyncConnection,
    dialect: str,
    node_id: int,
    states: Sequence[PeerState],
    peer_ids: dict[str, int],
    stored: dict[int, int],
) -> tuple[int, tuple[int, int] | None]:
    """Newer rows over stored rows holding their samples: one UPDATE each, samples and speed kept.

    ``stored`` may be stale by now (a concurrent merge); the UPDATE checks the version again.
    """
    updates, lacking = [], []
    for state in states:
        version = stored.get(peer_ids[state.peer])
        if version is not None and version >= state.version:
            continue  # this node already holds this row or a newer one
        if version is not None and version >= state.samples_at:
            updates.append(_row(state, peer_ids[state.peer], node_id, _BARE_KEYS))
        else:
            lacking.append(state)
    if updates:
        await _bare_update(dialect).executemany(conn, updates)
    if not lacking:
        return len(updates), None
    return len(updates), (min(s.version for s in lacking), min(s.samples_at for s in lacking))


async def _merge_mappings(
    conn: AsyncConnection,
    dialect: str,
    origins: Sequence[tuple[OriginDelta, int]],
    content_ids: dict[str, int],
    peer_ids: dict[str, int],
    now: float,
) -> int:
    """Apply the message's mappings, every origin's in one pass, rows in (content key, peer key)
    order as the write path locks them; returns how many changed.

    One row per (content, peer) (Postgres refuses to update a row twice in a statement): the one
    that wins by the rule the statement applies against the stored row, later ``changed_at``, then
    the larger origin key (by code point, as ``node_key_of`` compares on either engine), then for
    one origin the later version; so the stored row ends as it would applying them one by one.
    """
    latest: dict[tuple[str, str], tuple[tuple[float, str, int], MappingState, int]] = {}
    for delta, node_id in origins:
        for m in delta.mappings:
            rank = (m.changed_at, delta.origin, m.version)
            held = latest.get((m.cid, m.peer))
            if held is None or rank > held[0]:
                latest[(m.cid, m.peer)] = (rank, m, node_id)
    rows = [
        {
            "content_id": content_ids[m.cid],
            "peer_id": peer_ids[m.peer],
            "node_id": node_id,
            "available": m.available,
            "since": m.since,
            "last_confirmed": m.last_confirmed,
            "changed_at": m.changed_at,
            "version": m.version,
            "removed_at": None if m.available else now,
        }
        for _, (_, m, node_id) in sorted(latest.items())
    ]
    statement, applied = _mappings_upsert(dialect), 0
    for start in range(0, len(rows), _MAPPING_CHUNK):
        applied += await statement.run(conn, rows[start : start + _MAPPING_CHUNK])
    return applied


#: Mapping rows per upsert: on Postgres one statement of arrays each (a message's 5,000 rows by
#: default); bounded so a large ``max_rows`` does not make one giant statement.
_MAPPING_CHUNK = 5000


@cache
def _mappings_upsert(dialect: str) -> RowsStatement:
    """A mapping replaces the stored one when it is newer by the rule every node applies (module doc).

    Compiled once and given arrays on Postgres: SQLAlchemy's multi-row VALUES with RETURNING cost
    ~12 us a row of Python building and binding them, beside the insert's own ~27 us (a first
    contact's 400,000 mappings). Rows whose ``WHERE`` fails are not counted by the driver, so the
    count is of the rows applied.
    """
    cp = content_peers.c
    names = (
        "content_id",
        "peer_id",
        "node_id",
        "available",
        "since",
        "last_confirmed",
        "changed_at",
        "version",
        "removed_at",  # not sent: when this node takes a removal, which its tombstone is kept from
    )
    row = Rows(dialect, **{name: cp[name].type for name in names})
    ins = row.insert(content_peers, {name: row[name] for name in names})
    new, old = ins.excluded, content_peers.c
    newer = or_(
        new.changed_at > old.changed_at,
        and_(
            new.changed_at == old.changed_at,
            or_(
                and_(new.node_id == old.node_id, or_(old.version.is_(None), new.version > old.version)),
                and_(
                    new.node_id != old.node_id,
                    node_key_of(new.node_id, dialect) > node_key_of(old.node_id, dialect),
                ),
            ),
        ),
    )
    stmt = ins.on_conflict_do_update(
        index_elements=[old.content_id, old.peer_id],
        set_={name: getattr(new, name) for name in names[2:]},
        where=newer,
    )
    return RowsStatement(stmt, row)  # one row per (content, peer): the caller keeps the latest

"""The write path's statements: one batch of events becomes a few statements per table, not one per event.

On SQLite each is an executemany of a statement compiled once; on Postgres each carries the batch's
rows as arrays (``compiled.Rows``), and a peer or mapping named several times takes that many statements.
"""

from __future__ import annotations

import hashlib
import operator
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Double,
    Integer,
    and_,
    bindparam,
    case,
    cast,
    func,
    null,
    or_,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import ColumnElement

from .. import reputation as rep
from ..compiled import Precompiled, Rows, RowsStatement
from ..config import TrackerConfig
from ..db import DriverSQL, insert_for
from ..events import (
    SIGHTINGS,
    ContentAvailable,
    ContentUnavailable,
    Event,
    PeerOffline,
    SpeedSample,
    UploadOutcome,
)
from ..schema import bandwidth_samples, content_peers, contents, nodes, peer_stats, peers, upload_outcomes
from ._sql import content_id_of, greatest, least, lww_newer, num, peer_id_of
from .leases import close_oldest_leases

# ---------------------------------------------------------------------------------------------
# Node identity
# ---------------------------------------------------------------------------------------------


async def ensure_local_node(conn: AsyncConnection, dialect: str, now: float) -> tuple[int, str]:
    """Create this database's local node on first use (racing processes agree on one); return it."""
    stmt = (
        insert_for(dialect, nodes)
        .values(node_key=uuid.uuid4().hex, is_local=True, created_at=now)
        .on_conflict_do_nothing()
    )
    await conn.execute(stmt)
    row = (await conn.execute(select(nodes.c.id, nodes.c.node_key).where(nodes.c.is_local))).one()
    return int(row.id), str(row.node_key)


# ---------------------------------------------------------------------------------------------
# The write path
# ---------------------------------------------------------------------------------------------


#: ``peer_stats.last_seen`` of a row that no sighting has reached yet (one a failed report created).
NEVER_SEEN = 0.0


@dataclass(frozen=True, slots=True)
class Timed:
    """An event with its time resolved (``at`` or the clock's now)."""

    event: Event
    at: float


async def apply_events(
    conn: DriverSQL,
    dialect: str,
    node_id: int,
    batch: Sequence[Timed],
    config: TrackerConfig,
    now: float,
) -> None:
    """Apply a batch in the caller's transaction, with a statement count that does not grow with it.

    Rows are sorted by key (stable, so one peer's events keep their order) so that concurrent batches
    on Postgres lock rows in the same order and cannot deadlock each other. There a key's later rows
    go in later statements (``compiled.RowsStatement``), whose rows are all locked already by the first.
    """
    if not batch:
        return
    ordered = sorted(batch, key=lambda t: t.event.peer_id)
    await upsert_keys(conn, dialect, "peers", ((t.event.peer_id, t.at) for t in ordered))
    content_rows = [(cid, t.at) for t in ordered if (cid := _cid_of(t.event)) is not None]
    if content_rows:
        await upsert_keys(conn, dialect, "contents", content_rows)
    await _upsert_peer_stats(conn, dialect, node_id, ordered, config, now)

    outcomes = [t for t in ordered if isinstance(t.event, UploadOutcome)]
    if outcomes:
        await record_outcomes(conn, dialect, node_id, outcomes)
        await close_oldest_leases(
            conn,
            dialect,
            [
                {
                    "peer_key": t.event.peer_id,
                    "cid": t.event.cid,
                    "p_now": now,
                    "p_granted_by": t.at + config.max_clock_skew_s,
                }
                for t in outcomes
                if isinstance(t.event, UploadOutcome)
            ],
        )
    samples = [t for t in ordered if isinstance(t.event, SpeedSample)]
    if samples:
        await record_samples(conn, dialect, node_id, samples)
        await refresh_speeds(
            conn,
            dialect,
            node_id,
            sorted({t.event.peer_id for t in samples}),
            config.bandwidth_window,
            versioned=bool(config.heartbeat_resolution_s),
        )
    mappings = [t for t in batch if isinstance(t.event, ContentAvailable | ContentUnavailable)]
    if mappings:
        mappings.sort(key=lambda t: (t.event.cid, t.event.peer_id))  # type: ignore[union-attr]
        await _upsert_content_peers(conn, dialect, node_id, mappings, now)


def _cid_of(event: Event) -> str | None:
    if isinstance(event, ContentAvailable | ContentUnavailable):
        return event.cid
    if isinstance(event, UploadOutcome):
        return event.cid
    return None


def draw_of(peer_key: str) -> int:
    """``peers.draw``: the first 31 bits of the MD5 of the key's UTF-8 bytes, which Postgres
    computes alike (``('x' || substr(md5(convert_to(peer_key, 'UTF8')), 1, 8))::bit(32)::bit(31)::int``,
    migration 0013; 24 bits before it, which gave peers of a swarm the same draw: see there). A
    hash, not a secret."""
    return int(hashlib.md5(peer_key.encode(), usedforsecurity=False).hexdigest()[:8], 16) >> 1


async def upsert_keys(
    conn: DriverSQL, dialect: str, table_name: str, keys: Iterable[tuple[str, float]]
) -> None:
    """Insert unknown peer or content keys; a sighting older than a key's first_seen lowers it (a late
    event here, an earlier sighting elsewhere in the gossip merge)."""
    earliest: dict[str, float] = {}
    for key, at in keys:
        if key not in earliest or at < earliest[key]:
            earliest[key] = at
    if table_name == "peers":
        rows = [{"k": key, "t": earliest[key], "d": draw_of(key)} for key in sorted(earliest)]
    else:
        rows = [{"k": key, "t": earliest[key]} for key in sorted(earliest)]
    await _keys_upsert(dialect, table_name).run(conn, rows)


@cache
def _keys_upsert(dialect: str, table_name: str) -> RowsStatement:
    if table_name == "peers":
        table, key, row = peers, "peer_key", Rows(dialect, k=peers.c.peer_key.type, t=Double(), d=Integer())
        values = {key: row["k"], "first_seen": row["t"], "draw": row["d"]}
    else:
        table, key, row = contents, "content_key", Rows(dialect, k=contents.c.content_key.type, t=Double())
        values = {key: row["k"], "first_seen": row["t"]}
    stmt = row.insert(table, values)
    # Only an older first sighting (a late event) touches an existing row; and for a peer, a draw
    # that is not its key's: a tracker of an earlier release, still running while the database was
    # upgraded, inserts peers with the column's default 0 or 24 bits (QA round 15), and all of
    # draw 0 share one random number for every seed. The first event of the peer puts it right.
    changed = stmt.excluded.first_seen < table.c.first_seen
    set_: dict[str, Any] = {"first_seen": least(dialect, table.c.first_seen, stmt.excluded.first_seen)}
    if table_name == "peers":
        changed = changed | (stmt.excluded.draw != table.c.draw)
        set_["draw"] = stmt.excluded.draw
    stmt = stmt.on_conflict_do_update(index_elements=[key], set_=set_, where=changed)
    return RowsStatement(stmt, row)  # one row per key: no key repeats


@cache
def _peer_stats_upsert(
    dialect: str, peer_timeout: float, params: rep.ReputationParams, resolution: float = 0.0
) -> RowsStatement:
    """One event folded into its peer's row: presence session, counters, decayed evidence.

    The inserted row is the event as a delta; ON CONFLICT merges it into the stored row.
    Presence is last-writer-wins by time: an event older than ``last_seen`` never flips the state.
    A session that timed out before this event ends at the stored ``last_seen``, whether or not the
    sweeper closed it meanwhile (it keeps ``online_since`` of a session it closes, for this). A failed upload
    (the reporter could not get the chunk, which is no sign the peer is there; the one event whose
    row counts a failure) leaves presence and ``last_seen`` alone. Everything the merge reads of the
    event is in the inserted row (``excluded``): on Postgres one statement carries many (``Rows``).
    """
    row = Rows(
        dialect,
        peer_key=peers.c.peer_key.type,
        p_online=Boolean(),
        p_online_since=Double(),
        p_at=Double(),
        p_served=BigInteger(),
        p_failed=BigInteger(),
        p_sw=Double(),
        p_fw=Double(),
        p_evidence_at=Double(),
        p_speed=Double(),
        p_own=Double(),
        p_report=Double(),
    )
    ins = row.insert(
        peer_stats,
        {
            "peer_id": peer_id_of(row["peer_key"]),
            "node_id": bindparam("node_id", type_=Integer()),
            "online": row["p_online"],
            "online_since": row["p_online_since"],
            "last_seen": row["p_at"],
            "uptime_s": num(0.0),
            "served_count": row["p_served"],
            "failed_count": row["p_failed"],
            "success_weight": row["p_sw"],
            "failure_weight": row["p_fw"],
            "evidence_at": row["p_evidence_at"],
            # A sample's own speed: the first sample's mean, which refresh_speeds stores again
            # after this; to the merge below, what tells a sample from a heartbeat.
            "speed_bps": row["p_speed"],
            "updated_at": bindparam("p_now", type_=Double()),
            "samples_version": null(),
            "own_seen": row["p_own"],
            "report_seen": row["p_report"],
        },
    )
    old, new = peer_stats.c, ins.excluded
    timeout = num(peer_timeout)
    # A success or a sample, reported about the peer by a downloader, is a sighting unless the peer
    # said goodbye (offline, no session kept as the sweeper keeps one; a row a failed report made has
    # no sighting yet): a report arriving after the goodbye, dated at its receipt, brought the peer
    # back online and selected until peer_timeout (QA round 49). The peer's own heartbeat does.
    report = or_(new.evidence_at.is_not(None), new.speed_bps.is_not(None))
    departed = and_(~old.online, old.online_since.is_(None), old.last_seen > num(NEVER_SEEN))
    presence = and_(new.failed_count == 0, ~and_(report, departed))
    # The peer's own events are ordered among themselves (``own_seen``), reports by any sighting: a
    # report is dated at its receipt and a goodbye by the peer's clock, so a report taken first
    # (requests crossing, a relay's batch) was newer than the goodbye, which lost, and the peer stayed
    # online until peer_timeout (QA round 52). A row from before migration 0017 orders by last_seen.
    own = and_(new.failed_count == 0, ~report)
    # By own_seen only while a report set last_seen (``report_seen`` is that time): a process of the
    # release before 0017, running beside this one during an upgrade, moves last_seen alone, and its
    # heartbeat or goodbye is then the peer's latest own event; ordered by own_seen, a late goodbye
    # older than that heartbeat won, and a late heartbeat older than that goodbye revived (QA round 55).
    own_key = case(
        (old.last_seen == old.report_seen, func.coalesce(old.own_seen, old.last_seen)), else_=old.last_seen
    )
    fresh = and_(
        presence,
        case(
            (own, new.last_seen >= own_key),
            else_=new.last_seen >= old.last_seen,
        ),
    )
    # Closed by the sweeper (it timed out: offline, its start kept), not by a goodbye. A late event
    # from within that session finds it as it would have without the sweep: a sweep that happened
    # to run first changed the peer's uptime and session for good (QA round 8).
    swept = and_(~old.online, old.online_since.is_not(None))
    alive = and_(or_(old.online, swept), old.last_seen >= new.last_seen - timeout)
    continues = and_(new.online, alive)
    resumed = and_(fresh, swept, alive)
    # A goodbye older than a report can end a session that report began after it: nothing to add.
    session_end = greatest(dialect, case((alive, new.last_seen), else_=old.last_seen), old.online_since)
    has_outcome = new.evidence_at.is_not(None)
    quiet = _quiet(resolution, old, new, fresh, continues, has_outcome)
    stmt = ins.on_conflict_do_update(
        index_elements=[peer_stats.c.peer_id, peer_stats.c.node_id],
        set_={
            "online": case((fresh, new.online), else_=old.online),
            "online_since": case(
                (~fresh, old.online_since),
                (continues, old.online_since),
                (new.online, new.last_seen),
                else_=None,
            ),
            "uptime_s": old.uptime_s
            + case(
                (and_(fresh, old.online, ~continues), session_end - old.online_since),
                # The sweeper added the session up to old.last_seen: it goes on (take that back),
                # or ends now at this goodbye (add the rest).
                (
                    resumed,
                    case(
                        (new.online, old.online_since - old.last_seen),
                        else_=greatest(dialect, new.last_seen, old.online_since) - old.last_seen,
                    ),
                ),
                else_=num(0.0),
            ),
            "last_seen": case(
                (presence, greatest(dialect, old.last_seen, new.last_seen)), else_=old.last_seen
            ),
            "own_seen": case(
                (own, greatest(dialect, own_key, new.own_seen)),
                else_=old.own_seen,
            ),
            "report_seen": case(
                (
                    and_(presence, report),
                    greatest(dialect, func.coalesce(old.report_seen, new.report_seen), new.report_seen),
                ),
                else_=old.report_seen,
            ),
            "served_count": old.served_count + new.served_count,
            "failed_count": old.failed_count + new.failed_count,
            "success_weight": case(
                (
                    has_outcome,
                    rep.sql_apply_outcome(
                        old.success_weight, old.evidence_at, new.success_weight, new.evidence_at, params
                    ),
                ),
                else_=old.success_weight,
            ),
            "failure_weight": case(
                (
                    has_outcome,
                    rep.sql_apply_outcome(
                        old.failure_weight, old.evidence_at, new.failure_weight, new.evidence_at, params
                    ),
                ),
                else_=old.failure_weight,
            ),
            "evidence_at": case(
                (
                    has_outcome,
                    greatest(dialect, func.coalesce(old.evidence_at, new.evidence_at), new.evidence_at),
                ),
                else_=old.evidence_at,
            ),
            # A quiet write keeps the row's time too: it is gossiped with the row, and decides when
            # every tracker forgets it (queries/forget.py); moved here alone, this node forgot the
            # row up to max_event_age_s later than its neighbours (QA round 27).
            "updated_at": new.updated_at
            if quiet is None
            else case((quiet, old.updated_at), else_=new.updated_at),
            # Changed here: the stamper gives it this node's next version; with a heartbeat
            # resolution, a heartbeat that changes nothing gossip must carry keeps the one it has.
            "version": null() if quiet is None else case((quiet, old.version), else_=null()),
            # samples_version stays: a sample clears it where the speed is refreshed.
        },
    )
    # Rows come in peer order; on Postgres one peer's events go in successive statements.
    return RowsStatement(stmt, row, key=operator.itemgetter("peer_key"))


def _quiet(
    resolution: float,
    old: Any,
    new: Any,
    fresh: ColumnElement[bool],
    continues: ColumnElement[bool],
    has_outcome: ColumnElement[bool],
) -> ColumnElement[bool] | None:
    """Whether the event is quiet, so the row keeps its gossip version and ``updated_at`` (none: no
    ``resolution``, and no event is). Quiet: no outcome, and either late (nothing changes) or a
    sighting that continues the session with ``last_seen`` still in the window of ``resolution``
    seconds its stored value is in.

    Windows rather than "within ``resolution`` of the last gossiped value" because the stored row
    does not remember what was gossiped: a neighbour's ``last_seen`` lags by less than one window.
    """
    if not resolution:
        return None
    window = num(resolution)
    same_window = func.floor(new.last_seen / window) == func.floor(old.last_seen / window)
    # last_seen stays in its window: a later time in it, or none (an own event older than a report,
    # fresh by own_seen, changes nothing gossip carries: QA round 55).
    stays = or_(new.last_seen <= old.last_seen, same_window)
    return and_(~has_outcome, new.failed_count == 0, or_(~fresh, and_(continues, old.online, stays)))


async def _upsert_peer_stats(
    conn: DriverSQL,
    dialect: str,
    node_id: int,
    ordered: Sequence[Timed],
    config: TrackerConfig,
    now: float,
) -> None:
    rows = []
    last_sighting: tuple[str, float] | None = None
    for t in ordered:
        event = t.event
        if isinstance(event, SIGHTINGS):
            # A sighting right after the peer's sighting at the same time changes nothing of its row
            # (a catalog announced in one request, all stamped alike): one row for them, not one
            # round each (``events.check_events_per_peer`` counts them once too).
            if last_sighting == (event.peer_id, t.at):
                continue
            last_sighting = (event.peer_id, t.at)
        else:
            last_sighting = None
        outcome = isinstance(event, UploadOutcome)
        success = outcome and event.success  # type: ignore[union-attr]
        failure = outcome and not event.success  # type: ignore[union-attr]
        heartbeat = not isinstance(event, PeerOffline) and not failure
        rows.append(
            {
                "peer_key": event.peer_id,
                "node_id": node_id,
                "p_online": heartbeat,
                "p_online_since": t.at if heartbeat else None,
                # A failed report is no sighting: a row it creates has none yet (0), so that any
                # sighting, even one dated before the report and arriving after it, counts.
                "p_at": NEVER_SEEN if failure else t.at,
                "p_served": int(success),
                "p_failed": int(failure),
                "p_sw": 1.0 if success else 0.0,
                "p_fw": 1.0 if failure else 0.0,
                "p_evidence_at": t.at if outcome else None,
                "p_speed": float(event.bytes_per_sec) if isinstance(event, SpeedSample) else None,
                # The peer's own event's time; a report's row has none of the peer's yet.
                "p_own": NEVER_SEEN if outcome or isinstance(event, SpeedSample) else t.at,
                # A report's time (a success or a sample: a sighting unless the peer said goodbye).
                "p_report": t.at if success or isinstance(event, SpeedSample) else None,
                "p_now": now,
            }
        )
    await _peer_stats_upsert(
        dialect, config.peer_timeout, config.reputation, config.heartbeat_resolution_s
    ).run(conn, rows)


async def record_outcomes(conn: DriverSQL, dialect: str, node_id: int, outcomes: Sequence[Timed]) -> None:
    """Append raw upload outcomes (the history behind the counters)."""
    await _outcomes_insert(dialect).run(
        conn,
        [
            {
                "peer_key": t.event.peer_id,
                "node_id": node_id,
                "p_at": t.at,
                "p_success": t.event.success,
                "cid": t.event.cid,
                "p_bytes": t.event.bytes,
            }
            for t in outcomes
            if isinstance(t.event, UploadOutcome)
        ],
    )


@cache
def _outcomes_insert(dialect: str) -> RowsStatement:
    row = Rows(
        dialect,
        peer_key=peers.c.peer_key.type,
        p_at=Double(),
        p_success=Boolean(),
        cid=contents.c.content_key.type,
        p_bytes=BigInteger(),
    )
    values = {
        "peer_id": peer_id_of(row["peer_key"]),
        "node_id": bindparam("node_id", type_=Integer()),
        "at": row["p_at"],
        "success": row["p_success"],
        "content_id": content_id_of(row["cid"]),
        "bytes": row["p_bytes"],
    }
    return RowsStatement(row.insert(upload_outcomes, values), row)


async def record_samples(conn: DriverSQL, dialect: str, node_id: int, samples: Sequence[Timed]) -> None:
    """Append bandwidth samples."""
    await _samples_insert(dialect).run(
        conn,
        [
            {"peer_key": t.event.peer_id, "node_id": node_id, "p_at": t.at, "p_bps": t.event.bytes_per_sec}
            for t in samples
            if isinstance(t.event, SpeedSample)
        ],
    )


@cache
def _samples_insert(dialect: str) -> RowsStatement:
    row = Rows(dialect, peer_key=peers.c.peer_key.type, p_at=Double(), p_bps=BigInteger())
    values = {
        "peer_id": peer_id_of(row["peer_key"]),
        "node_id": bindparam("node_id", type_=Integer()),
        "at": row["p_at"],
        "bytes_per_sec": row["p_bps"],
    }
    return RowsStatement(row.insert(bandwidth_samples, values), row)


async def refresh_speeds(
    conn: DriverSQL,
    dialect: str,
    node_id: int,
    peer_keys: Sequence[str],
    window: int,
    *,
    versioned: bool = False,
) -> None:
    """Store each touched peer's rolling mean of its latest ``window`` samples on its stats row, and
    mark its samples changed for gossip (``samples_version`` cleared; heartbeats leave it).

    Computed once per write, so selection ranks over a column instead of averaging at query time;
    the latest-N lookup walks the (peer_id, node_id, at) index backwards. One row per peer, each
    found by its key's unique index: with the keys as one ``IN`` list, Postgres without fresh
    statistics scanned all of ``peers`` per batch (89 s of a 100k-peer ingest).

    ``versioned``: also clear the row's gossip version, which the sample's upsert may have kept
    (a heartbeat resolution); otherwise that upsert cleared it already.
    """
    await _speeds_update(dialect, window, versioned).executemany(
        conn, [{"peer_key": key, "node": node_id} for key in peer_keys]
    )


@cache
def _speeds_update(dialect: str, window: int, versioned: bool = False) -> Precompiled:
    latest = (
        select(bandwidth_samples.c.bytes_per_sec)
        .where(
            bandwidth_samples.c.peer_id == peer_stats.c.peer_id,
            bandwidth_samples.c.node_id == peer_stats.c.node_id,
        )
        .order_by(bandwidth_samples.c.at.desc(), bandwidth_samples.c.id.desc())
        .limit(window)
        .correlate(peer_stats)  # a derived table does not auto-correlate; without this it averages everyone
        .subquery("latest")
    )
    mean = select(func.avg(latest.c.bytes_per_sec)).scalar_subquery()
    return Precompiled(
        update(peer_stats)
        .where(
            peer_stats.c.node_id == bindparam("node", type_=Integer()),
            peer_stats.c.peer_id == peer_id_of("peer_key"),
        )
        .values(
            speed_bps=cast(mean, Double()),
            samples_version=null(),
            **({"version": null()} if versioned else {}),
        ),
        dialect,
    )


async def _upsert_content_peers(
    conn: DriverSQL, dialect: str, node_id: int, mappings: Sequence[Timed], now: float
) -> None:
    await _content_peers_upsert(dialect).run(
        conn,
        [
            {
                "cid": t.event.cid,
                "peer_key": t.event.peer_id,
                "node_id": node_id,
                "p_available": isinstance(t.event, ContentAvailable),
                "p_at": t.at,
                "p_now": now,
            }
            for t in mappings
            if isinstance(t.event, ContentAvailable | ContentUnavailable)
        ],
    )


@cache
def _content_peers_upsert(dialect: str) -> RowsStatement:
    """Last-writer-wins by time on (content, peer): an older announcement never undoes a removal.

    Equal times are broken by origin key (``lww_newer``), exactly as the gossip merge breaks them. A
    removal that wins is kept from now (``removed_at``), not from its date: a late one, pruned by
    its date, could be gone before a snapshot from before it came in.
    """
    row = Rows(
        dialect,
        cid=contents.c.content_key.type,
        peer_key=peers.c.peer_key.type,
        p_available=Boolean(),
        p_at=Double(),
        p_now=Double(),
    )
    ins = row.insert(
        content_peers,
        {
            "content_id": content_id_of(row["cid"]),
            "peer_id": peer_id_of(row["peer_key"]),
            "node_id": bindparam("node_id", type_=Integer()),
            "available": row["p_available"],
            "since": row["p_at"],
            "last_confirmed": row["p_at"],
            "changed_at": row["p_at"],
            "removed_at": case((row["p_available"], null()), else_=row["p_now"]),
        },
    )
    old, new = content_peers.c, ins.excluded
    fresh = lww_newer(new.changed_at, new.node_id, old.changed_at, old.node_id, dialect)
    stmt = ins.on_conflict_do_update(
        index_elements=[content_peers.c.content_id, content_peers.c.peer_id],
        set_={
            "available": case((fresh, new.available), else_=old.available),
            "since": case((and_(fresh, new.available, ~old.available), new.since), else_=old.since),
            "last_confirmed": case(
                (and_(fresh, new.available), greatest(dialect, old.last_confirmed, new.last_confirmed)),
                else_=old.last_confirmed,
            ),
            "changed_at": greatest(dialect, old.changed_at, new.changed_at),
            "node_id": case((fresh, new.node_id), else_=old.node_id),
            "version": case((fresh, None), else_=old.version),
            "removed_at": case((fresh, new.removed_at), else_=old.removed_at),
        },
    )
    # On Postgres a (content, peer) named twice in a batch goes in successive statements.
    return RowsStatement(stmt, row, key=operator.itemgetter("cid", "peer_key"))

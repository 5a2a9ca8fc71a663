"""Read statements: the merged per-peer view and the ranking built on it, one statement per call."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from sqlalchemy import (
    BigInteger,
    Double,
    Integer,
    Select,
    and_,
    bindparam,
    case,
    cast,
    func,
    literal_column,
    select,
    true,
    union_all,
)
from sqlalchemy.sql.elements import ColumnElement

from .. import reputation as rep
from ..compiled import Precompiled
from ..config import TrackerConfig
from ..db import DriverSQL
from ..schema import content_peers, contents, nodes, peer_leases, peer_stats, peers
from ._sql import num


@dataclass(frozen=True, slots=True)
class PeerRow:
    """One peer merged over every origin, as of ``now``."""

    peer_key: str
    first_seen: float
    online: bool
    online_since: float | None
    last_seen: float
    uptime_s: float
    served: int
    failed: int
    success_weight: float
    failure_weight: float
    speed_bps: float | None
    reputation: float


@dataclass(frozen=True, slots=True)
class RankedRow:
    """One ranked holder of a content, with the parts of its score."""

    peer_key: str
    rank: int
    reputation: float
    success_rate: float
    uptime_factor: float
    evidence: float
    proven: bool
    speed_bps: float
    last_seen: float
    #: Open leases when ranked, and the most this peer may carry.
    load: int = 0
    capacity: int = 0


def _merged_columns(
    params: rep.ReputationParams, *, ranking: bool = False, single: bool = False
) -> list[Any]:
    """Per-peer aggregates over all origins at ``:now``: online if any origin saw it since ``:cutoff``
    (now - peer_timeout), uptime as the longest any origin observed, counters and decayed evidence
    summed, speed averaged. Used with ``GROUP BY`` peer.

    The time check is here, not only in the sweeper: a peer unseen for ``peer_timeout`` is offline
    to every query even if no sweep has run. ``ranking`` leaves out what the ranking does not read
    (``online_since``; the two counters, which it only adds up, as one sum ``outcomes``): the
    aggregates are most of a hot content's ranking time on SQLite, ~0.1 us per holder each.
    ``single``: the same columns of one row each, no aggregates, for a tracker whose only origin is
    itself (one row per peer, so each aggregate is its row's value).
    """

    def fold(aggregate: Any, value: Any) -> Any:
        return value if single else aggregate(value)

    ps = peer_stats.c
    t_now: ColumnElement[float] = bindparam("now", type_=Double())
    # An open session runs until now if the peer was seen within peer_timeout, else until it was
    # last seen: just after a leap was accepted, the lagging cutoff keeps peers last seen by the held
    # clock alive, and "now" would have counted the whole leap as their uptime (QA round 11).
    session_end = case((ps.last_seen >= bindparam("fresh", type_=Double()), t_now), else_=ps.last_seen)
    session = session_end - ps.online_since
    # A session dated ahead of the clock (within the accepted skew) counts 0, not minus the closed ones.
    uptime = ps.uptime_s + case((and_(ps.online, session > 0.0), session), else_=num(0.0))
    counters = (
        [fold(func.sum, ps.served_count + ps.failed_count).label("outcomes")]
        if ranking
        else [
            fold(func.min, case((_alive(), ps.online_since))).label("online_since"),
            fold(func.sum, ps.served_count).label("served"),
            fold(func.sum, ps.failed_count).label("failed"),
        ]
    )
    # Under its own name in the ranking, whose HAVING refers to it: "online" is also a column of
    # peer_stats, and SQLite would read that bare column instead.
    return [
        fold(func.max, _alive_flag()).label("alive" if ranking else "online"),
        *counters,
        fold(func.max, ps.last_seen).label("last_seen"),
        fold(func.max, uptime).label("uptime_s"),
        fold(func.sum, rep.sql_decayed_weight(ps.success_weight, ps.evidence_at, t_now, params)).label("sw"),
        fold(func.sum, rep.sql_decayed_weight(ps.failure_weight, ps.evidence_at, t_now, params)).label("fw"),
        fold(func.avg, ps.speed_bps).label("speed"),
    ]


def _cutoff() -> ColumnElement[float]:
    return bindparam("cutoff", type_=Double())


def _any_alive() -> ColumnElement[int]:
    """1 if any origin's row says the peer is alive (see ``_alive``), else 0; an aggregate."""
    return func.max(_alive_flag())


def _alive_flag() -> ColumnElement[int]:
    """``_alive`` of one row as 1 or 0."""
    return case((_alive(), 1), else_=0)


def _alive() -> ColumnElement[bool]:
    """This origin's row says the peer is online and was seen within ``peer_timeout``."""
    return and_(peer_stats.c.online, peer_stats.c.last_seen >= _cutoff())


def _merged(params: rep.ReputationParams, where: ColumnElement[bool]) -> Any:
    """The merged per-peer view (see ``_merged_columns``) of the peers ``where`` picks."""
    ps = peer_stats.c
    return select(ps.peer_id, *_merged_columns(params)).where(where).group_by(ps.peer_id).subquery("merged")


def _online_holders(dialect: str, params: rep.ReputationParams) -> Any:
    """The merged view of ``:cid``'s online holders; the offline majority is dropped in the same pass.

    Each engine gets the shape it plans best (measured on the 100k-peer swarm, docs/benchmarks.md).
    SQLite: walk ``content_peers`` by its (content_id, peer_id) key, which yields holders in peer order,
    so they are grouped as they come (no sort, no temporary list of ids). Postgres: the holder ids
    as an ``IN`` list, hashed, and ``peer_stats`` probed per id; the same join-driven shape made it
    sort the joined rows first and took 1.5x as long.
    """
    cp, ps = content_peers.c, peer_stats.c
    if dialect == "postgresql":
        return (
            select(ps.peer_id, *_merged_columns(params, ranking=True))
            .where(ps.peer_id.in_(_holders()))
            .group_by(ps.peer_id)
            .having(_any_alive() == 1)
            .subquery("merged")
        )
    # HAVING names the select list's ``alive`` (SQLite allows it): spelled out again, its positional
    # parameters made it a second aggregate, computed for every holder. A CTE, so that the lease
    # probes (``_loads``) read its online holders instead of walking the holders a second time.
    #
    # While this tracker is the only origin it knows (no gossip: the embedded default), every peer
    # has one stats row and grouping only costs: the first branch reads the rows as they are (a
    # third less time for a hot content's 2,000 holders), the second groups. Which one runs is
    # decided inside the statement, so it is one snapshot with the rows: SQLite tests the constant
    # condition once, before either loop, and skips the branch it rules out.
    alive = literal_column("alive") == 1
    one_origin = select(func.count()).select_from(nodes).scalar_subquery() == 1
    holders = content_peers.join(contents, contents.c.id == cp.content_id).join(
        peer_stats, ps.peer_id == cp.peer_id
    )
    held = and_(contents.c.content_key == bindparam("cid"), cp.available)
    as_they_are = (
        select(cp.peer_id, *_merged_columns(params, ranking=True, single=True))
        .select_from(holders)
        .where(held, one_origin, _alive())
    )
    grouped = (
        select(cp.peer_id, *_merged_columns(params, ranking=True))
        .select_from(holders)
        .where(held, ~one_origin)
        .group_by(cp.peer_id)
        .having(alive)
    )
    return union_all(as_they_are, grouped).cte("merged")


def _holders() -> Select[Any]:
    """Ids of the peers that hold ``:cid`` (not tombstoned)."""
    return (
        select(content_peers.c.peer_id)
        .join(contents, contents.c.id == content_peers.c.content_id)
        .where(contents.c.content_key == bindparam("cid"), content_peers.c.available)
    )


#: The Mersenne prime 2**31 - 1: the hash below works modulo it, so that every product fits 64 bits.
_P = 2_147_483_647


def _mix31(draw: ColumnElement[int], seed: ColumnElement[int]) -> ColumnElement[int]:
    """A hash of (``draw``, ``seed``), both below 2**31, into ``[0, 2**31 - 1)``, in integer SQL
    that both engines run alike: a linear step, then two squarings modulo ``_P``, the rounds that
    make peers' numbers independent of each other from seed to seed (a linear map alone keeps
    their differences). It was ``fract(sin(draw * 12.9898 + seed * 78.233) * 43758.5453)``: peers
    whose phases agreed modulo 2 pi drew almost the same ``u`` for most seeds (QA round 12).
    Mirrored by ``mix31`` below, which the tests compare with it."""
    x = (cast(draw, BigInteger()) * 48271 + seed) % _P
    x = (x * x + 1_013_904_223) % _P
    return (x * x + 12_345) % _P


def mix31(draw: int, seed: int) -> int:
    """``_mix31`` in Python."""
    x = (draw * 48271 + seed) % _P
    x = (x * x + 1_013_904_223) % _P
    return (x * x + 12_345) % _P


def times(now: float, config: TrackerConfig, lag: float = 0.0) -> dict[str, float]:
    """The reads' time parameters: ``now``, the presence cutoff ``peer_timeout`` before it, moved
    back by ``lag`` just after a clock leap was accepted (``SteadyClock.lag``), and ``peer_timeout``
    before it unmoved (``fresh``: until when an open session counts as uptime)."""
    fresh = now - config.peer_timeout
    return {"now": now, "cutoff": fresh - lag, "fresh": fresh}


async def peer_row(
    conn: DriverSQL, peer_key: str, now: float, config: TrackerConfig, *, lag: float = 0.0
) -> PeerRow | None:
    """One peer's merged metrics, or ``None`` if it was never seen."""
    rows = await _peer_row_select(config.dialect, config.reputation).fetch(
        conn, {"peer_key": peer_key, **times(now, config, lag)}
    )
    return peer_row_of(rows[0]) if rows else None


def peer_row_of(row: Any) -> PeerRow:
    """A ``PeerRow`` from a driver row in the merged view's column order (see ``_peer_row_select``)."""
    return PeerRow(
        row[0],
        row[1],
        bool(row[2]),
        row[3],
        row[4],
        row[5],
        int(row[6]),
        int(row[7]),
        float(row[8]),
        float(row[9]),
        None if row[10] is None else float(row[10]),
        float(row[11]),
    )


@cache
def _peer_row_select(dialect: str, params: rep.ReputationParams) -> Precompiled:
    m = _merged(
        params,
        peer_stats.c.peer_id
        == select(peers.c.id).where(peers.c.peer_key == bindparam("peer_key")).scalar_subquery(),
    )
    return Precompiled(peer_rows_of(m, params), dialect)


def peer_rows_of(m: Any, params: rep.ReputationParams) -> Select[Any]:
    """The columns ``peer_row_of`` reads, from merged rows ``m``: one peer's read and the listing's
    pages answer in one shape."""
    return select(
        peers.c.peer_key,
        peers.c.first_seen,
        m.c.online,
        m.c.online_since,
        m.c.last_seen,
        m.c.uptime_s,
        m.c.served,
        m.c.failed,
        m.c.sw,
        m.c.fw,
        m.c.speed,
        rep.sql_reputation(m.c.sw, m.c.fw, m.c.uptime_s, params),
    ).join(peers, peers.c.id == m.c.peer_id)


async def available_peer_keys(
    conn: DriverSQL, cid: str, now: float, config: TrackerConfig, *, lag: float = 0.0
) -> list[str]:
    """Online holders of ``cid`` (any reputation), by peer id."""
    rows = await _available_select(config.dialect).fetch(conn, {"cid": cid, **times(now, config, lag)})
    return [row[0] for row in rows]


@cache
def _available_select(dialect: str) -> Precompiled:
    ps = peer_stats.c
    alive = select(ps.peer_id).where(
        ps.peer_id.in_(_holders()), ps.online, ps.last_seen >= bindparam("cutoff", type_=Double())
    )
    stmt = select(peers.c.peer_key).where(peers.c.id.in_(alive)).order_by(peers.c.peer_key)
    return Precompiled(stmt, dialect)


async def ranked_holders(
    conn: DriverSQL,
    cid: str,
    now: float,
    config: TrackerConfig,
    *,
    limit: int | None,
    mode: str,
    seed: int = 0,
    lag: float = 0.0,
) -> list[RankedRow]:
    """Online holders of ``cid`` ranked in SQL, best first; the one place selection order is defined.

    ``mode`` is ``"all"`` (every online holder by reputation, then speed, then id: availability
    listings), ``"best"`` or ``"weighted"`` (selection: proven peers under ``min_reputation`` and peers
    at their lease cap are left out, and the score is discounted by load; see docs/load-balancing.md).
    """
    statement = _ranked_select(
        config.dialect, config.reputation, _Selection.of(config), mode, limit is not None
    )
    params = {"cid": cid, "limit": limit, "seed": seed, **times(now, config, lag)}
    if config.dialect == "postgresql":
        # Planned for each call with its own content and the tables' current sizes. A generic plan
        # of this prepared statement is built once per connection: one made while peer_leases was
        # nearly empty kept probing it by sequential scan as it grew (25x slower in the benchmark),
        # and one plan cannot suit both a 2,000-holder content and a 3-holder one.
        await conn.exec_driver_sql("SET LOCAL plan_cache_mode = force_custom_plan")
    rows = await statement.fetch(conn, params)
    return [_ranked_row(rank, r) for rank, r in enumerate(rows, start=1)]


async def best_holders(
    conn: DriverSQL, cid: str, now: float, config: TrackerConfig, *, limit: int, lag: float = 0.0
) -> tuple[list[RankedRow], int]:
    """The best ``limit`` online holders of ``cid`` in the order of availability listings, and how many
    online holders it has in all (a window count in the same statement, so the rest never leave
    the database)."""
    statement = _ranked_select(
        config.dialect, config.reputation, _Selection.of(config), "all", True, counted=True
    )
    if config.dialect == "postgresql":
        await conn.exec_driver_sql("SET LOCAL plan_cache_mode = force_custom_plan")
    params = {"cid": cid, "limit": limit, "seed": 0, **times(now, config, lag)}
    rows = await statement.fetch(conn, params)
    return [_ranked_row(rank, r) for rank, r in enumerate(rows, start=1)], int(rows[0][10]) if rows else 0


def _ranked_row(rank: int, r: Any) -> RankedRow:
    return RankedRow(
        peer_key=r[0],
        rank=rank,
        reputation=float(r[1]),
        success_rate=float(r[2]),
        uptime_factor=float(r[3]),
        evidence=float(r[4]),
        proven=bool(r[5]),
        speed_bps=float(r[6]),
        last_seen=float(r[7]),
        load=int(r[8]),
        capacity=int(r[9]),
    )


#: "best" treats effective scores this close as a tie (then least recently leased, speed, id).
SCORE_RESOLUTION = 0.02


@dataclass(frozen=True, slots=True)
class _Selection:
    """The settings a selection statement is built with (hashable, so statements are cached)."""

    min_reputation: float
    max_load: int
    exploration: float
    slow_start_s: float

    @classmethod
    def of(cls, config: TrackerConfig) -> _Selection:
        return cls(
            config.min_reputation, config.max_load_per_peer, config.exploration_share, config.slow_start_s
        )


def _loads(dialect: str, m: Any) -> Any:
    """Each candidate's open leases and latest lease id, by index probes on (peer_id, expires_at).

    Lease ids only grow: the latest one says when a peer was last handed out, even when many
    selections share one clock tick. Postgres gets a LATERAL probe per candidate: given a plain
    subquery over the holders it sometimes scanned every unexpired lease in the system (by the
    ``expires_at`` index), a cost that grows with the whole swarm's selection rate, not with this
    content. SQLite (no LATERAL) plans the subquery as one probe per online holder, read from the
    merged CTE (walking ``content_peers`` again for every holder, online or not, cost ~5% more).
    """
    lease = peer_leases.c
    t_now: ColumnElement[float] = bindparam("now", type_=Double())
    load = func.coalesce(func.sum(case((lease.closed_at.is_(None), 1), else_=0)), 0).label("load")
    last_leased = func.max(lease.id).label("last_leased")
    if dialect == "postgresql":
        return (
            select(load, last_leased)
            .where(lease.peer_id == m.c.peer_id, lease.expires_at > t_now)
            .lateral("loads")
        )
    return (
        select(lease.peer_id, load, last_leased)
        .where(lease.expires_at > t_now, lease.peer_id.in_(select(m.c.peer_id)))
        .group_by(lease.peer_id)
        .subquery("loads")
    )


def _code_points(key: ColumnElement[str], dialect: str) -> ColumnElement[str]:
    """``key`` ordered by code point, as SQLite's binary collation and Python order it, whatever the
    Postgres database's collation: ties rank the same on both engines (``leases.lock_peers``)."""
    return key.collate("C") if dialect == "postgresql" else key


@cache
def _ranked_select(
    dialect: str,
    params: rep.ReputationParams,
    sel: _Selection,
    mode: str,
    limited: bool,
    *,
    counted: bool = False,
) -> Precompiled:
    """The ranking statement: rows come back in rank order (``ORDER BY ... LIMIT``, so the engines keep
    a bounded top-n instead of sorting every holder; the caller numbers them). ``counted`` adds the
    number of rows before the limit as an eleventh column.
    """
    t_now: ColumnElement[float] = bindparam("now", type_=Double())
    m = _online_holders(dialect, params)
    loads = _loads(dialect, m)
    score = rep.sql_reputation(m.c.sw, m.c.fw, m.c.uptime_s, params)
    proven = rep.sql_is_proven(m.c.outcomes, params)
    speed: ColumnElement[float] = cast(func.coalesce(m.c.speed, num(0.0)), Double())
    load = func.coalesce(loads.c.load, 0)
    cap = num(float(sel.max_load))
    # Slow start: a newcomer's cap grows from 1 to max_load over slow_start_s after it was first seen.
    ramp = cap * (t_now - peers.c.first_seen) / num(sel.slow_start_s)
    capacity = case((proven, cap), (ramp < 1.0, num(1.0)), (ramp > cap, cap), else_=func.floor(ramp))
    quality = score * case((proven, num(1.0)), else_=num(sel.exploration))
    # First layer: every online holder with the parts of its score, filtered; the ranking layer
    # orders on these (and the weighted strategy adds a window value over them).
    candidates = (
        select(
            peers.c.peer_key,
            peers.c.id.label("peer_id"),
            peers.c.draw,
            score.label("reputation"),
            rep.sql_success_rate(m.c.sw, m.c.fw, params).label("success_rate"),
            rep.sql_uptime_factor(m.c.uptime_s, params).label("uptime_factor"),
            (m.c.sw + m.c.fw).label("evidence"),
            proven.label("proven"),
            speed.label("speed"),
            m.c.last_seen,
            load.label("load"),
            capacity.label("capacity"),
            (quality * (num(1.0) - load / capacity)).label("effective"),
            func.coalesce(loads.c.last_leased, 0).label("last_leased"),
        )
        .select_from(m)
        .join(peers, peers.c.id == m.c.peer_id)
        .outerjoin(loads, loads.c.peer_id == m.c.peer_id if dialect == "sqlite" else true())
    )
    if mode != "all":
        candidates = candidates.where(~and_(proven, score < num(sel.min_reputation)), load < capacity)
    c = candidates.subquery("candidates")
    if mode == "weighted":
        # Efraimidis-Spirakis: the top n of ln(u)/w are a weighted sample without replacement. u is a
        # hash of (peer, seed), repeatable for a given seed, from the number the peer's key gives
        # (peers.draw) so that it is the same on every engine and tracker. The speed factor is
        # relative to the fastest candidate: a window value, so one layer down.
        c = select(c, func.max(c.c.speed).over().label("fastest")).subquery("scored")
        u = (_mix31(c.c.draw, bindparam("seed", type_=BigInteger())) + num(0.5)) / num(float(_P))
        relative_speed = func.coalesce(c.c.speed / func.nullif(c.c.fastest, num(0.0)), num(1.0))
        weight = c.c.effective * (num(0.5) + num(0.5) * relative_speed)
        # A weight of 0 (reputation 0: an uptime floor of 0 and no uptime yet) ranks last; divided
        # by, it failed every weighted selection of the content on Postgres (QA round 6).
        key = func.ln(u) / func.nullif(weight, num(0.0))
        order: tuple[Any, ...] = (key.desc().nulls_last(), _code_points(c.c.peer_key, dialect))
    elif mode == "best":
        # Scores within SCORE_RESOLUTION count as equal; among equals the least recently handed out
        # goes first, so equal peers take turns instead of the first by id taking every idle moment.
        bucket = func.floor(c.c.effective / num(SCORE_RESOLUTION))
        order = (bucket.desc(), c.c.last_leased, c.c.speed.desc(), _code_points(c.c.peer_key, dialect))
    else:
        order = (c.c.reputation.desc(), c.c.speed.desc(), _code_points(c.c.peer_key, dialect))
    stmt = select(
        c.c.peer_key,
        c.c.reputation,
        c.c.success_rate,
        c.c.uptime_factor,
        c.c.evidence,
        c.c.proven,
        c.c.speed,
        c.c.last_seen,
        c.c.load,
        c.c.capacity,
        *([func.count().over().label("holders")] if counted else []),
    ).order_by(*order)
    if limited:
        stmt = stmt.limit(bindparam("limit", type_=Integer()))
    return Precompiled(stmt, dialect)


async def content_last_updated(conn: DriverSQL, dialect: str, cid: str) -> tuple[bool, float | None]:
    """Whether ``cid`` is known, and the latest change or confirmation of any of its mappings."""
    rows = await _last_updated_select(dialect).fetch(conn, {"cid": cid})
    if not rows:
        return False, None
    times = [t for t in (rows[0][1], rows[0][2]) if t is not None]
    return True, max(times) if times else None


@cache
def _last_updated_select(dialect: str) -> Precompiled:
    cp = content_peers.c
    stmt = (
        select(contents.c.id, func.max(cp.changed_at), func.max(cp.last_confirmed))
        .outerjoin(content_peers, cp.content_id == contents.c.id)
        .where(contents.c.content_key == bindparam("cid"))
        .group_by(contents.c.id)
    )
    return Precompiled(stmt, dialect)

"""The sweeper's statements: expire stale sessions, prune by retention in bounded batches, export state.

Every delete takes at most ``batch`` rows per statement and each statement runs in its own short
transaction (the caller's loop), so SQLite writers are never blocked for long and Postgres never
builds a huge transaction.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy import Integer, and_, bindparam, case, delete, func, or_, select, text, true, tuple_, update
from sqlalchemy.ext.asyncio import AsyncConnection

from ..schema import (
    bandwidth_samples,
    content_peers,
    contents,
    nodes,
    peer_leases,
    peer_stats,
    peers,
    upload_outcomes,
)
from ._sql import PEER_STATE_COLUMNS
from .writes import refresh_speeds


async def stale_sessions(
    conn: AsyncConnection, node_id: int, cutoff: float, after_peer_id: int, limit: int
) -> list[int]:
    """Up to ``limit`` peers, in id order after ``after_peer_id``, whose session with this node is
    open and unseen since before ``cutoff``: the sweeper's next slice to close.

    A read, so that a pass with nothing (or little) to close takes no write lock: slicing the whole
    key range, a pass over a quiet swarm took a write transaction per ``sweep_batch_size`` peers
    (0.6-0.8 s of SQLite's write lock at 100,000 peers, every ``update_interval``). There is no
    index on ``last_seen`` (every heartbeat would update it): the walk is the primary key's, in
    order, so consecutive slices read the table once between them."""
    ps = peer_stats.c
    stmt = (
        select(ps.peer_id)
        .where(ps.node_id == node_id, ps.peer_id > after_peer_id, ps.online, ps.last_seen < cutoff)
        .order_by(ps.peer_id)
        .limit(limit)
    )
    return [int(p) for p in (await conn.scalars(stmt)).all()]


async def mark_stale_offline(
    conn: AsyncConnection,
    node_id: int,
    now: float,
    peer_timeout: float,
    *,
    after_peer_id: int = 0,
    upto_peer_id: int | None = None,
) -> int:
    """Close every session of this node unseen for ``peer_timeout`` among peers ``after_peer_id`` <
    id <= ``upto_peer_id`` (``None``: no upper bound), at its ``last_seen``; returns how many.

    The sweeper closes them a slice at a time (bounds from ``stale_sessions``), one short
    transaction each: one UPDATE over a million peers held SQLite's write lock for seconds and every
    heartbeat waited (QA round 20). Bounds, not a list of ids, so that no slice size meets the
    drivers' limits on parameters. Queries already treat such peers as offline by time; this makes
    the stored flag and the accumulated uptime true for analysts and for gossip. ``online_since``
    stays: an offline row with a session start is one the sweeper closed, which a late event from
    within that session resumes (or ends at its goodbye) just as it would have found it unswept
    (``writes._peer_stats_upsert``).
    """
    ps = peer_stats.c
    bounds = [ps.peer_id > after_peer_id]
    if upto_peer_id is not None:
        bounds.append(ps.peer_id <= upto_peer_id)
    stmt = (
        update(peer_stats)
        .where(ps.node_id == node_id, *bounds, ps.online, ps.last_seen < now - peer_timeout)
        .values(
            online=False,
            uptime_s=ps.uptime_s + (ps.last_seen - ps.online_since),
            # Dated when the session timed out, not by the sweep: the row's time decides when every
            # tracker forgets it (queries/forget.py), and the first pass of a tracker back after
            # longer than the retention made the row it closed young again, and gossiped it back to
            # every tracker that had forgotten it, old counters and all (QA round 27).
            updated_at=case(
                (ps.updated_at > ps.last_seen + peer_timeout, ps.updated_at),
                else_=ps.last_seen + peer_timeout,
            ),
            version=None,  # gossip carries the closed session too
        )
    )
    return int((await conn.execute(stmt)).rowcount or 0)


async def sample_prune_candidates(
    conn: AsyncConnection, touched_since: float, after_peer_id: int, limit: int
) -> list[int]:
    """Peers written since ``touched_since`` (only they can have gained samples), in id order from
    ``after_peer_id``: the next slice the sample pruner examines."""
    ps = peer_stats.c
    stmt = (
        select(ps.peer_id)
        .where(ps.updated_at >= touched_since, ps.peer_id > after_peer_id)
        .group_by(ps.peer_id)
        .order_by(ps.peer_id)
        .limit(limit)
    )
    return [int(p) for p in (await conn.scalars(stmt)).all()]


async def doomed_samples(conn: AsyncConnection, peer_ids: list[int], window: int, cutoff: float) -> list[int]:
    """Ids of the samples of ``peer_ids`` outside their latest ``window`` and older than ``cutoff``:
    read, then deleted a chunk at a time (``delete_samples``). Deleted in one statement, a peer's
    1,000,000 samples of a day held SQLite's write lock for 2.4 s (QA round 57); in chunks that each
    ranked again, 2 s each, 200 times (QA round 58). Still doomed when deleted: samples written
    meanwhile are newer (they push older ones further out of the window) or older than the window."""
    s = bandwidth_samples.c
    ranked = (
        select(
            s.id,
            s.at,
            func.row_number()
            .over(partition_by=(s.peer_id, s.node_id), order_by=(s.at.desc(), s.id.desc()))
            .label("rn"),
        )
        .where(s.peer_id.in_(peer_ids))
        .subquery("ranked")
    )
    doomed = select(ranked.c.id).where(ranked.c.rn > window, ranked.c.at < cutoff).order_by(ranked.c.id)
    return [int(i) for i in (await conn.scalars(doomed)).all()]


async def delete_samples(conn: AsyncConnection, ids: list[int]) -> int:
    """Delete the samples ``ids`` (a chunk of ``doomed_samples``)."""
    result = await conn.execute(delete(bandwidth_samples).where(bandwidth_samples.c.id.in_(ids)))
    return int(result.rowcount or 0)


async def prune_outcomes(conn: AsyncConnection, cutoff: float, limit: int) -> int:
    """Delete up to ``limit`` of the oldest raw outcomes dated before ``cutoff``."""
    o = upload_outcomes.c
    oldest = select(o.id).where(o.at < cutoff).order_by(o.at).limit(limit)
    result = await conn.execute(delete(upload_outcomes).where(o.id.in_(oldest)))
    return int(result.rowcount or 0)


async def prune_tombstones(conn: AsyncConnection, now: float, cutoff: float, limit: int) -> int:
    """Delete up to ``limit`` removed mappings this node took before ``cutoff`` (``removed_at``), and
    dated before it; first date those taken without a ``removed_at`` (``date_untaken_tombstones``).

    Not by their date alone: a removal can be made, or arrive, long after the date it carries (a
    late event, a departed peer's removal dated at its last sighting, a partition healed), and
    pruned by that date it was gone before a snapshot taken before it was made, which brought the
    mapping back for good (QA round 32). By their date too: a process of the release before
    migration 0015, still running beside this one on a shared database, flips tombstones without
    knowing ``removed_at``, and one it revived and removed again would go by a stale one
    (``date_untaken_tombstones`` dates those it wrote new)."""
    await date_untaken_tombstones(conn, now)
    cp = content_peers.c
    oldest = (
        select(cp.content_id, cp.peer_id)
        # Spelled exactly like the partial index's predicate, or SQLite will not use that index.
        .where(text("NOT available"), cp.removed_at < cutoff, cp.changed_at < cutoff)
        .order_by(cp.removed_at)
        .limit(limit)
    )
    result = await conn.execute(delete(content_peers).where(pair_in(oldest)))
    return int(result.rowcount or 0)


async def date_untaken_tombstones(conn: AsyncConnection, now: float) -> int:
    """Give tombstones without ``removed_at`` this pass's time: written by a process of the release
    before migration 0015 still running on a shared database (docs/operations.md, upgrades), they
    would otherwise never be pruned, and their peers and contents never forgotten (QA round 34).
    In the pruning's transaction: found by the partial index, none in the usual case."""
    cp = content_peers.c
    result = await conn.execute(
        update(content_peers).where(text("NOT available"), cp.removed_at.is_(None)).values(removed_at=now)
    )
    return int(result.rowcount or 0)


def pair_in(pairs: Any) -> Any:
    """``(content_id, peer_id) IN (subquery)``: row values work on SQLite >= 3.15 and Postgres."""
    return tuple_(content_peers.c.content_id, content_peers.c.peer_id).in_(pairs)


async def remove_departed_mappings(
    conn: AsyncConnection, node_id: int, cutoff: float, now: float, limit: int
) -> int:
    """Remove up to ``limit`` of this node's mappings (the row's last change was this node's) of peers
    that no origin has seen since ``cutoff`` (= now - ``offline_mapping_retention_s``), as this
    node's removals dated ``AFTER_SIGHTING_S`` after the peer's last sighting (tombstones, versioned
    for gossip); ``prune_tombstones`` ages them out from ``now``, when they are made.

    Deleted instead, they were a local decision each tracker took at its own moment, which gossip
    never carried: a peer heard from again between two trackers' sweeps kept its mappings on one and
    lost them on the other, for good (QA round 24). As removals they travel like any other and every
    tracker ends the same. Only this node's own: a tracker cut off from the others for longer than
    the retention would otherwise remove, everywhere once it is back, the mappings of peers that had
    moved on to other trackers meanwhile; the tracker a mapping came from decides, as it sees its
    peer (mappings of a tracker that is gone for good go by ``prune_departed_mappings``).

    Dated by the last sighting, the last time anything was known of the peer, so that whatever the
    peer announced after it, anywhere, wins: dated by this tracker's clock, a removal made late (a
    sweeper held back, a clock running ahead) beat the announcement the peer made on its return
    elsewhere (QA round 26); dated at the end of the retention, it still beat one made by a peer
    back elsewhere before the retention ended, while this tracker had not heard yet (QA round 30).
    A millisecond after it, not at it: the peer's last act may be an announcement at that very time,
    which a removal at the same time beat only by its newer version, and a snapshot (its rows carry
    none) or an origin restored from a backup (it stamps the old announcement again, newer) had the
    announcement win (QA round 34). Not a mapping changed after that (an announcement relayed
    without a sighting): a removal dated before it would lose to it elsewhere;
    ``prune_departed_mappings`` takes it in the end."""
    ps = peer_stats.c
    departed = (
        select(ps.peer_id, (func.max(ps.last_seen) + AFTER_SIGHTING_S).label("gone_at"))
        .group_by(ps.peer_id)
        .having(func.max(ps.last_seen) < cutoff)
        .subquery("departed")
    )
    cp = content_peers.c
    victims = (
        select(cp.content_id, cp.peer_id)
        .join(departed, departed.c.peer_id == cp.peer_id)
        .where(cp.node_id == node_id, cp.available, cp.changed_at < departed.c.gone_at)
        .limit(limit)
    )
    gone_at = (
        select(func.max(ps.last_seen) + AFTER_SIGHTING_S).where(ps.peer_id == cp.peer_id).scalar_subquery()
    )
    stmt = (
        update(content_peers)
        # The victims' conditions again on the row itself: Postgres checks these, not the subquery,
        # again on a row it waited for, and an announcement committed meanwhile became the removal
        # (QA round 36).
        .where(pair_in(victims), cp.node_id == node_id, cp.available, cp.changed_at < gone_at)
        .values(available=False, changed_at=gone_at, removed_at=now, node_id=node_id, version=None)
    )
    result = await conn.execute(stmt)
    return int(result.rowcount or 0)


async def prune_departed_mappings(
    conn: AsyncConnection, cutoff: float, limit: int, held: frozenset[int] = frozenset()
) -> list[Deleted]:
    """Delete up to ``limit`` mappings of any origin of peers no origin has seen since ``cutoff``: set
    ``tombstone_keep_s`` beyond the removals' own retention, so only those whose tracker never removed
    them are left (one gone for good, or cut off all that time), which would otherwise stay forever.
    Deleting them here is a local decision again, but at a point where the trackers that could
    disagree have had the removal's retention and its tombstone's to say so. Not removals, which
    ``prune_tombstones`` ages out (deleted here, a late announcement older than the removal brought
    the mapping back when the peer returned: QA round 12).

    Returns the rows deleted: this node judged the peer departed by what it held, and a tracker cut
    off from that origin all that time (a partition, a long downtime) held old rows of a peer that
    never left. Its clock of the origin still covers the deleted rows, so gossip would never send
    them again, and the origin's live mapping stayed missing here for good (QA round 30): the
    sweeper lowers that clock (``ask_again``), so the next exchange brings back whatever the origin
    still holds. Not the rows of the origins in ``held``: asked lately, their rows are on the way."""
    ps = peer_stats.c
    departed = select(ps.peer_id).group_by(ps.peer_id).having(func.max(ps.last_seen) < cutoff)
    cp = content_peers.c
    # Not a mapping announced since: its origin saw the peer then, and the row that says so may be
    # on its way (a catch-up in slices brought a returning peer's new mapping before its new row, and
    # an old row of another origin had it deleted, for good: QA round 28).
    recent = or_(cp.changed_at >= cutoff, cp.last_confirmed >= cutoff)
    victims = (
        select(cp.content_id, cp.peer_id)
        .where(cp.peer_id.in_(departed), cp.available, ~recent, not_held(held))
        .limit(limit)
    )
    # Again on the row itself, which Postgres checks again after a wait (remove_departed_mappings).
    doomed = delete(content_peers).where(pair_in(victims), cp.available, ~recent)
    return await deleted_mappings(conn, doomed)


#: How long after a departed peer's last sighting its removals are dated: after anything it did
#: then, before anything it does on its return (``remove_departed_mappings``). A millisecond: a
#: whole second lost a failover's announcement made half a second later elsewhere (QA round 36).
AFTER_SIGHTING_S = 0.001

#: A deleted mapping: its origin (``node_id``) and version (``None``: this node's, not stamped yet).
Deleted = tuple[int, int | None]


async def deleted_mappings(conn: AsyncConnection, stmt: Any) -> list[Deleted]:
    """Run a ``DELETE`` of ``content_peers`` and return what it deleted, for ``ask_again``."""
    cp = content_peers.c
    rows = (await conn.execute(stmt.returning(cp.node_id, cp.version))).all()
    return [(int(node), None if version is None else int(version)) for node, version in rows]


def not_held(held: frozenset[int]) -> Any:
    """Mappings of no origin in ``held`` (``ask_again``'s origins, while their rows come again)."""
    return content_peers.c.node_id.not_in(sorted(held)) if held else true()


async def ask_again(conn: AsyncConnection, deleted: list[Deleted]) -> set[int]:
    """Ask the other origins of ``deleted`` mappings for their rows again: lower this node's clock of
    each below the lowest version deleted, so that gossip sends its rows from there on again.

    In the deleting transaction and every time: the clock claims every row up to it, so a deleted
    row it still covered would never come again. Remembering rows asked for once and not asking for
    them again lost live mappings for good (QA round 33: a catch-up in slices brought the mapping
    back before its peer's new row, and the next pass deleted it again; a second partition; a relay
    that still held the old row); putting asks off lost them with the process (QA round 32). The
    cost falls on a neighbour that never sweeps: it sends its departed peers' mappings back every
    time, and with them all its rows since. This node's own clock is left be.

    Returns the origins asked, whose rows the sweeper then leaves alone for a while
    (``sweeper.ASKED_HOLD_S``): a catch-up longer than one exchange brings a mapping back (its
    version is old) before its peer's new row (heartbeats make it the newest), and a pass between
    deleted the mapping again and started the catch-up over, at every pass (QA round 33)."""
    lowest: dict[int, int] = {}
    for node_id, version in deleted:
        if version is not None:
            lowest[node_id] = min(version, lowest.get(node_id, version))
    n = nodes.c
    for node_id, version in sorted(lowest.items()):  # one lock order for concurrent sweepers
        await conn.execute(
            update(nodes)
            .where(n.id == node_id, ~n.is_local, n.clock >= version)
            .values(clock=max(version - 1, 0))
        )
    return set(lowest)


async def clamp_future(
    conn: AsyncConnection,
    dialect: str,
    node_id: int,
    now: float,
    limit: float,
    lease_ttl: float,
    window: int,
) -> int:
    """Bring this node's times that lie beyond ``limit`` back to ``now`` (the caller's choice: when
    the clock was set right); returns the rows changed.

    They were stamped while the tracker's clock was ahead (a leap it could not see, or accepted, and
    then undone). Left alone they keep peers online and leases counted for the size of the step,
    make this node's own removals look older than what they remove, keep a first-seen peer in slow
    start, and hold gossip of the whole origin at every neighbour (docs/gossip.md): this node is the
    authority on its rows, and re-versioned they travel again with their new times.
    ``first_seen`` takes the minimum over every sighting, so lowering it is always safe. Full scans:
    run only after a step back and once per process (tracker/sweeper.py).

    Samples and outcomes too (QA round 7): a sample dated ahead stayed among a peer's latest
    ``window`` for the size of the step, so its speed ignored every new one, and it was the newest
    time of its row, which neighbours held back with every later version of this origin, and for
    which other trackers refused this node's snapshots whole. Their peers' speeds are computed
    again, and their rows re-versioned with their samples, which travel again. Tombstones of any
    origin taken ahead (``removed_at``) are taken now: they would be kept the step longer.
    """
    changed = 0
    s = bandwidth_samples.c
    ahead = and_(s.node_id == node_id, s.at > limit)
    keys = (
        (await conn.execute(select(peers.c.peer_key).where(peers.c.id.in_(select(s.peer_id).where(ahead)))))
        .scalars()
        .all()
    )
    if keys:
        changed += int(
            (await conn.execute(update(bandwidth_samples).where(ahead).values(at=now))).rowcount or 0
        )
        await refresh_speeds(conn, dialect, node_id, sorted(keys), window, versioned=True)
    o = upload_outcomes.c
    result = await conn.execute(
        update(upload_outcomes).where(o.node_id == node_id, o.at > limit).values(at=now)
    )
    changed += int(result.rowcount or 0)

    def clamped(column: Any) -> Any:
        return case((column > now, now), else_=column)

    ps = peer_stats.c
    future_stats = or_(
        ps.last_seen > limit,
        ps.online_since > limit,
        ps.evidence_at > limit,
        ps.updated_at > limit,
        ps.own_seen > limit,
        ps.report_seen > limit,
    )
    result = await conn.execute(
        update(peer_stats)
        .where(ps.node_id == node_id, future_stats)
        .values(
            last_seen=clamped(ps.last_seen),
            online_since=clamped(ps.online_since),
            evidence_at=clamped(ps.evidence_at),
            own_seen=clamped(ps.own_seen),
            report_seen=clamped(ps.report_seen),
            updated_at=now,
            version=None,
        )
    )
    changed += int(result.rowcount or 0)
    cp = content_peers.c
    result = await conn.execute(
        update(content_peers)
        .where(cp.node_id == node_id, or_(cp.since > limit, cp.last_confirmed > limit, cp.changed_at > limit))
        .values(
            since=clamped(cp.since),
            last_confirmed=clamped(cp.last_confirmed),
            changed_at=clamped(cp.changed_at),
            version=None,
        )
    )
    changed += int(result.rowcount or 0)
    # When this node took a removal, of any origin: taken ahead, it would be kept the step longer.
    result = await conn.execute(
        update(content_peers).where(text("NOT available"), cp.removed_at > limit).values(removed_at=now)
    )
    changed += int(result.rowcount or 0)
    for table in (peers, contents):
        result = await conn.execute(update(table).where(table.c.first_seen > limit).values(first_seen=now))
        changed += int(result.rowcount or 0)
    lease = peer_leases.c
    result = await conn.execute(
        update(peer_leases)
        .where(lease.node_id == node_id, lease.expires_at > limit + lease_ttl)
        .values(leased_at=clamped(lease.leased_at), expires_at=now + lease_ttl)
    )
    return changed + int(result.rowcount or 0)


# ---------------------------------------------------------------------------------------------
# State export (the snapshot's rows), streamed inside one read transaction
# ---------------------------------------------------------------------------------------------


#: Rows fetched per step of a snapshot's streams: one at a time, each row cost a hop between the
#: event loop and SQLAlchemy's greenlet, most of what kept the loop busy for the minutes an export
#: of a big swarm takes (QA round 20).
_STREAM_PARTITION = 1_000


async def _rows(conn: AsyncConnection, stmt: Any) -> AsyncIterator[Any]:
    result = await conn.stream(stmt)
    async for partition in result.partitions(_STREAM_PARTITION):
        for row in partition:
            yield row


async def stream_peer_state(conn: AsyncConnection) -> AsyncIterator[Any]:
    """Every (peer, origin) stats row with the keys gossip needs."""
    ps = peer_stats.c
    stmt = (
        select(nodes.c.node_key, *PEER_STATE_COLUMNS, ps.speed_bps, ps.updated_at)
        .join(peers, peers.c.id == ps.peer_id)
        .join(nodes, nodes.c.id == ps.node_id)
        .order_by(ps.node_id, ps.peer_id)
    )
    async for row in _rows(conn, stmt):
        yield row


async def stream_latest_samples(conn: AsyncConnection, window: int) -> AsyncIterator[Any]:
    """Each (peer, origin)'s latest ``window`` samples, the ones its rolling average is made of."""
    s = bandwidth_samples.c
    ranked = select(
        s.peer_id,
        s.node_id,
        s.at,
        s.bytes_per_sec,
        s.id,
        func.row_number()
        .over(partition_by=(s.peer_id, s.node_id), order_by=(s.at.desc(), s.id.desc()))
        .label("rn"),
    ).subquery("ranked")
    stmt = (
        select(nodes.c.node_key, peers.c.peer_key, ranked.c.at, ranked.c.bytes_per_sec)
        .join(peers, peers.c.id == ranked.c.peer_id)
        .join(nodes, nodes.c.id == ranked.c.node_id)
        .where(ranked.c.rn <= bindparam("window", window, type_=Integer()))
        .order_by(ranked.c.node_id, ranked.c.peer_id, ranked.c.at, ranked.c.id)
    )
    async for row in _rows(conn, stmt):
        yield row


async def stream_mappings(conn: AsyncConnection) -> AsyncIterator[Any]:
    """Every content mapping, tombstones included (a removal must spread like an announcement)."""
    cp = content_peers.c
    stmt = (
        select(
            nodes.c.node_key,
            contents.c.content_key,
            peers.c.peer_key,
            cp.available,
            cp.since,
            cp.last_confirmed,
            cp.changed_at,
        )
        .join(contents, contents.c.id == cp.content_id)
        .join(peers, peers.c.id == cp.peer_id)
        .join(nodes, nodes.c.id == cp.node_id)
        .order_by(cp.content_id, cp.peer_id)
    )
    async for row in _rows(conn, stmt):
        yield row

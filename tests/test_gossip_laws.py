"""The merge is a semilattice on each engine: idempotent, commutative, associative (hypothesis).

States are sets of records that honest origins could have produced: an origin's row for a peer at a
version is a function of (origin, peer, version), its counters grow with the version, its samples are
a function of the version at which they last changed, and its mapping changes never go back in time.
Two databases receive the same records in different orders and groupings; their tables must end up
identical, row for row.

Rows sent without their samples ("bare": the sender believed the receiver held them) are not part of
the semilattice: they apply only over the samples they name, so a stored row always holds its own
samples, and the resend their receiver then asks for brings the state where it would have been.
"""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, select

from tracker import AvailabilityTracker, TrackerConfig
from tracker.db import run_read, run_write
from tracker.gossip.protocol import MappingState, OriginDelta, PeerState
from tracker.queries import gossip as q
from tracker.schema import bandwidth_samples, content_peers, contents, nodes, peer_stats, peers

T0 = 1_800_000_000.0
ORIGINS = ("origin-a", "origin-b", "origin-c")
PEERS = ("p1", "p2", "p3")
CIDS = ("c1", "c2")

PeerRef = tuple[str, int, str, int]  # ("peer" or "bare", origin index, peer, version)
MapRef = tuple[str, int, str, str, int]  # ("map", origin index, cid, peer, version)


def _samples_version(version: int) -> int:
    """Samples change every third version: rows 3, 4 and 5 share those of version 3."""
    return max(1, version - version % 3)


def _samples(origin: int, samples_version: int) -> list[tuple[float, int]]:
    s = samples_version
    return [(T0 - 100 + s - j, 1000 * s + j + origin) for j in range(1 + s % 4)]


def _peer(origin: int, peer: str, version: int, carried: bool = True) -> PeerState:
    samples_version = _samples_version(version)
    return PeerState(
        peer=peer,
        first_seen=T0 - 1000 + 7 * version + origin,
        online=(version + origin) % 2 == 0,
        online_since=T0 - 100 + version if (version + origin) % 2 == 0 else None,
        last_seen=T0 - 100 + version,
        uptime_s=float(version * 3),
        served=version * 2 + origin,
        failed=version // 2,
        success_weight=version * 0.7,
        failure_weight=version * 0.3,
        evidence_at=T0 - 100 + version,
        updated_at=T0 - 100 + version,
        version=version,
        samples=_samples(origin, samples_version) if carried else None,
        samples_version=samples_version,
    )


def _mapping(origin: int, cid: str, peer: str, version: int) -> MappingState:
    return MappingState(
        cid=cid,
        peer=peer,
        available=(version + origin + len(cid)) % 3 != 0,
        since=T0 - 200 + version // 3,
        last_confirmed=T0 - 100 + version // 2,
        changed_at=T0 - 100 + version // 2,  # equal times across origins and versions: ties on purpose
        version=version,
    )


records = st.lists(
    st.one_of(
        st.tuples(st.just("peer"), st.integers(0, 2), st.sampled_from(PEERS), st.integers(1, 8)),
        st.tuples(
            st.just("map"),
            st.integers(0, 2),
            st.sampled_from(CIDS),
            st.sampled_from(PEERS),
            st.integers(1, 8),
        ),
    ),
    max_size=12,
)
#: Also peer rows without their samples.
any_records = st.lists(
    st.one_of(
        records.filter(bool).map(lambda rs: rs[0]),
        st.tuples(st.just("bare"), st.integers(0, 2), st.sampled_from(PEERS), st.integers(1, 8)),
    ),
    max_size=12,
)


def _deltas(refs: list[Any]) -> list[OriginDelta]:
    grouped: dict[int, tuple[list[PeerState], list[MappingState]]] = {}
    for ref in refs:
        peers_, maps = grouped.setdefault(ref[1], ([], []))
        if ref[0] in ("peer", "bare"):
            peers_.append(_peer(ref[1], ref[2], ref[3], carried=ref[0] == "peer"))
        else:
            maps.append(_mapping(ref[1], ref[2], ref[3], ref[4]))
    return [
        OriginDelta(origin=ORIGINS[o], base=0, upto=0, peers=p, mappings=m)
        for o, (p, m) in sorted(grouped.items())
    ]


async def _apply(tracker: AvailabilityTracker, messages: list[list[Any]]) -> None:
    for refs in messages:
        deltas = _deltas(refs)

        async def work(conn: Any, deltas: list[OriginDelta] = deltas) -> None:
            await q.merge(conn, tracker.config.dialect, tracker.node_key, deltas, 10, tracker.now())

        await run_write(tracker.engine, work, 3)


async def _dump(tracker: AvailabilityTracker) -> Any:
    async def work(conn: Any) -> Any:
        ps, cp, bs = peer_stats.c, content_peers.c, bandwidth_samples.c
        stats = await conn.execute(
            select(
                peers.c.peer_key,
                nodes.c.node_key,
                *[c for c in peer_stats.c if c.name not in ("peer_id", "node_id")],
            )
            .join(peers, peers.c.id == ps.peer_id)
            .join(nodes, nodes.c.id == ps.node_id)
        )
        maps = await conn.execute(
            select(
                contents.c.content_key,
                peers.c.peer_key,
                nodes.c.node_key,
                cp.available,
                cp.since,
                cp.last_confirmed,
                cp.changed_at,
                cp.version,
            )
            .join(contents, contents.c.id == cp.content_id)
            .join(peers, peers.c.id == cp.peer_id)
            .join(nodes, nodes.c.id == cp.node_id)
        )
        samples = await conn.execute(
            select(peers.c.peer_key, nodes.c.node_key, bs.at, bs.bytes_per_sec)
            .join(peers, peers.c.id == bs.peer_id)
            .join(nodes, nodes.c.id == bs.node_id)
        )
        keys = await conn.execute(select(peers.c.peer_key, peers.c.first_seen))
        cids = await conn.execute(select(contents.c.content_key, contents.c.first_seen))
        return tuple(sorted(tuple(r) for r in result.all()) for result in (stats, maps, samples, keys, cids))

    return await run_read(tracker.engine, work)


async def _reset(tracker: AvailabilityTracker) -> None:
    async def work(conn: Any) -> None:
        for table in (bandwidth_samples, content_peers, peer_stats, peers, contents):
            await conn.execute(delete(table))
        await conn.execute(delete(nodes).where(~nodes.c.is_local))

    await run_write(tracker.engine, work, 3)


async def _check(urls: tuple[str, str], plans: tuple[list[list[Any]], list[list[Any]]]) -> None:
    trackers = [await AvailabilityTracker.open(TrackerConfig(database_url=url)) for url in urls]
    try:
        dumps = []
        for tracker, plan in zip(trackers, plans, strict=True):
            await _reset(tracker)
            await _apply(tracker, plan)
            dumps.append(await _dump(tracker))
        assert dumps[0] == dumps[1]
    finally:
        for tracker in trackers:
            await tracker.close()


_LAWS = settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@_LAWS
@given(a=records)
def test_merge_is_idempotent(db_url: str, other_db_url: str, a: list[Any]) -> None:
    asyncio.run(_check((db_url, other_db_url), ([a], [a, a, a])))


@_LAWS
@given(a=records, b=records)
def test_merge_is_commutative(db_url: str, other_db_url: str, a: list[Any], b: list[Any]) -> None:
    asyncio.run(_check((db_url, other_db_url), ([a, b], [b, a])))


@_LAWS
@given(a=records, b=records, c=records)
def test_merge_is_associative(
    db_url: str, other_db_url: str, a: list[Any], b: list[Any], c: list[Any]
) -> None:
    asyncio.run(_check((db_url, other_db_url), ([a + b, c], [a, b + c])))


@_LAWS
@given(a=records, seed=st.randoms(use_true_random=False))
def test_any_order_of_single_records_gives_the_same_state(
    db_url: str, other_db_url: str, a: list[Any], seed: Any
) -> None:
    shuffled = list(a)
    seed.shuffle(shuffled)
    asyncio.run(_check((db_url, other_db_url), ([[r] for r in a], [[r] for r in shuffled])))


def _carried(refs: list[Any]) -> list[Any]:
    """The same records, every peer row with its samples: what a resend brings."""
    return [("peer", *ref[1:]) if ref[0] == "bare" else ref for ref in refs]


@_LAWS
@given(a=any_records, seed=st.randoms(use_true_random=False))
def test_rows_without_samples_then_the_resend_give_the_state_of_rows_with_samples(
    db_url: str, other_db_url: str, a: list[Any], seed: Any
) -> None:
    shuffled = list(a)
    seed.shuffle(shuffled)
    resend = _carried(a)
    asyncio.run(_check((db_url, other_db_url), ([[r] for r in shuffled] + [resend], [resend])))


@_LAWS
@given(a=any_records)
def test_a_stored_row_always_holds_the_samples_of_its_own_samples_version(
    db_url: str, other_db_url: str, a: list[Any]
) -> None:
    async def run() -> None:
        tracker = await AvailabilityTracker.open(TrackerConfig(database_url=db_url))
        try:
            await _reset(tracker)
            await _apply(tracker, [[r] for r in a])
            stats, _, samples, _, _ = await _dump(tracker)
            columns = ["peer_key", "node_key"] + [
                c.name for c in peer_stats.c if c.name not in ("peer_id", "node_id")
            ]
            for row in stats:
                stored = dict(zip(columns, row, strict=True))
                origin = ORIGINS.index(stored["node_key"])
                assert stored["samples_version"] == _samples_version(stored["version"])
                held = sorted(
                    (at, bps)
                    for peer, node, at, bps in samples
                    if (peer, node) == (stored["peer_key"], stored["node_key"])
                )
                assert held == sorted(_samples(origin, stored["samples_version"]))
        finally:
            await tracker.close()

    asyncio.run(run())

"""Gossip between trackers on each engine: what spreads, what counts once, what stays removed."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from gossip_helpers import KEY, LocalNet, merged_view
from sqlalchemy import select

from tracker import AvailabilityTracker, TrackerConfig
from tracker.db import run_read, run_write
from tracker.events import PeerOnline, SpeedSample
from tracker.gossip.agent import GossipAgent
from tracker.gossip.config import GossipConfig
from tracker.gossip.protocol import MappingState, OriginDelta, PeerState
from tracker.queries import gossip as q
from tracker.queries.writes import refresh_speeds
from tracker.schema import content_peers, peer_stats, peers
from tracker.schema import nodes as nodes_table
from tracker.testing import ManualClock

T0 = 1_800_000_000.0


@pytest.fixture
def net() -> LocalNet:
    return LocalNet()


@pytest.fixture
def manual_clock() -> ManualClock:
    return ManualClock(T0)


async def _node(net: LocalNet, name: str, url: str, clock: ManualClock) -> GossipAgent:
    tracker = await AvailabilityTracker.open(TrackerConfig(database_url=url, clock=clock))
    agent = GossipAgent(tracker, GossipConfig(keys=(KEY,), max_rows=50, stamp_chunk=7), transport=net)
    net.agents[f"http://{name}"] = agent
    return agent


@pytest.fixture
async def nodes(
    db_url: str, tmp_path: Path, net: LocalNet, manual_clock: ManualClock
) -> AsyncIterator[list[GossipAgent]]:
    """Node a on the engine under test, b and c on SQLite files beside it."""
    agents = [
        await _node(net, "a", db_url, manual_clock),
        await _node(net, "b", f"sqlite+aiosqlite:///{tmp_path / 'b.db'}", manual_clock),
        await _node(net, "c", f"sqlite+aiosqlite:///{tmp_path / 'c.db'}", manual_clock),
    ]
    yield agents
    for agent in agents:
        await agent.aclose()
        await agent.tracker.close()


async def _sync(agent: GossipAgent, other: str, times: int = 2) -> None:
    for _ in range(times):
        await agent.exchange(f"http://{other}")


async def test_a_peer_that_failed_on_a_ranks_low_on_b(
    nodes: list[GossipAgent], manual_clock: ManualClock
) -> None:
    a, b, _ = nodes
    for peer in ("good", "bad"):
        await a.tracker.record_peer_online(peer)
        await a.tracker.record_content_available("cid", peer)
        await b.tracker.record_peer_online(peer)
    for _ in range(20):
        await a.tracker.record_upload_failure("bad")
        await a.tracker.record_upload_success("good")
    await b.tracker.record_upload_success("bad")
    before = await b.tracker.get_content_availability("cid")
    assert before is None  # b had never heard of the content
    await _sync(b, "a")
    ranked = await b.tracker.select_best_peers("cid", 2)
    assert [p.peer_id for p in ranked] == ["good"]  # proven below min_reputation: never chosen
    bad = await b.tracker.get_peer_metrics("bad")
    assert bad is not None and (bad.chunks_served, bad.chunks_failed) == (1, 20)
    assert await merged_view(a.tracker, ["cid"]) == await merged_view(b.tracker, ["cid"])


async def test_a_relayed_observation_counts_once(nodes: list[GossipAgent]) -> None:
    a, b, c = nodes
    await a.tracker.record_peer_online("p")
    for _ in range(5):
        await a.tracker.record_upload_success("p")
    await _sync(b, "a")  # b learns a's rows
    await _sync(c, "b")  # c learns them relayed
    await _sync(c, "a")  # and again straight from the origin
    await _sync(a, "c")
    metrics = await c.tracker.get_peer_metrics("p")
    assert metrics is not None and metrics.chunks_served == 5
    assert await merged_view(a.tracker, []) == await merged_view(c.tracker, [])


async def test_a_removal_is_not_undone_by_an_old_copy(
    nodes: list[GossipAgent], manual_clock: ManualClock
) -> None:
    a, b, c = nodes
    await a.tracker.record_peer_online("p")
    await a.tracker.record_content_available("cid", "p")
    await _sync(b, "a")  # b holds the announcement
    manual_clock.advance(10)
    await a.tracker.record_content_unavailable("cid", "p")
    await _sync(c, "a")  # c learns the removal first
    await _sync(c, "b")  # then b's old copy arrives: it loses
    await _sync(b, "c")
    for node in (a, b, c):
        assert await node.tracker.get_available_peers("cid") == []
    # An announcement dated before the removal, made on b, loses everywhere too.
    await b.tracker.record_content_available("cid", "p", at=T0 + 5)
    assert await b.tracker.get_available_peers("cid") == []


async def test_equal_times_are_broken_by_origin_key_on_every_node(nodes: list[GossipAgent]) -> None:
    a, b, _ = nodes
    at = T0 - 5
    for node in (a, b):
        await node.tracker.record_peer_online("p", at=at)
    await a.tracker.record_content_available("cid", "p", at=at)
    await b.tracker.record_content_unavailable("cid", "p", at=at)
    await _sync(a, "b")
    await _sync(b, "a")
    winner = max((a, b), key=lambda n: n.node_key)
    expected = ["p"] if winner is a else []
    assert await a.tracker.get_available_peers("cid") == expected
    assert await b.tracker.get_available_peers("cid") == expected


async def test_samples_travel_and_speed_is_computed_from_them(nodes: list[GossipAgent]) -> None:
    a, b, _ = nodes
    await a.tracker.record_peer_online("p")
    for speed in range(1, 13):  # 12 samples; the latest 10 count
        await a.tracker.record_download_speed("p", speed * 1000)
    await _sync(b, "a")
    metrics = await b.tracker.get_peer_metrics("p")
    assert metrics is not None and metrics.download_speed == 7500


async def test_deltas_after_the_first_exchange_carry_only_changes(nodes: list[GossipAgent]) -> None:
    a, b, _ = nodes
    await a.tracker.record_batch([])
    for i in range(120):  # more than max_rows=50: several messages, cut at version boundaries
        await a.tracker.record_peer_online(f"p{i:03}")
    await _sync(b, "a")
    assert len(await b.tracker.list_peers(limit=1000)) == 120
    sent = a.stats.rows_sent + b.stats.rows_sent
    await _sync(b, "a")
    await _sync(a, "b")
    assert a.stats.rows_sent + b.stats.rows_sent == sent  # a quiet swarm sends nothing
    await a.tracker.record_upload_success("p007")
    await _sync(b, "a", times=1)
    assert a.stats.rows_applied + b.stats.rows_applied >= 121
    metrics = await b.tracker.get_peer_metrics("p007")
    assert metrics is not None and metrics.chunks_served == 1


async def test_neighbours_are_learned_only_when_enabled(tmp_path: Path, net: LocalNet) -> None:
    clock = ManualClock(T0)
    trackers = [
        await AvailabilityTracker.open(
            TrackerConfig(database_url=f"sqlite+aiosqlite:///{tmp_path / f'{n}.db'}", clock=clock)
        )
        for n in ("x", "y", "z")
    ]
    try:
        x = GossipAgent(
            trackers[0],
            GossipConfig(
                keys=(KEY,), neighbors=("http://y",), advertise_url="http://x", learn_neighbors=True
            ),
            transport=net,
        )
        y = GossipAgent(trackers[1], GossipConfig(keys=(KEY,), learn_neighbors=True), transport=net)
        z = GossipAgent(trackers[2], GossipConfig(keys=(KEY,)), transport=net)
        for name, agent in (("http://x", x), ("http://y", y), ("http://z", z)):
            net.agents[name] = agent
        await x.exchange("http://y")
        assert y.neighbors == [
            "http://x"
        ]  # x's advertised URL; x's list names only the neighbours it reached
        await x.exchange("http://y")
        assert y.neighbors == ["http://x", "http://y"]  # now x's list has y
        await y.round()
        assert y.neighbors == ["http://x"]  # it met itself there once, and forgot that URL
        await z.exchange("http://y")
        assert z.neighbors == ["http://y"]  # z does not learn: only the one it was told
    finally:
        for tracker in trackers:
            await tracker.close()


async def _delta_row(agent: GossipAgent, base: int, peer: str) -> Any:
    """What ``agent`` would send about its own row of ``peer`` to a neighbour holding it, and all its
    samples, through ``base``."""

    async def work(conn: Any) -> Any:
        await q.stamp(conn, agent.tracker.config.dialect, agent.tracker.node_id, 7, at=0)
        held = {agent.node_key: base}
        delta = await q.read_deltas(conn, held, (), 50, 10, samples=held)
        return next(p for d in delta.deltas for p in d.peers if p.peer == peer)

    return await run_write(agent.tracker.engine, work, 3)


async def _vector(agent: GossipAgent) -> dict[str, int]:
    return (await run_read(agent.tracker.engine, q.vectors))[0]


async def _samples_vector(agent: GossipAgent) -> dict[str, int]:
    return (await run_read(agent.tracker.engine, q.vectors))[1]


async def test_a_heartbeat_travels_without_samples_and_the_receiver_keeps_its_own(
    nodes: list[GossipAgent], manual_clock: ManualClock
) -> None:
    a, b, _ = nodes
    await a.tracker.record_peer_online("p")
    for speed in (1000, 2000, 6000):
        await a.tracker.record_download_speed("p", speed)
    first = await _delta_row(a, 0, "p")
    assert first.samples is not None and len(first.samples) == 3
    await _sync(b, "a")
    held = (await _samples_vector(b))[a.node_key]
    assert held >= first.samples_version

    manual_clock.advance(30)
    await a.tracker.record_peer_online("p")  # a heartbeat: the row changes, its samples do not
    beat = await _delta_row(a, held, "p")
    assert beat.version > held and beat.samples is None and beat.samples_version == first.samples_version
    assert (await _delta_row(a, first.samples_version - 1, "p")).samples is not None  # an older base
    await _sync(b, "a")
    metrics = await b.tracker.get_peer_metrics("p")
    assert metrics is not None and metrics.download_speed == 3000 and metrics.last_seen.timestamp() == T0 + 30

    await a.tracker.record_download_speed("p", 9000)  # a sample: the row travels with its samples
    held = (await _samples_vector(b))[a.node_key]
    fresh = await _delta_row(a, held, "p")
    assert fresh.samples is not None and fresh.samples_version == fresh.version > held
    await _sync(b, "a")
    metrics = await b.tracker.get_peer_metrics("p")
    assert metrics is not None and metrics.download_speed == 4500
    assert await merged_view(a.tracker, []) == await merged_view(b.tracker, [])
    assert a.stats.resends_asked == b.stats.resends_asked == 0


def _row(version: int, samples_version: int, carried: bool) -> PeerState:
    return PeerState(
        peer="p",
        first_seen=T0,
        online=True,
        online_since=T0,
        last_seen=T0 + version,
        uptime_s=0.0,
        served=version,
        failed=0,
        success_weight=float(version),
        failure_weight=0.0,
        evidence_at=T0,
        updated_at=T0 + version,
        version=version,
        samples=[(T0 + samples_version, 1000 * samples_version)] if carried else None,
        samples_version=samples_version,
    )


async def test_a_row_without_the_samples_it_names_waits_and_its_origin_clock_asks_again(
    nodes: list[GossipAgent],
) -> None:
    a = nodes[0]
    tracker = a.tracker

    async def merge(base: int, upto: int, row: PeerState, samples: tuple[int, int]) -> q.MergeCounts:
        """A delta of one row, from a sender that assumed ``samples[0]`` and vouches for ``samples[1]``."""
        delta = OriginDelta(
            origin="x", base=base, upto=upto, samples_base=samples[0], samples_upto=samples[1], peers=[row]
        )

        async def work(conn: Any) -> q.MergeCounts:
            return await q.merge(conn, tracker.config.dialect, tracker.node_key, [delta], 10, tracker.now())

        return await run_write(tracker.engine, work, 3)

    async def stored() -> tuple[Any, int, int]:
        metrics = await tracker.get_peer_metrics("p")
        held = None if metrics is None else (metrics.chunks_served, metrics.download_speed)
        return held, (await _vector(a))["x"], (await _samples_vector(a))["x"]

    # Nothing held: a row without samples is not applied; the clocks stop below it and its samples.
    counts = await merge(0, 5, _row(5, 3, carried=False), (0, 5))
    assert (counts.peers, counts.waiting) == (0, 1)
    assert await stored() == (None, 4, 2)
    # The resend from there carries them.
    counts = await merge(4, 5, _row(5, 3, carried=True), (2, 5))
    assert (counts.peers, counts.waiting) == (1, 0)
    assert await stored() == ((5, 3000), 5, 5)
    # A newer row naming samples no newer than the stored row applies without them: counters move,
    # the speed stays.
    counts = await merge(5, 7, _row(7, 3, carried=False), (5, 7))
    assert (counts.peers, counts.waiting) == (1, 0)
    assert await stored() == ((7, 3000), 7, 7)
    # One naming samples this node has not seen waits, and the clocks go back below it.
    counts = await merge(7, 9, _row(9, 8, carried=False), (7, 9))
    assert (counts.peers, counts.waiting) == (0, 1)
    assert await stored() == ((7, 3000), 8, 7)
    # An old row without samples is just old: nothing to ask for.
    counts = await merge(8, 8, _row(6, 3, carried=False), (7, 7))
    assert (counts.peers, counts.waiting) == (0, 0)
    assert await stored() == ((7, 3000), 8, 7)
    # A sender that assumed more than this node holds moves neither clock.
    await merge(9, 12, _row(12, 8, carried=True), (8, 12))
    assert await stored() == ((12, 8000), 8, 7)


async def test_an_origin_named_twice_in_a_message_is_applied_copy_after_copy(
    nodes: list[GossipAgent],
) -> None:
    """Version 5 with its samples, then version 6 without them: applied one after the other the row
    ends at 6. Read together before either was written, the second found no row holding its samples,
    was left out and its origin's clocks lowered (QA round 71)."""
    tracker = nodes[0].tracker
    first = OriginDelta(origin="x", base=0, upto=5, samples_upto=5, peers=[_row(5, 5, carried=True)])
    second = OriginDelta(
        origin="x", base=5, upto=6, samples_base=5, samples_upto=6, peers=[_row(6, 5, carried=False)]
    )

    async def work(conn: Any) -> q.MergeCounts:
        return await q.merge(
            conn, tracker.config.dialect, tracker.node_key, [first, second], 10, tracker.now()
        )

    counts = await run_write(tracker.engine, work, 3)
    assert (counts.peers, counts.waiting) == (2, 0)
    metrics = await tracker.get_peer_metrics("p")
    assert metrics is not None and (metrics.chunks_served, metrics.download_speed) == (6, 5000)
    assert ((await _vector(nodes[0]))["x"], (await _samples_vector(nodes[0]))["x"]) == (6, 6)


async def test_a_row_that_moved_on_before_it_was_read_keeps_the_samples_clock_below_it(
    nodes: list[GossipAgent], manual_clock: ManualClock
) -> None:
    """A row stamped with new samples changes again (a heartbeat) before a delta is read: the delta
    passes its version without it, so its samples clock must stop below its samples."""
    a, b, _ = nodes
    await a.tracker.record_peer_online("p")
    await a.tracker.record_download_speed("p", 1000)
    await _sync(b, "a")
    await a.tracker.record_download_speed("p", 5000)
    stamped = await _delta_row(a, 0, "p")  # stamps: the new samples get a version
    manual_clock.advance(10)
    await a.tracker.record_peer_online("p")  # ...and the row is dirty again before anyone reads it

    async def read(conn: Any) -> Any:
        return await q.read_deltas(conn, await _vector(b), (), 50, 10, samples=await _samples_vector(b))

    async def merge(conn: Any) -> None:
        await q.merge(conn, b.tracker.config.dialect, b.node_key, delta.deltas, 10, b.tracker.now())

    delta = await run_read(a.tracker.engine, read)
    assert not [p for d in delta.deltas for p in d.peers]  # the dirty row is not in it
    assert [d.samples_upto for d in delta.deltas] == [stamped.samples_version - 1]
    await run_write(b.tracker.engine, merge, 3)
    assert (await _vector(b))[a.node_key] >= stamped.samples_version  # b's clock passed the row...
    assert (await _samples_vector(b))[a.node_key] < stamped.samples_version  # ...not its samples

    await _sync(b, "a")  # so the row comes with them
    metrics = await b.tracker.get_peer_metrics("p")
    assert metrics is not None and metrics.download_speed == 3000
    assert metrics.last_seen.timestamp() == T0 + 10
    assert await merged_view(a.tracker, []) == await merged_view(b.tracker, [])
    assert a.stats.resends_asked == b.stats.resends_asked == 0


async def test_a_first_contact_over_many_messages_brings_rows_whose_samples_are_older_than_the_cut(
    nodes: list[GossipAgent], manual_clock: ManualClock
) -> None:
    """Rows re-versioned by heartbeats after their samples, sent in several messages (max_rows 50):
    a samples version below where an earlier message was cut must not pass for held."""
    a, b, _ = nodes
    peers = [f"p{i:03}" for i in range(120)]
    await a.tracker.record_batch([SpeedSample(p, 1000 * (i + 1)) for i, p in enumerate(peers)])
    await _sync(a, "c")  # stamps the samples
    manual_clock.advance(30)
    await a.tracker.record_batch([PeerOnline(p) for p in peers])  # every row changes; no sample does
    await _sync(b, "a")
    speeds = {m.peer_id: m.download_speed for m in await b.tracker.list_peers(limit=1000)}
    assert speeds == {p: 1000 * (i + 1) for i, p in enumerate(peers)}
    assert await merged_view(a.tracker, []) == await merged_view(b.tracker, [])


async def test_a_merged_speed_is_the_mean_the_write_path_computes_over_the_stored_samples(
    nodes: list[GossipAgent],
) -> None:
    """The receiver takes a replaced row's speed from the message's samples instead of reading them
    back; recomputing it in SQL from what it stored must give the same figure."""
    tracker = nodes[0].tracker
    window = tracker.config.bandwidth_window
    cases: dict[str, list[tuple[float, int]]] = {
        "none": [],
        "one": [(T0, 1234)],
        "unordered": [(T0 + 3, 10), (T0 + 9, 20), (T0 + 1, 30), (T0 + 5, 45)],
        # Equal times: the stored order (by id) decides which the window keeps, the first listed.
        "ties": [(T0 + 7, value) for value in range(1, window + 3)] + [(T0 + 8, 100)],
        "beyond the window": [(T0 + i, 124 + 42881 * (i % 3)) for i in range(2 * window + 3)],
        "thirds": [(T0 + 3, 124), (T0 + 2, 42881), (T0 + 1, 563)],
    }
    rows = [
        PeerState.model_validate({**_row(1, 1, carried=False).model_dump(), "peer": name, "samples": samples})
        for name, samples in cases.items()
    ]
    delta = OriginDelta(origin="x", base=0, upto=1, samples_base=0, samples_upto=1, peers=rows)

    async def merge(conn: Any) -> q.MergeCounts:
        return await q.merge(conn, tracker.config.dialect, tracker.node_key, [delta], window, tracker.now())

    async def speeds(conn: Any) -> dict[str, float | None]:
        stmt = (
            select(peers.c.peer_key, peer_stats.c.speed_bps)
            .join(peer_stats, peer_stats.c.peer_id == peers.c.id)
            .join(nodes_table, nodes_table.c.id == peer_stats.c.node_id)
            .where(nodes_table.c.node_key == "x")
        )
        return {str(k): v for k, v in (await conn.execute(stmt)).all()}

    async def recompute(conn: Any) -> None:
        origin = (
            await conn.execute(select(nodes_table.c.id).where(nodes_table.c.node_key == "x"))
        ).scalar_one()
        await refresh_speeds(conn, tracker.config.dialect, origin, sorted(cases), window)

    assert (await run_write(tracker.engine, merge, 3)).peers == len(cases)
    merged = await run_read(tracker.engine, speeds)
    await run_write(tracker.engine, recompute, 3)
    recomputed = await run_read(tracker.engine, speeds)
    assert merged["none"] is None and recomputed["none"] is None
    assert merged["ties"] == pytest.approx((100 + sum(range(1, window))) / window)
    for name in sorted(set(cases) - {"none"}):
        if tracker.config.dialect == "sqlite":
            assert merged[name] == recomputed[name], name
        else:  # numeric average: the last bit may round differently
            assert merged[name] == pytest.approx(recomputed[name], rel=1e-15), name


async def test_stamping_gives_each_changed_row_one_version_of_at_most_a_chunk(
    tracker: AvailabilityTracker,
) -> None:
    """Versions hold at most ``chunk`` rows, every changed row gets one, and only changed rows get
    the next ones (on Postgres a cursor walks the dirty rows once: looking them up again per chunk
    re-read every row already stamped in the transaction)."""
    dialect, node = tracker.config.dialect, tracker.node_id
    await tracker.record_batch([PeerOnline(f"peer-{i:04d}") for i in range(1_050)])

    async def stamp(conn: Any) -> int:
        return (await q.stamp(conn, dialect, node, 100, at=0)).clock

    async def versions(conn: Any) -> list[Any]:
        return list((await conn.execute(select(peer_stats.c.version))).scalars())

    before = await run_read(tracker.engine, lambda conn: q.vectors(conn))
    start = before[0][tracker.node_key]
    clock = await run_write(tracker.engine, stamp, 3)
    stamped = await run_read(tracker.engine, versions)
    assert None not in stamped and len(stamped) == 1_050
    per_version = {v: stamped.count(v) for v in set(stamped)}
    assert sorted(per_version) == list(range(start + 1, clock + 1)) and max(per_version.values()) <= 100
    assert clock - start == 11  # 1,050 rows, 100 a version
    assert await run_write(tracker.engine, stamp, 3) == clock  # nothing changed: no new version

    await tracker.record_batch([PeerOnline(f"peer-{i:04d}") for i in (3, 500, 1_049)])
    assert await run_write(tracker.engine, stamp, 3) == clock + 1
    again = await run_read(tracker.engine, versions)
    assert again.count(clock + 1) == 3 and None not in again


async def test_a_stamp_starts_above_the_clock_in_milliseconds_and_never_goes_back(
    tracker: AvailabilityTracker,
) -> None:
    """Versions follow the tracker's clock (a restored node's next changes then start above every
    version it sent before: QA round 62, F2), never below the stored clock, and a stamp with nothing
    to stamp moves nothing; a time no version can carry leaves the counter alone."""
    dialect, node = tracker.config.dialect, tracker.node_id

    async def stamp_at(at: float) -> int:
        return await run_write(tracker.engine, lambda conn: q.stamp(conn, dialect, node, 100, at=at), 3)

    async def clock() -> int:
        return (await run_read(tracker.engine, q.vectors))[0][tracker.node_key]

    t = 1_800_000_000.25
    await tracker.record_batch([PeerOnline(f"peer-{i}") for i in range(150)])
    assert (await stamp_at(t)).clock == 1_800_000_000_250 + 2  # two versions of at most 100 rows
    assert (await stamp_at(t + 3600)).clock == await clock() == 1_800_000_000_252  # nothing to stamp
    await tracker.record_batch([PeerOnline("peer-0")])
    assert (await stamp_at(t - 3600)).clock == 1_800_000_000_253  # a clock set back: the stored one
    await tracker.record_batch([PeerOnline("peer-1")])
    assert (await stamp_at(t + 1)).clock == 1_800_000_001_251
    for impossible in (-1.0, float("nan"), float("inf"), 1e20):
        await tracker.record_batch([PeerOnline("peer-2")])
        before = await clock()
        assert (await stamp_at(impossible)).clock == before + 1


async def test_key_lookups_are_planned_for_the_tables_as_they_grow(tracker: AvailabilityTracker) -> None:
    """A first contact fills empty tables message by message. The merge's key lookups must not run a
    plan Postgres cached while ``contents`` was small (asyncpg prepares every statement; after five
    runs Postgres may keep a generic plan, costed once: one seq-scanned the table against every key of
    a 2,000-key list, 87 ms a lookup at 10,000 contents). Here the same 50 contents come eight times,
    then 4,000 new ones, then 50 new ones eight times: the lookups of 50 keys must be planned afresh."""
    dialect = tracker.config.dialect

    def delta(m: int, cids: list[str]) -> OriginDelta:
        mappings = [
            MappingState(
                cid=cid,
                peer=f"peer-{i % 100:03d}",
                available=True,
                since=T0,
                last_confirmed=T0,
                changed_at=T0 + m,
                version=m + 1,
            )
            for i, cid in enumerate(cids)
        ]
        return OriginDelta(origin="x", base=m, upto=m + 1, mappings=mappings)

    few = [f"cid-{i:02d}" for i in range(50)]
    grow = [f"cid-more-{i:04d}" for i in range(4000)]
    messages = [few] * 8 + [grow] + [[f"cid-{m}-{i:02d}" for i in range(50)] for m in range(8)]
    mode = "SELECT current_setting('plan_cache_mode')"
    async with tracker.engine.begin() as conn:  # one connection: the prepared statements are its own
        before = (await conn.exec_driver_sql(mode)).scalar() if dialect == "postgresql" else None
        for m, cids in enumerate(messages):
            counts = await q.merge(conn, dialect, tracker.node_key, [delta(m, cids)], 10, tracker.now())
            assert counts.mappings == len(cids)
        # An older copy of rows held newer changes nothing and counts nothing.
        assert (
            await q.merge(conn, dialect, tracker.node_key, [delta(0, few)], 10, tracker.now())
        ).mappings == 0
        if dialect == "postgresql":
            plans = (
                await conn.exec_driver_sql(
                    "SELECT generic_plans, custom_plans FROM pg_prepared_statements"
                    r" WHERE statement ~ 'FROM contents\s+WHERE contents\.content_key'"
                )
            ).all()
            assert sum(custom for _, custom in plans) >= len(messages) + 2  # new keys are read again
            assert all(generic == 0 for generic, _ in plans), plans
            # The mode is the session's again: the per-row statements keep their cached plans.
            assert (await conn.exec_driver_sql(mode)).scalar() == before

    async def contents_held(conn: Any) -> int:
        cp = content_peers.c
        return len((await conn.execute(select(cp.content_id).distinct())).all())

    assert await run_read(tracker.engine, contents_held) == 50 + 4000 + 8 * 50


@pytest.mark.parametrize("engine_name", ["postgresql"], indirect=True)
async def test_stamping_passes_over_rows_a_writer_holds_instead_of_waiting(
    tracker: AvailabilityTracker,
) -> None:
    """The stamper waited for rows while holding the stamp lock and rows of its own; merges (which
    stamp after merging) and ingest then deadlocked with it under load (found by a QA pass)."""
    dialect, node = tracker.config.dialect, tracker.node_id
    await tracker.record_batch([PeerOnline(f"peer-{i}") for i in range(3)])

    async def stamp(conn: Any) -> int:
        return (await q.stamp(conn, dialect, node, 100, at=0)).clock

    async def versions(conn: Any) -> dict[str, Any]:
        rows = await conn.execute(
            select(peers.c.peer_key, peer_stats.c.version).join(peers, peers.c.id == peer_stats.c.peer_id)
        )
        return dict(rows.all())

    async with tracker.engine.connect() as holder:
        await holder.begin()
        held = select(peers.c.id).where(peers.c.peer_key == "peer-1").scalar_subquery()
        await holder.execute(peer_stats.update().where(peer_stats.c.peer_id == held).values(version=None))
        await asyncio.wait_for(run_write(tracker.engine, stamp, 3), timeout=10)  # waited forever before
        stamped = await run_read(tracker.engine, versions)
        assert stamped["peer-1"] is None and stamped["peer-0"] is not None and stamped["peer-2"] is not None
        await holder.rollback()
    clock = await run_write(tracker.engine, stamp, 3)
    assert (await run_read(tracker.engine, versions))["peer-1"] == clock  # the next stamp takes it


@asynccontextmanager
async def _restored(
    db_url: str, path: Path, net: LocalNet, clock: ManualClock, *, tick: float
) -> AsyncIterator[tuple[GossipAgent, GossipAgent]]:
    """Nodes a (``db_url``) and b (a SQLite file at ``path``): b gossips twelve changes to a after a
    copy of its file is taken, ``tick`` seconds apart, and is then restored from the copy."""
    url = f"sqlite+aiosqlite:///{path}"
    agents = {"a": await _node(net, "a", db_url, clock), "b": await _node(net, "b", url, clock)}

    async def restart(restore: Path | None = None) -> None:
        await agents["b"].aclose()
        await agents["b"].tracker.close()
        if restore is not None:
            for leftover in path.parent.glob(f"{path.name}-*"):
                leftover.unlink()
            shutil.copy(restore, path)
        agents["b"] = await _node(net, "b", url, clock)

    try:
        await agents["b"].tracker.record_peer_online("before-the-copy")
        await _sync(agents["b"], "a")
        await restart()
        shutil.copy(path, path.with_name("copy.db"))
        for i in range(12):  # versions a will hold and the copy lacks
            clock.advance(tick)
            await agents["b"].tracker.record_peer_online(f"lost-{i}")
            await _sync(agents["b"], "a", times=1)
        await restart(restore=path.with_name("copy.db"))
        yield agents["a"], agents["b"]
    finally:
        for agent in agents.values():
            await agent.aclose()
            await agent.tracker.close()


@pytest.mark.parametrize("initiator", ["restored", "neighbour"])
async def test_a_node_restored_from_an_old_copy_raises_its_clock_and_its_new_rows_travel(
    db_url: str, tmp_path: Path, net: LocalNet, manual_clock: ManualClock, initiator: str
) -> None:
    """Restored from a file copy, b stamped new changes with versions a already held, and a ignored
    them for good (found by a QA pass of live trackers). Here no time passes: a's clock of b, above
    b's, makes b raise its clock and send everything again."""
    async with _restored(db_url, tmp_path / "b.db", net, manual_clock, tick=0) as (a, b):
        await b.tracker.record_peer_online("after-the-restore")
        for _ in range(3):
            await (_sync(b, "a", times=1) if initiator == "restored" else _sync(a, "b", times=1))
        assert await a.tracker.get_peer_metrics("after-the-restore") is not None
        assert await b.tracker.get_peer_metrics("lost-3") is None  # the copy's own past is not brought back


async def test_a_restored_node_that_stamps_past_its_neighbours_clock_of_it_before_gossiping_loses_nothing(
    db_url: str, tmp_path: Path, net: LocalNet, manual_clock: ManualClock
) -> None:
    """Restored from a copy, b stamped its new changes up to and past a's clock of it before its
    first exchange: a's vector then showed no gap, b sent only the versions above it, and the changes
    under versions a held from before the restore never reached a (QA round 62, F2). Versions follow
    the wall clock in milliseconds now, so the restored node's first stamp is above every version it
    sent before."""
    async with _restored(db_url, tmp_path / "b.db", net, manual_clock, tick=1) as (a, b):
        manual_clock.advance(60)
        new = [f"new-{i}" for i in range(100)]  # 15 versions of 7 rows: past what a holds of b
        await b.tracker.record_batch([PeerOnline(peer) for peer in new])
        await _sync(b, "a")
        missing = [peer for peer in new if await a.tracker.get_peer_metrics(peer) is None]
        assert missing == []

"""Gossip between trackers on each engine: what spreads, what counts once, what stays removed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from gossip_helpers import KEY, LocalNet, merged_view

from tracker import AvailabilityTracker, TrackerConfig
from tracker.gossip.agent import GossipAgent
from tracker.gossip.config import GossipConfig
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
        assert y.neighbors == ["http://x", "http://y"]  # x's advertised URL, and x's list (with y)
        await y.round()
        assert y.neighbors == ["http://x"]  # it met itself there once, and forgot that URL
        await z.exchange("http://y")
        assert z.neighbors == ["http://y"]  # z does not learn: only the one it was told
    finally:
        for tracker in trackers:
            await tracker.close()

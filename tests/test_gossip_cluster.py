"""Five trackers gossip over real HTTP on 127.0.0.1 (four SQLite files, one Postgres) and converge;
a partitioned node catches up after healing and removals stay removed."""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from gossip_helpers import KEY, LocalNet, merged_view

from tracker import AvailabilityTracker, TrackerConfig
from tracker.gossip.agent import GossipAgent
from tracker.gossip.config import GossipConfig
from tracker.service.app import create_app
from tracker.testing import ManualClock

T0 = 1_800_000_000.0
PEERS = [f"peer-{i:02}" for i in range(30)]
CIDS = [f"cid-{i}" for i in range(8)]


async def _random_events(tracker: AvailabilityTracker, rng: random.Random, count: int) -> None:
    for _ in range(count):
        peer, cid, roll = rng.choice(PEERS), rng.choice(CIDS), rng.random()
        if roll < 0.25:
            await tracker.record_peer_online(peer)
        elif roll < 0.35:
            await tracker.record_peer_offline(peer)
        elif roll < 0.5:
            await tracker.record_download_speed(peer, rng.randrange(100_000, 20_000_000))
        elif roll < 0.7:
            if rng.random() < 0.7:
                await tracker.record_upload_success(peer)
            else:
                await tracker.record_upload_failure(peer)
        elif roll < 0.9:
            await tracker.record_content_available(cid, peer)
        else:
            await tracker.record_content_unavailable(cid, peer)


async def _views(agents: list[GossipAgent]) -> list[Any]:
    return [await merged_view(agent.tracker, CIDS) for agent in agents]


async def _rounds_to_converge(agents: list[GossipAgent], limit: int = 20) -> int:
    for rounds in range(1, limit + 1):
        await asyncio.gather(*(agent.round() for agent in agents))
        views = await _views(agents)
        if all(view == views[0] for view in views[1:]):
            return rounds
    raise AssertionError(f"no convergence within {limit} rounds")


@pytest.fixture
async def http_cluster(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[list[GossipAgent]]:
    """Four SQLite trackers and one on Postgres, each behind a real uvicorn server on 127.0.0.1."""
    from conftest import _pg_database

    template = request.getfixturevalue("pg_template")
    clock = ManualClock(T0)
    pg = _pg_database(template)
    urls = [f"sqlite+aiosqlite:///{tmp_path / f'node{i}.db'}" for i in range(4)] + [await anext(pg)]
    agents, servers, tasks = [], [], []
    try:
        for i, url in enumerate(urls):
            tracker = await AvailabilityTracker.open(TrackerConfig(database_url=url, clock=clock))
            agent = GossipAgent(tracker, GossipConfig(keys=(KEY,), fanout=3), rng=random.Random(i))
            server = uvicorn.Server(
                uvicorn.Config(
                    create_app(tracker, gossip=agent),
                    host="127.0.0.1",
                    port=0,
                    lifespan="off",
                    log_config=None,
                )
            )
            tasks.append(asyncio.create_task(server.serve()))
            while not server.started:
                await asyncio.sleep(0.01)
            agents.append(agent)
            servers.append(server)
        ports = [s.servers[0].sockets[0].getsockname()[1] for s in servers]
        for agent, port in zip(agents, ports, strict=True):
            for other in ports:
                if other != port:
                    agent.add_neighbor(f"http://127.0.0.1:{other}")
        yield agents
    finally:
        for server in servers:
            server.should_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)
        for agent in agents:
            await agent.aclose()
            await agent.tracker.close()
        await pg.aclose()


async def test_five_nodes_over_http_converge_within_a_few_rounds(http_cluster: list[GossipAgent]) -> None:
    agents = http_cluster
    rng = random.Random(11)
    for agent in agents:
        await _random_events(agent.tracker, rng, 60)
    rounds = await _rounds_to_converge(agents)
    assert rounds <= math.ceil(math.log2(len(agents))) + 3
    # Identical answers everywhere: metrics, availability and the best peers (no leases yet anywhere).
    views = await _views(agents)
    assert all(view == views[0] for view in views)
    best = [[[p.peer_id for p in await a.tracker.select_best_peers(cid, 3)] for cid in CIDS] for a in agents]
    assert all(b == best[0] for b in best)
    assert any(views[0]["availability"][cid] for cid in CIDS)
    # Quiet swarm: once every pair has refreshed its idea of the other's vector, rounds send no rows.
    quiet = []
    for _ in range(6):
        sent = sum(a.stats.rows_sent for a in agents)
        await asyncio.gather(*(agent.round() for agent in agents))
        quiet.append(sum(a.stats.rows_sent for a in agents) - sent)
    assert quiet[-2:] == [0, 0], quiet
    assert sum(a.stats.failures for a in agents) == 0


async def test_a_partitioned_node_catches_up_and_removals_stay_removed(tmp_path: Path) -> None:
    clock = ManualClock(T0)
    net = LocalNet()
    names = [f"http://n{i}" for i in range(5)]
    agents = []
    for i, name in enumerate(names):
        tracker = await AvailabilityTracker.open(
            TrackerConfig(database_url=f"sqlite+aiosqlite:///{tmp_path / f'n{i}.db'}", clock=clock)
        )
        agent = GossipAgent(
            tracker,
            GossipConfig(keys=(KEY,), fanout=3, neighbors=tuple(n for n in names if n != name)),
            transport=net.transport_for(name),
            rng=random.Random(i),
        )
        net.agents[name] = agent
        agents.append(agent)
    try:
        for agent in agents[:3]:
            await agent.tracker.record_peer_online("p")
            await agent.tracker.record_content_available("cid-0", "p")
        await _rounds_to_converge(agents)
        lonely = agents[4]
        net.isolated.add(names[4])
        clock.advance(5)
        # The majority removes the mapping and learns new facts; the isolated node keeps announcing others.
        await agents[0].tracker.record_content_unavailable("cid-0", "p")
        await agents[1].tracker.record_upload_failure("p")
        await lonely.tracker.record_peer_online("q")
        await lonely.tracker.record_content_available("cid-1", "q")
        for _ in range(3):
            await asyncio.gather(*(agent.round() for agent in agents))
        assert await lonely.tracker.get_available_peers("cid-0") == ["p"]  # it has not heard
        assert await agents[2].tracker.get_available_peers("cid-1") == []
        clock.advance(200)  # beyond every back-off
        net.isolated.clear()
        await _rounds_to_converge(agents)
        for agent in agents:
            assert await agent.tracker.get_available_peers("cid-0") == []
            assert await agent.tracker.get_available_peers("cid-1") == ["q"]
            metrics = await agent.tracker.get_peer_metrics("p")
            assert metrics is not None and metrics.chunks_failed == 1
    finally:
        for agent in agents:
            await agent.tracker.close()

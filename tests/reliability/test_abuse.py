"""A flood from one connection or one gossip neighbour gets 429s and does not starve anyone else."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from gossip_helpers import KEY

from tracker import AvailabilityTracker, TrackerConfig
from tracker.gossip.agent import GossipAgent
from tracker.gossip.config import GossipConfig
from tracker.gossip.protocol import Keyring, Message, new_nonce, signed
from tracker.ratelimit import TokenBuckets
from tracker.service import ServiceSettings
from tracker.service.app import create_app
from tracker.testing import ManualClock

T0 = 1_800_000_000.0


def test_a_bucket_refills_at_its_rate_and_caps_at_its_burst() -> None:
    clock = ManualClock(0.0)
    buckets = TokenBuckets(2.0, 3, clock=clock)
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(0.5)
    assert buckets.take("b") == 0.0  # another key is untouched
    clock.advance(10)  # refills to the burst, not beyond
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") > 0


async def test_one_flooding_connection_is_limited_and_others_are_served(tracker: AvailabilityTracker) -> None:
    clock = ManualClock(0.0)
    settings = ServiceSettings(rate_limit_per_s=10.0, rate_limit_burst=20)
    app = create_app(tracker, settings, rate_clock=clock)
    flooder = httpx.ASGITransport(app=app, client=("127.0.0.1", 40001))
    polite = httpx.ASGITransport(app=app, client=("127.0.0.1", 40002))
    async with (
        httpx.AsyncClient(transport=flooder, base_url="http://t") as bad,
        httpx.AsyncClient(transport=polite, base_url="http://t") as good,
    ):
        statuses = [
            (await bad.post("/v1/peers/online", json={"peer_id": f"f{i}"})).status_code for i in range(100)
        ]
        assert statuses.count(200) == 20 and statuses.count(429) == 80
        limited = await bad.get("/v1/stats")
        assert limited.status_code == 429
        assert limited.json()["error"]["code"] == "rate_limited" and int(limited.headers["Retry-After"]) >= 1
        assert (await bad.get("/healthz")).status_code == 200  # probes are never limited
        for i in range(20):
            assert (await good.post("/v1/peers/online", json={"peer_id": f"g{i}"})).status_code == 200
        clock.advance(1.0)  # ten more tokens
        assert (await bad.get("/v1/stats")).status_code == 200
    stats = await tracker.stats()
    assert stats.peers_total == 40  # the 80 refused writes wrote nothing
    metrics_app = create_app(tracker, ServiceSettings(rate_limit_per_s=0))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=metrics_app), base_url="http://t") as c:
        assert all([(await c.get("/v1/stats")).status_code == 200 for _ in range(50)])  # 0: off


async def test_a_flood_on_one_real_connection_does_not_starve_another(tmp_path: Path) -> None:
    tracker = await AvailabilityTracker.open(
        TrackerConfig(database_url=f"sqlite+aiosqlite:///{tmp_path / 'r.db'}")
    )
    app = create_app(tracker, ServiceSettings(rate_limit_per_s=50.0, rate_limit_burst=50))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off", log_config=None))
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        base = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        limits = httpx.Limits(max_connections=1)  # one keep-alive connection each
        async with (
            httpx.AsyncClient(base_url=base, limits=limits) as flood,
            httpx.AsyncClient(base_url=base, limits=limits) as other,
        ):

            async def flooding() -> list[int]:
                return [(await flood.get("/v1/stats")).status_code for _ in range(400)]

            async def polite() -> list[int]:
                codes = []
                for _ in range(20):
                    codes.append((await other.get("/v1/stats")).status_code)
                    await asyncio.sleep(0.02)
                return codes

            flood_codes, polite_codes = await asyncio.gather(flooding(), polite())
        assert flood_codes.count(429) > 200
        assert polite_codes == [200] * 20
    finally:
        server.should_exit = True
        await serving
        await tracker.close()


async def test_a_flooding_gossip_neighbour_is_limited_by_node(tmp_path: Path) -> None:
    clock = ManualClock(T0)
    tracker = await AvailabilityTracker.open(
        TrackerConfig(database_url=f"sqlite+aiosqlite:///{tmp_path / 'g.db'}", clock=clock)
    )
    try:
        agent = GossipAgent(tracker, GossipConfig(keys=(KEY,), max_messages_per_s=1.0, message_burst=5))
        keyring = Keyring([KEY])

        def message(node: str) -> tuple[bytes, str]:
            body, headers = signed(
                Message(kind="sync", node=node, sent_at=T0, nonce=new_nonce(), vector={}), keyring
            )
            return body, headers["Authorization"]

        flood = [(await agent.handle(*message("flooder")))[0] for _ in range(12)]
        assert flood == [200] * 5 + [429] * 7
        assert agent.stats.rejected["rate_limited"] == 7
        assert (await agent.handle(*message("neighbour")))[0] == 200
        clock.advance(2)
        assert (await agent.handle(*message("flooder")))[0] == 200
    finally:
        await tracker.close()


async def test_probes_of_an_app_mounted_under_a_prefix_are_not_rate_limited(
    tracker: AvailabilityTracker,
) -> None:
    """Mounted by an embedding application under /tracker, its probes met the limit: the exemption
    compared the full path (QA round 22)."""
    settings = ServiceSettings(rate_limit_per_s=1.0, rate_limit_burst=1)
    parent = FastAPI()
    parent.mount("/tracker", create_app(tracker, settings, rate_clock=lambda: 0.0))
    transport = httpx.ASGITransport(app=parent)
    async with httpx.AsyncClient(transport=transport, base_url="http://embedder.test") as client:
        probes = [(await client.get("/tracker/healthz")).status_code for _ in range(5)]
        stats = [(await client.get("/tracker/v1/stats")).status_code for _ in range(3)]
    assert probes == [200] * 5
    assert stats == [200, 429, 429]  # the rest of the API is limited as before

"""Nothing blocks the event loop: work that costs tens of milliseconds of CPU runs in a thread.

Gossip messages are one case: validating one of 5,000 peer rows took 70-160 ms, building it from
the rows read 50-100 ms, encoding it 40 ms, all on the event loop, which held up every selection
the tracker served meanwhile (up to 0.2 s at a time, measured). Large batches are the other: a
service request of 50,000 events held the loop for 0.6-1.4 s. These tests watch which thread runs
that work, with real databases of each engine.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import threading
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi.exceptions import RequestValidationError
from gossip_helpers import KEY, LocalNet, merged_view
from sqlalchemy import select

from tracker import AvailabilityTracker, TrackerConfig, compiled, core
from tracker.events import ContentAvailable, Event, PeerOnline, SpeedSample, UploadOutcome
from tracker.gossip import agent as agent_module
from tracker.gossip.agent import GossipAgent
from tracker.gossip.config import GossipConfig
from tracker.offload import OFF_LOOP_ITEMS
from tracker.queries.gossip import deltas
from tracker.schema import bandwidth_samples, peers
from tracker.service import ServiceSettings, create_app, routes, schemas
from tracker.testing import ManualClock

PEERS = [f"peer-{i:03}" for i in range(40)]
CIDS = [f"cid-{i}" for i in range(5)]


def _events() -> list[Event]:
    out: list[Event] = []
    for i, peer in enumerate(PEERS):
        out.append(PeerOnline(peer))
        out += [SpeedSample(peer, 1_000_000 + 1_000 * i + j) for j in range(12)]
        out.append(UploadOutcome(peer, i % 3 != 0))
        out.append(ContentAvailable(CIDS[i % len(CIDS)], peer))
    return out


async def _samples(tracker: AvailabilityTracker) -> set[tuple[str, float, int]]:
    b = bandwidth_samples.c
    async with tracker.engine.connect() as conn:
        rows = await conn.execute(
            select(peers.c.peer_key, b.at, b.bytes_per_sec).join(peers, peers.c.id == b.peer_id)
        )
        return {(str(key), float(at), int(bps)) for key, at, bps in rows}


def _spy(threads: dict[str, set[int]], name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    def spied(*args: Any, **kwargs: Any) -> Any:
        threads.setdefault(name, set()).add(threading.get_ident())
        return function(*args, **kwargs)

    return spied


async def test_gossip_messages_are_built_encoded_and_decoded_off_the_event_loop(
    db_url: str, other_db_url: str, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: dict[str, set[int]] = {}
    for module, name in ((agent_module, "decode"), (agent_module, "signed"), (deltas, "_origin_delta")):
        monkeypatch.setattr(module, name, _spy(threads, name, getattr(module, name)))
    # Postgres inserts a message's samples (and writes a batch's rows) in statements of at most
    # ARRAY_ROWS rows: asyncpg encodes the arrays on the event loop (90 ms for 50,000 samples).
    # Small here, so this exchange takes the chunked path and must still apply every sample.
    monkeypatch.setattr(compiled, "ARRAY_ROWS", 7)
    net = LocalNet()
    nodes: dict[str, GossipAgent] = {}
    try:
        for name, url in (("http://a", db_url), ("http://b", other_db_url)):
            tracker = await AvailabilityTracker.open(TrackerConfig(database_url=url, clock=clock))
            nodes[name] = net.agents[name] = GossipAgent(
                tracker, GossipConfig(keys=(KEY,), max_rows=50, stamp_chunk=10), transport=net
            )
        await nodes["http://a"].tracker.record_batch(_events())
        for _ in range(5):  # first contact, then follow-ups of at most 50 rows each
            if not await nodes["http://b"].exchange("http://a"):
                break
        loop_thread = threading.get_ident()
        assert set(threads) == {"decode", "signed", "_origin_delta"}, threads
        assert all(loop_thread not in used for used in threads.values()), threads
        assert await merged_view(nodes["http://b"].tracker, CIDS) == await merged_view(
            nodes["http://a"].tracker, CIDS
        )
        held, sent = await _samples(nodes["http://a"].tracker), await _samples(nodes["http://b"].tracker)
        window = nodes["http://a"].tracker.config.bandwidth_window
        assert len(sent) == len(PEERS) * window  # each peer's latest samples, every one stored
        assert sent <= held
    finally:
        for node in nodes.values():
            await node.tracker.close()


def _batch(size: int) -> list[dict[str, Any]]:
    """A request body's events: ``size`` of them, a quarter of each of four kinds."""
    kinds = (
        lambda i: {"type": "peer_online", "peer_id": f"p{i % 300}"},
        lambda i: {"type": "speed_sample", "peer_id": f"p{i % 300}", "bytes_per_sec": 1_000 + i},
        lambda i: {"type": "upload_outcome", "peer_id": f"p{i % 300}", "success": i % 3 != 0},
        lambda i: {"type": "content_available", "cid": f"c{i % 7}", "peer_id": f"p{i % 300}"},
    )
    return [kinds[i % 4](i) for i in range(size)]


@pytest.mark.parametrize("size", [OFF_LOOP_ITEMS - 1, OFF_LOOP_ITEMS])
async def test_a_large_batch_is_checked_and_converted_off_the_event_loop(
    tracker: AvailabilityTracker, size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From ``OFF_LOOP_ITEMS`` events on (and only then: a thread costs a single event more than its
    checks), a service batch becomes events, and the library checks and stamps them, in a thread;
    every event applies and is counted once by kind."""
    threads: dict[str, set[int]] = {}
    monkeypatch.setattr(routes, "to_events", _spy(threads, "to_events", routes.to_events))
    monkeypatch.setattr(core, "check_batch", _spy(threads, "check_batch", core.check_batch))
    app = create_app(tracker, ServiceSettings())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t.test") as api:
        response = await api.post("/v1/events", json={"events": _batch(size)})
        assert response.status_code == 200, response.text
        assert response.json() == {"applied": size}
        metrics = (await api.get("/metrics")).text
    loop_thread = threading.get_ident()
    assert set(threads) == {"to_events", "check_batch"}
    assert all((loop_thread in used) == (size < OFF_LOOP_ITEMS) for used in threads.values()), threads
    for kind, count in (("peer_online", (size + 3) // 4), ("upload_outcome", (size + 1) // 4)):
        assert f'tracker_events_ingested_total{{kind="{kind}"}} {float(count)}' in metrics
    stats = await tracker.stats()
    assert (stats.peers_total, stats.contents_total) == (300, 7)
    listed = await tracker.list_peers(limit=1_000)
    assert sum(p.chunks_served + p.chunks_failed for p in listed) == (size + 1) // 4


async def test_a_big_batch_is_validated_in_slices_between_which_the_loop_serves_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Validated whole, 50,000 items held the loop 0.1-0.4 s (pydantic keeps the interpreter lock,
    so a thread would not help); in slices, other tasks run between them, and an error still names
    the item's place in the whole batch."""
    monkeypatch.setattr(schemas, "ITEMS_PER_TURN", 2)
    seen: list[str] = []
    real = schemas._ITEMS

    class Spy:
        def validate_python(self, chunk: Any) -> Any:
            seen.append("slice")
            return real.validate_python(chunk)

    monkeypatch.setattr(schemas, "_ITEMS", Spy())

    async def other() -> None:
        while True:
            seen.append("other")
            await asyncio.sleep(0)

    running = asyncio.create_task(other())
    await asyncio.sleep(0)
    raw = [{"type": "peer_online", "peer_id": f"p{i}"} for i in range(6)]
    items = await schemas.batch_items(raw, 100)
    assert [item.peer_id for item in items] == [f"p{i}" for i in range(6)]
    slices = [i for i, what in enumerate(seen) if what == "slice"]
    assert len(slices) == 3 and all("other" in seen[a:b] for a, b in itertools.pairwise(slices))
    with pytest.raises(RequestValidationError) as refused:
        await schemas.batch_items(
            [*raw[:5], {"type": "speed_sample", "peer_id": "p", "bytes_per_sec": -1}], 100
        )
    running.cancel()
    assert [e["loc"] for e in refused.value.errors()] == [
        ("body", "events", 5, "speed_sample", "bytes_per_sec")
    ]


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released), so a send fails at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_the_gossip_http_client_is_built_once_off_the_event_loop(
    tracker: AvailabilityTracker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Building httpx's client loads the CA bundle (20-40 ms of CPU): in a thread, and only once even
    when the first round's exchanges start together."""
    threads: dict[str, set[int]] = {}
    built: list[httpx.AsyncClient] = []
    build = agent_module.new_client

    def counted(timeout_s: float) -> httpx.AsyncClient:
        built.append(build(timeout_s))
        return built[-1]

    monkeypatch.setattr(agent_module, "new_client", _spy(threads, "new_client", counted))
    urls = [f"http://127.0.0.1:{_closed_port()}" for _ in range(3)]
    agent = GossipAgent(tracker, GossipConfig(keys=(KEY,), neighbors=tuple(urls), fanout=3, timeout_s=2))
    try:
        assert await agent.round() == 0  # nothing listens: every exchange fails, each one counted
        assert agent.stats.failures == 3
        assert len(built) == 1, built
        assert threading.get_ident() not in threads["new_client"], threads
    finally:
        await agent.aclose()
    assert built[0].is_closed

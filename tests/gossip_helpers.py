"""Shared by the gossip tests: an in-process network of agents and a node's merged view."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from tracker import AvailabilityTracker, TrackerConfig
from tracker.gossip import limits
from tracker.gossip.agent import GOSSIP_PATH, GossipAgent
from tracker.gossip.config import GossipConfig
from tracker.testing import ManualClock

KEY = "test-gossip-key-0123456789"


class LocalNet:
    """Routes ``http://<name>`` to that node's agent without sockets (the HTTP path has its own test)."""

    def __init__(self) -> None:
        self.agents: dict[str, GossipAgent] = {}
        self.down: set[str] = set()
        #: Nodes cut off from everyone: they can neither reach nor be reached.
        self.isolated: set[str] = set()

    def transport_for(self, sender: str) -> Any:
        """A transport that fails while ``sender`` is isolated."""

        async def send(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
            if sender in self.isolated or url.removesuffix(GOSSIP_PATH) in self.isolated:
                raise ConnectionError("partitioned")
            return await self(url, body, headers)

        return send

    async def __call__(
        self, url: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, bytes, dict[str, str]]:
        base = url.removesuffix(GOSSIP_PATH)
        if base in self.down or base not in self.agents:
            raise ConnectionError(f"{base} is unreachable")
        status, answer, answer_headers = await self.agents[base].handle(
            body, headers.get("Authorization"), max_bytes=headers.get(limits.HEADER)
        )
        return status, answer, {k.lower(): v for k, v in answer_headers.items()}


async def merged_view(tracker: AvailabilityTracker, cids: list[str]) -> dict[str, Any]:
    """What a node answers, rounded where float sums may differ in the last bit by summation order."""
    peers = await tracker.list_peers(limit=10_000)
    availability = {}
    for cid in cids:
        content = await tracker.get_content_availability(cid)
        availability[cid] = (
            None
            if content is None
            else [(p.peer_id, round(p.reputation, 9), p.download_speed) for p in content.peers]
        )
    return {
        "peers": [
            (
                p.peer_id,
                p.online,
                p.chunks_served,
                p.chunks_failed,
                round(p.reputation_score or 0.0, 9),
                p.download_speed,
                p.last_seen,
                p.first_seen,
            )
            for p in peers
        ],
        "availability": availability,
    }


class Pair:
    """Trackers x (SQLite) and y (each engine) on one clock, gossiping through a ``LocalNet``."""

    def __init__(self, x: AvailabilityTracker, y: AvailabilityTracker, clock: ManualClock) -> None:
        self.x, self.y, self.clock = x, y, clock
        self.net = LocalNet()
        self.net.agents = {
            name: GossipAgent(
                t, GossipConfig(keys=(KEY,)), transport=self.net.transport_for(name), rng=random.Random(i)
            )
            for i, (name, t) in enumerate((("http://x", x), ("http://y", y)))
        }

    async def gossip(self) -> None:
        for _ in range(3):
            await self.net.agents["http://x"].exchange("http://y")
            await self.net.agents["http://y"].exchange("http://x")


async def open_pair(db_url: str, tmp_path: Path, start: float = 1_800_000_000.0) -> AsyncIterator[Pair]:
    """A ``Pair`` for a fixture to yield, closed after the test."""
    clock = ManualClock(start)
    x = await AvailabilityTracker.open(
        TrackerConfig(database_url=f"sqlite+aiosqlite:///{tmp_path / 'x.db'}", clock=clock)
    )
    y = await AvailabilityTracker.open(TrackerConfig(database_url=db_url, clock=clock))
    try:
        yield Pair(x, y, clock)
    finally:
        await x.close()
        await y.close()

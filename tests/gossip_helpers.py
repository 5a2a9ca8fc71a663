"""Shared by the gossip tests: an in-process network of agents and a node's merged view."""

from __future__ import annotations

from typing import Any

from tracker import AvailabilityTracker
from tracker.gossip import limits
from tracker.gossip.agent import GOSSIP_PATH, GossipAgent

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

"""Mappings of departed peers are removed as gossiped removals, so every tracker ends the same.

Deleted by each tracker's sweeper at its own moment, they diverged for good when the peer was heard
from again between two trackers' sweeps (QA round 24: 35 of 3,142 contents listed different holders
on two trackers of a quiet mesh, for as long as it ran).
"""

from __future__ import annotations

import random
from pathlib import Path

from gossip_helpers import KEY, LocalNet

from tracker import AvailabilityTracker, TrackerConfig
from tracker.gossip.agent import GossipAgent
from tracker.gossip.config import GossipConfig
from tracker.testing import ManualClock


async def test_a_peer_back_between_two_trackers_sweeps_has_the_same_mappings_on_both(
    db_url: str, tmp_path: Path
) -> None:
    clock = ManualClock(1_800_000_000.0)
    x = await AvailabilityTracker.open(
        TrackerConfig(database_url=f"sqlite+aiosqlite:///{tmp_path / 'x.db'}", clock=clock)
    )
    y = await AvailabilityTracker.open(TrackerConfig(database_url=db_url, clock=clock))
    net = LocalNet()
    agents = {
        name: GossipAgent(
            t, GossipConfig(keys=(KEY,)), transport=net.transport_for(name), rng=random.Random(i)
        )
        for i, (name, t) in enumerate((("http://x", x), ("http://y", y)))
    }
    net.agents = agents

    async def gossip() -> None:
        for _ in range(3):
            await agents["http://x"].exchange("http://y")
            await agents["http://y"].exchange("http://x")

    try:
        await x.record_peer_online("p")
        await x.record_content_available("movie", "p")
        await x.record_content_available("song", "p")
        await gossip()
        assert await y.get_available_peers("movie") == ["p"]
        clock.advance(x.config.offline_mapping_retention_s + 10)
        await y.record_peer_online("p")  # back, heard by y only; it announces nothing again
        swept_x = await x.sweep()  # before it heard: for x, p has departed
        swept_y = await y.sweep()
        assert (swept_x.departed_mappings_removed, swept_y.departed_mappings_removed) == (2, 0)
        await gossip()
        for tracker in (x, y):
            assert await tracker.get_available_peers("movie") == []
            assert await tracker.get_available_peers("song") == []
            metrics = await tracker.get_peer_metrics("p")
            assert metrics is not None and metrics.online
        # Announced again, the mapping is back everywhere: the removal is older.
        clock.advance(1)
        await y.record_content_available("movie", "p")
        await gossip()
        for tracker in (x, y):
            assert await tracker.get_available_peers("movie") == ["p"]
    finally:
        await x.close()
        await y.close()

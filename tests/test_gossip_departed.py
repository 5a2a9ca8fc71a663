"""Mappings of departed peers are removed as gossiped removals, so every tracker ends the same.

Deleted by each tracker's sweeper at its own moment, they diverged for good when the peer was heard
from again between two trackers' sweeps (QA round 24: 35 of 3,142 contents listed different holders
on two trackers of a quiet mesh, for as long as it ran).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from gossip_helpers import Pair, open_pair
from sqlalchemy import text


@pytest.fixture
async def pair(db_url: str, tmp_path: Path) -> AsyncIterator[Pair]:
    async for opened in open_pair(db_url, tmp_path):
        yield opened


async def test_a_peer_back_between_two_trackers_sweeps_has_the_same_mappings_on_both(pair: Pair) -> None:
    x, y, clock = pair.x, pair.y, pair.clock
    await x.record_peer_online("p")
    await x.record_content_available("movie", "p")
    await x.record_content_available("song", "p")
    await pair.gossip()
    assert await y.get_available_peers("movie") == ["p"]
    clock.advance(x.config.offline_mapping_retention_s + 10)
    await y.record_peer_online("p")  # back, heard by y only; it announces nothing again
    swept_x = await x.sweep()  # before it heard: for x, p has departed, and the mappings are x's
    swept_y = await y.sweep()
    assert (swept_x.departed_mappings_removed, swept_y.departed_mappings_removed) == (2, 0)
    await pair.gossip()
    for tracker in (x, y):
        assert await tracker.get_available_peers("movie") == []
        assert await tracker.get_available_peers("song") == []
        metrics = await tracker.get_peer_metrics("p")
        assert metrics is not None and metrics.online
    # Announced again, the mapping is back everywhere: the removal is older.
    clock.advance(1)
    await y.record_content_available("movie", "p")
    await pair.gossip()
    for tracker in (x, y):
        assert await tracker.get_available_peers("movie") == ["p"]


async def test_a_tracker_cut_off_longer_than_the_retention_removes_none_of_the_others_mappings(
    pair: Pair,
) -> None:
    """Only the tracker a mapping came from removes it: x, cut off for more than the retention, saw
    no sighting of y's peer, and would have removed y's mapping everywhere once back."""
    x, y, clock = pair.x, pair.y, pair.clock
    await y.record_peer_online("p")
    await y.record_content_available("movie", "p")
    await pair.gossip()
    pair.net.isolated.add("http://x")
    for _ in range(int(x.config.offline_mapping_retention_s // 200) + 2):  # p keeps talking to y
        clock.advance(200)
        await y.record_peer_online("p")
    assert (await x.sweep()).departed_mappings_removed == 0  # for x, p has departed: not x's mapping
    pair.net.isolated.clear()
    clock.advance(300)  # beyond the back-off of the exchanges that failed
    await y.record_peer_online("p")
    await pair.gossip()
    for tracker in (x, y):
        assert await tracker.get_available_peers("movie") == ["p"]


async def test_a_mapping_its_tracker_never_removed_goes_after_the_removals_would_have(pair: Pair) -> None:
    """The tracker a mapping came from may be gone for good: past the removal's retention and its
    tombstone's, the mapping is deleted wherever it is, or it would stay forever."""
    x, y, clock = pair.x, pair.y, pair.clock
    await y.record_peer_online("p")
    await y.record_content_available("movie", "p")
    await pair.gossip()
    pair.net.isolated.add("http://y")  # y is never heard from again
    clock.advance(x.config.offline_mapping_retention_s + 10)
    report = await x.sweep()
    assert (report.departed_mappings_removed, report.pruned["content_peers"]) == (0, 0)
    clock.advance(x.config.tombstone_keep_s)
    report = await x.sweep()
    assert (report.departed_mappings_removed, report.pruned["content_peers"]) == (0, 1)


async def test_a_removal_is_dated_at_the_departure_not_at_the_sweep(pair: Pair) -> None:
    """Dated by the sweeping tracker's clock, a removal made late (a sweeper held back, a tracker
    cut off, or a clock running ahead) beat the announcement the peer made when it came back
    elsewhere meanwhile (QA round 26). Dated when the peer departed, it loses to any announcement
    made after the peer's return."""
    x, y, clock = pair.x, pair.y, pair.clock
    await x.record_peer_online("p")
    await x.record_content_available("movie", "p")
    await pair.gossip()
    departed_at = clock.now + x.config.offline_mapping_retention_s
    pair.net.isolated.add("http://x")
    clock.advance(x.config.offline_mapping_retention_s + 10)
    await y.record_peer_online("p")  # back, on y: it announces again there
    await y.record_content_available("movie", "p")
    clock.advance(500)  # x sweeps late, before it has heard
    assert (await x.sweep()).departed_mappings_removed == 1
    async with x.engine.connect() as conn:
        changed_at = (
            await conn.execute(text("SELECT changed_at FROM content_peers WHERE NOT available"))
        ).scalar_one()
    assert changed_at == departed_at
    pair.net.isolated.clear()
    clock.advance(300)
    await y.record_peer_online("p")
    await pair.gossip()
    for tracker in (x, y):
        assert await tracker.get_available_peers("movie") == ["p"]

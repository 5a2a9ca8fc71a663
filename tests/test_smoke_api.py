"""The README example, end to end, on both engines."""

from tracker import AvailabilityTracker


async def test_readme_example_runs_on_each_engine(tracker: AvailabilityTracker) -> None:
    await tracker.record_peer_online("peer-a")
    await tracker.record_content_available("cid-1", "peer-a")
    await tracker.record_download_speed("peer-a", 2_000_000)
    await tracker.record_upload_success("peer-a")
    await tracker.record_upload_failure("peer-a")
    metrics = await tracker.get_peer_metrics("peer-a")
    assert metrics is not None
    assert (metrics.chunks_served, metrics.chunks_failed, metrics.download_speed) == (1, 1, 2_000_000)
    assert await tracker.get_available_peers("cid-1") == ["peer-a"]
    assert [p.peer_id for p in await tracker.select_best_peers("cid-1", 3)] == ["peer-a"]

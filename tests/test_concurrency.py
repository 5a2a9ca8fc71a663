"""Concurrent writers lose no increment: many coroutines in one process, and several OS processes."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from tracker import AvailabilityTracker

WORKER = Path(__file__).with_name("concurrency_worker.py")


async def test_50_coroutines_x_200_successes_count_exactly_10000(tracker: AvailabilityTracker) -> None:
    async def hammer() -> None:
        for _ in range(200):
            await tracker.record_upload_success("hot")

    await asyncio.gather(*(hammer() for _ in range(50)))
    metrics = await tracker.get_peer_metrics("hot")
    assert metrics is not None
    assert metrics.chunks_served == 10_000


async def test_four_processes_sharing_one_database_lose_no_increment(tracker: AvailabilityTracker) -> None:
    processes, single_calls, coroutines, batches = 4, 400, 8, 25
    url = tracker.config.database_url
    children = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            str(WORKER),
            url,
            str(single_calls),
            str(coroutines),
            str(batches),
            str(seed),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for seed in range(processes)
    ]
    results = await asyncio.gather(*(child.communicate() for child in children))
    for child, (out, err) in zip(children, results, strict=True):
        assert child.returncode == 0, err.decode()[-3000:]
        assert out.decode().strip() == "done"

    hot = await tracker.get_peer_metrics("hot")
    assert hot is not None and hot.chunks_served == processes * single_calls
    for peer in ("shared-0", "shared-4"):
        metrics = await tracker.get_peer_metrics(peer)
        assert metrics is not None and metrics.chunks_served == processes * batches * 3

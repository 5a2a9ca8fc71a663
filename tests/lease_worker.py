"""A separate OS process selecting peers from one shared database; run by tests/test_load_balancing.py.

Usage: python lease_worker.py DATABASE_URL SELECTIONS MAX_LOAD SEED
Prints "done" once every selection returned.
"""

from __future__ import annotations

import asyncio
import sys

from tracker import AvailabilityTracker, TrackerConfig


async def main(url: str, selections: int, max_load: int, seed: int) -> None:
    config = TrackerConfig(database_url=url, max_load_per_peer=max_load, lease_ttl_s=3600.0, random_seed=seed)
    async with AvailabilityTracker(config) as tracker:
        for i in range(selections):
            strategy = "weighted" if i % 2 else "best"
            await tracker.select_best_peers("movie", 2, strategy=strategy)
    print("done", flush=True)


if __name__ == "__main__":
    url, selections, max_load, seed = sys.argv[1], *map(int, sys.argv[2:5])
    asyncio.run(main(url, selections, max_load, seed))

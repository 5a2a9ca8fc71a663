"""A separate OS process hammering one database; run by tests/test_concurrency.py.

Usage: python concurrency_worker.py DATABASE_URL SINGLE_CALLS COROUTINES BATCHES SEED
Prints "done" when every write was acknowledged.
"""

from __future__ import annotations

import asyncio
import random
import sys

from tracker import AvailabilityTracker, TrackerConfig
from tracker.events import UploadOutcome

BATCH_PEERS = [f"shared-{i}" for i in range(5)]


async def main(url: str, single_calls: int, coroutines: int, batches: int, seed: int) -> None:
    rng = random.Random(seed)
    async with AvailabilityTracker(TrackerConfig(database_url=url)) as tracker:

        async def hammer(count: int) -> None:
            for _ in range(count):
                await tracker.record_upload_success("hot")

        await asyncio.gather(*(hammer(single_calls // coroutines) for _ in range(coroutines)))
        for _ in range(batches):
            # Every batch touches the same peers in a random order: the write path must sort them,
            # or two processes would deadlock on Postgres.
            order = BATCH_PEERS[:]
            rng.shuffle(order)
            await tracker.record_batch([UploadOutcome(p, True) for p in order for _ in range(3)])
    print("done", flush=True)


if __name__ == "__main__":
    url, single, coros, batches, seed = sys.argv[1], *map(int, sys.argv[2:6])
    asyncio.run(main(url, single, coros, batches, seed))

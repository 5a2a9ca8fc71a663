"""One of several OS processes writing one database for a bounded time; run by test_processes.py.

Usage: python process_worker.py DATABASE_URL SECONDS SEED. Prints one JSON line: per peer, the upload
successes that were acknowledged, and the names of any errors a caller saw.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from collections import Counter

from tracker import AvailabilityTracker, TrackerConfig
from tracker.events import ContentAvailable, SpeedSample, UploadOutcome

PEERS = [f"shared-{i}" for i in range(6)]


async def main(url: str, seconds: float, seed: int) -> None:
    acked: Counter[str] = Counter()
    errors: list[str] = []
    deadline = time.monotonic() + seconds
    async with AvailabilityTracker(TrackerConfig(database_url=url)) as tracker:

        async def lane(rng: random.Random) -> None:
            while time.monotonic() < deadline:
                roll = rng.random()
                try:
                    if roll < 0.5:
                        peer = rng.choice(PEERS)
                        await tracker.record_upload_success(peer)
                        acked[peer] += 1
                    elif roll < 0.8:
                        chosen = [rng.choice(PEERS) for _ in range(rng.randint(2, 12))]
                        events = [UploadOutcome(p, True) for p in chosen]
                        events += [SpeedSample(rng.choice(PEERS), rng.randint(1, 10**7))]
                        events += [ContentAvailable(f"cid-{rng.randint(0, 9)}", rng.choice(PEERS))]
                        rng.shuffle(events)
                        await tracker.record_batch(events)
                        acked.update(chosen)
                    else:
                        await tracker.select_best_peers(f"cid-{rng.randint(0, 9)}", 2)
                except Exception as error:  # counted: the test expects none
                    errors.append(f"{type(error).__name__}: {error}"[:200])

        await asyncio.gather(*(lane(random.Random(seed * 100 + i)) for i in range(4)))
    print(json.dumps({"acked": acked, "errors": errors}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3])))

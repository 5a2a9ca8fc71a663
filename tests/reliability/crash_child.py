"""Ingests upload outcomes until killed; run by test_crash_safety.py.

Usage: python crash_child.py DATABASE_URL FIRST_SEQ. Each outcome carries its sequence number in
``bytes``. The child prints "sent N" before a call and "ack N" once the call returned (the event is
committed), flushing each line, so the parent knows exactly what was acknowledged when it kills.
Several coroutines write at once, so the kills land inside group-committed transactions too.
"""

from __future__ import annotations

import asyncio
import itertools
import sys

from tracker import AvailabilityTracker, TrackerConfig
from tracker.events import SpeedSample, UploadOutcome


async def main(url: str, first: int) -> None:
    sequence = itertools.count(first)
    async with AvailabilityTracker(TrackerConfig(database_url=url)) as tracker:
        print("ready", flush=True)

        async def writer(lane: int) -> None:
            while True:
                seq = next(sequence)
                sys.stdout.write(f"sent {seq}\n")
                sys.stdout.flush()
                if seq % 5 == 0:  # some batches too: all or nothing
                    await tracker.record_batch(
                        [UploadOutcome("crash-peer", True, bytes=seq), SpeedSample("crash-peer", seq)]
                    )
                else:
                    await tracker.record_upload_success("crash-peer", bytes=seq)
                sys.stdout.write(f"ack {seq}\n")
                sys.stdout.flush()

        await asyncio.gather(*(writer(lane) for lane in range(8)))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))

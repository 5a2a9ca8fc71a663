"""Soak: mixed load for a long time; throughput, memory and database size over time must level off.

Run: ``python -m benchmarks.soak [--minutes 10] [--engine sqlite|postgresql] [--json PATH]``.
Postgres comes from TRACKER_BENCH_POSTGRES_URL (default: the test server), in a scratch database.

A bounded swarm (5,000 peers, 2,000 contents, each peer holding 10 of them) takes heartbeats, speed
samples, upload outcomes, content announcements and removals, and best-peer selections from 16
coroutines, single calls and batches mixed, on the real clock, with the sweeper running every 5 s and
retention shortened to two minutes so that it kicks in within the run. Every 15 s a line reports
events/s, selections/s, the process's RSS and the database size (file plus WAL, or
``pg_database_size``). At the end it compares the growth of the last third of the run with the first:
once retention runs, size must level off.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

from benchmarks.scratch import create_database, driver_dsn, drop_database
from tracker import AvailabilityTracker, TrackerConfig
from tracker.events import ContentAvailable, ContentUnavailable, PeerOnline, SpeedSample, UploadOutcome

PEERS = [f"peer-{i:05d}" for i in range(5_000)]
CIDS = [f"cid-{i:05d}" for i in range(2_000)]
HELD = 10  # each peer holds (and announces or drops) only its own 10 contents: 50,000 pairs at most


def _content_of(rng: random.Random, peer_index: int) -> str:
    """One of the peer's own contents, so that the mapping table is bounded like a real swarm's."""
    return CIDS[(peer_index * 7 + rng.randrange(HELD) * 131) % len(CIDS)]


REPORT_EVERY_S = 15.0


def _rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def _size_mb(url: str) -> float:
    if url.startswith("sqlite"):
        path = Path(str(make_url(url).database))
        return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists()) / 2**20
    conn = await asyncpg.connect(driver_dsn(url))
    try:
        return float(await conn.fetchval("SELECT pg_database_size(current_database())")) / 2**20
    finally:
        await conn.close()


async def soak(url: str, seconds: float) -> list[dict[str, Any]]:
    config = TrackerConfig(
        database_url=url,
        run_sweeper=True,
        update_interval=5.0,
        sample_retention_s=120.0,
        outcome_retention_s=120.0,
        offline_mapping_retention_s=120.0,
        tombstone_ttl_s=120.0,
        lease_ttl_s=30.0,
        max_load_per_peer=1_000,
    )
    counts = {"events": 0, "selections": 0, "errors": 0}
    samples: list[dict[str, Any]] = []
    deadline = time.monotonic() + seconds
    async with AvailabilityTracker(config) as tracker:

        async def lane(rng: random.Random) -> None:
            while time.monotonic() < deadline:
                roll = rng.random()
                peer, cid = rng.choice(PEERS), rng.choice(CIDS)
                try:
                    if roll < 0.15:
                        await tracker.select_best_peers(cid, 3)
                        counts["selections"] += 1
                        continue
                    if roll < 0.45:
                        await tracker.record_peer_online(peer)
                        counts["events"] += 1
                        continue
                    batch: list[Any] = []
                    for _ in range(rng.randint(10, 200)):
                        index, r = rng.randrange(len(PEERS)), rng.random()
                        p, c = PEERS[index], _content_of(rng, index)
                        if r < 0.3:
                            batch.append(PeerOnline(p))
                        elif r < 0.55:
                            batch.append(SpeedSample(p, rng.randint(10**5, 10**8)))
                        elif r < 0.8:
                            batch.append(UploadOutcome(p, rng.random() < 0.9, cid=c))
                        elif r < 0.95:
                            batch.append(ContentAvailable(c, p))
                        else:
                            batch.append(ContentUnavailable(c, p))
                    await tracker.record_batch(batch)
                    counts["events"] += len(batch)
                except Exception:
                    counts["errors"] += 1

        async def reporter() -> None:
            started = last = time.monotonic()
            seen = dict(counts)
            samples.append(
                {
                    "t_s": 0.0,
                    "events_per_s": 0.0,
                    "selections_per_s": 0.0,
                    "errors": 0,
                    "rss_mb": _rss_mb(),
                    "db_mb": await _size_mb(url),
                    "sweeps": 0,
                }
            )
            while time.monotonic() < deadline:
                await asyncio.sleep(min(REPORT_EVERY_S, max(0.0, deadline - time.monotonic())))
                now = time.monotonic()
                span = max(1e-9, now - last)
                sample = {
                    "t_s": round(now - started, 1),
                    "events_per_s": (counts["events"] - seen["events"]) / span,
                    "selections_per_s": (counts["selections"] - seen["selections"]) / span,
                    "errors": counts["errors"],
                    "rss_mb": _rss_mb(),
                    "db_mb": await _size_mb(url),
                    "sweeps": tracker.sweeper_state.passes,
                }
                samples.append(sample)
                print(
                    f"t={sample['t_s']:7.1f} s  {sample['events_per_s']:9,.0f} events/s  "
                    f"{sample['selections_per_s']:6,.0f} selections/s  RSS {sample['rss_mb']:7.1f} MB  "
                    f"db {sample['db_mb']:7.1f} MB  sweeps {sample['sweeps']}  errors {sample['errors']}",
                    flush=True,
                )
                seen, last = dict(counts), now

        await asyncio.gather(reporter(), *(lane(random.Random(i)) for i in range(16)))
    return samples


def _verdict(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Growth over the first and the last third of the run (samples[0] is the start, before load)."""
    third = max(1, (len(samples) - 1) // 3)
    first, last = samples[: third + 1], samples[-third - 1 :]

    def growth(rows: list[dict[str, Any]], key: str) -> float:
        return rows[-1][key] - rows[0][key] if len(rows) > 1 else 0.0

    return {
        "db_growth_first_third_mb": growth(first, "db_mb"),
        "db_growth_last_third_mb": growth(last, "db_mb"),
        "rss_growth_first_third_mb": growth(first, "rss_mb"),
        "rss_growth_last_third_mb": growth(last, "rss_mb"),
        "events_per_s_first_third": sum(s["events_per_s"] for s in first[1:]) / max(1, len(first) - 1),
        "events_per_s_last_third": sum(s["events_per_s"] for s in last[1:]) / max(1, len(last) - 1),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        if args.engine == "sqlite":
            url = f"sqlite+aiosqlite:///{Path(tmp) / 'soak.db'}"
        else:
            url = await create_database("bench_soak")
        try:
            samples = await soak(url, args.minutes * 60)
        finally:
            await drop_database(url)
    verdict = _verdict(samples)
    print(json.dumps(verdict, indent=2))
    if len(samples) >= 6 and verdict["db_growth_last_third_mb"] > max(
        1.0, verdict["db_growth_first_third_mb"]
    ):
        print("database size did NOT level off: the last third grew more than the first")
    else:
        print("database size levelled off (the last third grew no more than the first)")
    return {"engine": args.engine, "minutes": args.minutes, "samples": samples, "verdict": verdict}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--engine", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--json", type=Path, help="also write the samples and verdict here")
    args = parser.parse_args()
    results = asyncio.run(main_async(args))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

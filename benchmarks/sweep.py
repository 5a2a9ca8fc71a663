"""Sweep benchmark: expire the 10% stale of 100,000 peers; prune 1,000,000 of 2,000,000 samples; forget them.

Run: ``python -m benchmarks.sweep [--engine sqlite|postgresql|all] [--peers N] [--samples-per-peer K]``.
Postgres comes from TRACKER_BENCH_POSTGRES_URL (default: the test server), in a scratch database.

Baseline, measured in the same run on the same machine: the storage engine's own cost of touching the
same rows with one raw statement through the bare driver (sqlite3 / asyncpg) and no batching. The ratio
says what batching, the advisory lock and the async stack cost on top of the engine.

Then forgetting (``sweeper._forget``, hourly): its walk over a swarm where nothing is due (what most
hours cost), and a pass ``peer_retention_s`` later that forgets every peer, its row, its remaining
samples and its key, beside the same deletes as raw statements.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
from sqlalchemy import insert, select
from sqlalchemy.engine import make_url

from benchmarks.scratch import PG_URL
from benchmarks.scratch import admin as _admin
from tracker import AvailabilityTracker, TrackerConfig
from tracker.events import PeerOnline
from tracker.schema import bandwidth_samples, peers
from tracker.sweeper import _forget
from tracker.testing import ManualClock

DAY = 86_400.0


async def _populate(tracker: AvailabilityTracker, clock: ManualClock, n_peers: int, per_peer: int) -> None:
    """n_peers online peers (10% of them stale by the end), per_peer old samples each."""
    t0 = clock.now
    stale = n_peers // 10
    batch = 20_000
    for start in range(0, n_peers, batch):
        await tracker.record_batch(
            [
                PeerOnline(f"peer-{i:07d}", at=t0 - (3600 if i < stale else 0))
                for i in range(start, min(n_peers, start + batch))
            ]
        )
    async with tracker.engine.connect() as conn:
        ids = list((await conn.scalars(select(peers.c.id).order_by(peers.c.id))).all())
    node = tracker.node_id
    rows_per_txn = 50_000
    pending: list[dict[str, object]] = []
    for pid in ids:
        for k in range(per_peer):
            pending.append(
                {"peer_id": pid, "node_id": node, "at": t0 - 3 * DAY + k, "bytes_per_sec": 1000 + k}
            )
        if len(pending) >= rows_per_txn:
            async with tracker.engine.begin() as conn:
                await conn.execute(insert(bandwidth_samples), pending)
            pending = []
    if pending:
        async with tracker.engine.begin() as conn:
            await conn.execute(insert(bandwidth_samples), pending)


async def _baseline(url: str, cutoff: float, window: int) -> tuple[float, int]:
    """The same expiry and sample prune as one raw statement each, through the bare driver."""
    expire = "UPDATE peer_stats SET online = false, online_since = NULL WHERE online AND last_seen < {p}"
    prune = (
        "DELETE FROM bandwidth_samples WHERE id IN (SELECT id FROM (SELECT id, at, ROW_NUMBER() OVER "
        "(PARTITION BY peer_id, node_id ORDER BY at DESC, id DESC) AS rn FROM bandwidth_samples) AS r "
        "WHERE rn > {w} AND at < {c})"
    )
    if url.startswith("sqlite"):
        path = make_url(url).database
        started = time.perf_counter()
        with sqlite3.connect(str(path)) as raw:
            raw.execute(expire.format(p=cutoff))
            deleted = raw.execute(prune.format(w=window, c=cutoff)).rowcount
        return time.perf_counter() - started, deleted
    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    conn = await asyncpg.connect(dsn)
    try:
        started = time.perf_counter()
        async with conn.transaction():
            await conn.execute(expire.format(p=cutoff))
            status = await conn.execute(prune.format(w=window, c=cutoff))
        return time.perf_counter() - started, int(status.split()[-1])
    finally:
        await conn.close()


_FORGET = (
    "DELETE FROM bandwidth_samples WHERE (peer_id, node_id) IN "
    "(SELECT peer_id, node_id FROM peer_stats WHERE updated_at < {c})",
    "DELETE FROM peer_stats WHERE updated_at < {c}",
    "DELETE FROM peers WHERE NOT EXISTS (SELECT 1 FROM peer_stats s WHERE s.peer_id = peers.id) "
    "AND NOT EXISTS (SELECT 1 FROM content_peers m WHERE m.peer_id = peers.id) "
    "AND NOT EXISTS (SELECT 1 FROM upload_outcomes o WHERE o.peer_id = peers.id) "
    "AND NOT EXISTS (SELECT 1 FROM peer_leases l WHERE l.peer_id = peers.id)",
)


async def _forgetting(config: TrackerConfig, clock: ManualClock, baseline_url: str) -> None:
    """The hourly walk with nothing due, then the pass that forgets the whole swarm, beside raw deletes."""
    engine = "sqlite" if config.database_url.startswith("sqlite") else "postgresql"
    async with AvailabilityTracker(config) as tracker:
        started = time.perf_counter()
        await _forget(tracker, clock.now)
        quiet = time.perf_counter() - started
        print(f"[{engine}] forgetting, nothing due: {quiet:.2f} s (the walk, at most hourly)")
        clock.advance(config.forget_after_s + 3600)
        started = time.perf_counter()
        gone = await _forget(tracker, clock.now)
        spent = time.perf_counter() - started
    cutoff = clock.now - config.forget_after_s
    statements = [sql.format(c=cutoff) for sql in _FORGET]
    if baseline_url.startswith("sqlite"):
        started = time.perf_counter()
        with sqlite3.connect(str(make_url(baseline_url).database)) as raw:
            for sql in statements:
                raw.execute(sql)
        base = time.perf_counter() - started
    else:
        dsn = make_url(baseline_url).set(drivername="postgresql").render_as_string(hide_password=False)
        conn = await asyncpg.connect(dsn)
        try:
            started = time.perf_counter()
            async with conn.transaction():
                for sql in statements:
                    await conn.execute(sql)
            base = time.perf_counter() - started
        finally:
            await conn.close()
    rows, keys = gone.get("peer_stats", 0), gone.get("peers", 0)
    print(
        f"[{engine}] forgetting the swarm: {rows:,} rows, {keys:,} peers in {spent:.2f} s; "
        f"raw statements {base:.2f} s; ratio {spent / base:.2f}x"
    )


async def _copy(url: str) -> str:
    """A second database with the same rows, for the baseline (SQLite: file copy; Postgres: TEMPLATE)."""
    if url.startswith("sqlite"):
        src = Path(str(make_url(url).database))
        dst = src.with_name("baseline.db")
        with sqlite3.connect(str(src)) as s, sqlite3.connect(str(dst)) as d:
            s.backup(d)
        return f"sqlite+aiosqlite:///{dst}"
    name = f"bench_base_{uuid.uuid4().hex[:8]}"
    await _admin(f'CREATE DATABASE "{name}" TEMPLATE "{make_url(url).database}"')
    return make_url(url).set(database=name).render_as_string(hide_password=False)


async def run(engine: str, n_peers: int, per_peer: int, scratch: Path) -> None:
    clock = ManualClock(1_800_000_000.0)
    if engine == "sqlite":
        url = f"sqlite+aiosqlite:///{scratch / 'sweep.db'}"
    else:
        name = f"bench_sweep_{uuid.uuid4().hex[:8]}"
        await _admin(f'CREATE DATABASE "{name}"')
        url = make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    config = TrackerConfig(database_url=url, clock=clock, sample_retention_s=DAY)
    try:
        async with AvailabilityTracker(config) as tracker:
            started = time.perf_counter()
            await _populate(tracker, clock, n_peers, per_peer)
            print(
                f"[{engine}] populated {n_peers:,} peers, {n_peers * per_peer:,} samples "
                f"in {time.perf_counter() - started:.1f} s"
            )
            clock.advance(60)  # the 10% last seen an hour ago are stale; the rest are fresh
        # Released and copied before measuring, so both sides start from the same cold-ish state.
        baseline_url = await _copy(url)
        async with AvailabilityTracker(config) as tracker:
            report = await tracker.sweep()
        samples = report.pruned["bandwidth_samples"]
        base_s, base_deleted = await _baseline(baseline_url, clock.now - DAY, config.bandwidth_window)
        print(
            f"[{engine}] sweep: {report.peers_marked_offline:,} peers offline, {samples:,} samples pruned "
            f"in {report.duration_s:.2f} s ({samples / report.duration_s:,.0f} rows/s)"
        )
        print(
            f"[{engine}] baseline (one raw statement each, bare driver): {base_deleted:,} samples "
            f"in {base_s:.2f} s ({base_deleted / base_s:,.0f} rows/s)"
        )
        print(f"[{engine}] ratio sweep/baseline time: {report.duration_s / base_s:.2f}x")
        assert base_deleted == samples, "baseline and sweep must prune the same rows"
        await _forgetting(config, clock, baseline_url)
    finally:
        if engine == "postgresql":
            await _admin(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)')
            if "baseline_url" in locals():
                await _admin(f'DROP DATABASE IF EXISTS "{make_url(baseline_url).database}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=["sqlite", "postgresql", "all"], default="all")
    parser.add_argument("--peers", type=int, default=100_000)
    parser.add_argument("--samples-per-peer", type=int, default=10 + 10)
    args = parser.parse_args()
    engines = ["sqlite", "postgresql"] if args.engine == "all" else [args.engine]
    with tempfile.TemporaryDirectory() as scratch:
        for engine in engines:
            asyncio.run(run(engine, args.peers, args.samples_per_peer, Path(scratch)))


if __name__ == "__main__":
    main()

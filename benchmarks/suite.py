"""The benchmark suite: ingest and selection on each engine, beside their baselines in the same run.

``python -m benchmarks run [--quick] [--engine sqlite|postgresql|all] [--scale 100k|1m] [--out DIR]``
writes ``results.json``, ``results.md`` and PNG plots to ``--out`` (default ``benchmarks/results``).

Workloads, per engine, on the swarm of ``benchmarks/swarm.py``:

1. ingest: every event that builds the swarm through ``record_batch`` in batches of 1,000; then a
   sample of the same mix (every n-th event) as single calls from 100 concurrent coroutines (group
   commit), and the same sample in batches, for a like-for-like ratio;
2. selection: ``select_best_peers(cid, 5)`` for contents drawn by popularity, from 1 and from 32
   callers, from 1 to 32 in a sweep (throughput against concurrency), and from 32 beside an ingest
   of heartbeats (each rate against its own alone), each phase starting with no open leases; and the
   ranking statement alone (read only), the part comparable to a raw query;
3. a sweep over the whole swarm;
4. gossip: the whole (swept) swarm as one delta to an empty tracker of the same engine, and a round
   of heartbeats of every online peer after it.

Baselines, measured in the same run: the write path's own statements replayed through the bare
driver into a twin database (``_Replay``: our layers' cost); the same number of rows written by the
bare driver (``sqlite3.executemany`` / asyncpg ``copy_records_to_table``) into a plain table (the
engine's floor); the ranking statement's
very SQL run through the bare driver; an in-memory implementation with dicts and ``heapq`` (what the
original HashMap design gives); Redis sorted sets through redis-py's asyncio client on 127.0.0.1:6379;
for gossip, the delta's rows inserted into plain tables by the bare driver, message by message.
Figures are ratios within one run: these machines are noisy. Nothing here asserts speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
import os
import platform
import random
import sqlite3
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import event as sqlalchemy_event
from sqlalchemy.engine import make_url

from tracker import AvailabilityTracker, TrackerConfig
from tracker.db import run_read_unit
from tracker.events import PeerOnline
from tracker.gossip.config import GossipConfig
from tracker.gossip.protocol import Keyring
from tracker.queries import reads
from tracker.reputation import DEFAULT_PARAMS, reputation
from tracker.testing import ManualClock

from .gossip import KEY, Link, RawRows, heartbeat_round, transfer
from .report import markdown, plot, write_plans
from .scratch import BareTables, create_database, driver_dsn, drop_database, execute
from .swarm import Swarm, event_count, events, generate

REDIS_URL = os.environ.get("TRACKER_BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")
T0 = 1_800_000_000.0


#: Concurrent callers of the throughput-against-concurrency sweep (32 is also the headline figure).
LEVELS = (1, 2, 4, 8, 16, 32)


def _percentiles(latencies: list[float]) -> dict[str, Any]:
    ordered = sorted(latencies)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {
        "p50_ms": pick(0.5),
        "p99_ms": pick(0.99),
        "mean_ms": statistics.fmean(ordered) * 1000,
        # Percentiles 0..100, for the latency CDF plot.
        "cdf_ms": [pick(q / 100) for q in range(101)],
    }


async def _timed_calls(
    call: Callable[[random.Random], Awaitable[Any]], callers: int, per_caller: int, seed: int
) -> dict[str, Any]:
    latencies: list[float] = []

    async def caller(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        for _ in range(per_caller):
            started = time.perf_counter()
            await call(rng)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(callers)))
    wall = time.perf_counter() - started
    return {
        "callers": callers,
        "calls": len(latencies),
        "qps": len(latencies) / wall,
        **_percentiles(latencies),
    }


async def _concurrency_sweep(
    call: Callable[[random.Random], Awaitable[Any]],
    calls: int,
    seed: int,
    before: Callable[[], Awaitable[None]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Throughput and latency at each of ``LEVELS`` callers, ``calls`` calls per level (at least one
    per caller): where an engine stops gaining from concurrency and only queues. ``before`` runs
    ahead of each level (the tracker's levels each start with no open leases)."""
    sweep = {}
    for callers in LEVELS:
        if before is not None:
            await before()
        sweep[str(callers)] = await _timed_calls(call, callers, max(1, calls // callers), seed + callers)
    return sweep


async def _paired_calls(
    first: Callable[[str], Awaitable[Any]],
    second: Callable[[str], Awaitable[Any]],
    draw: Callable[[random.Random], str],
    calls: int,
    seed: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two implementations on the same contents, interleaved call by call (each goes first every other
    time), so that whatever the shared machine does meanwhile slows both alike.

    Measured one after the other, the in-memory baseline's p50 moved from 0.9 to 1.9 ms between runs
    and phases on these machines, which alone decided whether a ratio target was met.
    """
    rng = random.Random(seed)
    latencies: tuple[list[float], list[float]] = ([], [])
    for i in range(calls):
        cid = draw(rng)
        for k in (0, 1) if i % 2 == 0 else (1, 0):
            started = time.perf_counter()
            await (first, second)[k](cid)
            latencies[k].append(time.perf_counter() - started)

    def figures(times: list[float]) -> dict[str, Any]:
        return {"callers": 1, "calls": len(times), "qps": len(times) / sum(times), **_percentiles(times)}

    return figures(latencies[0]), figures(latencies[1])


# -- baselines ----------------------------------------------------------------------------------


class _PlainTable(BareTables):
    """The bare driver writing one narrow row per event into an unindexed table: the engine's floor.

    One transaction per batch like ``record_batch``; fed batch by batch beside the measured ingest.
    """

    def __init__(self, url: str) -> None:
        super().__init__(url, {"raw_events": "kind text, peer text, at float8, value float8"})

    async def write(self, batch: list[Any]) -> None:
        await self.insert(
            {"raw_events": [(type(e).__name__, e.peer_id, float(e.at or 0), 1.0) for e in batch]}
        )


class _Replay:
    """The write path's own statements, replayed through the bare driver into a twin database.

    Every driver-level statement ``record_batch`` sends (captured with SQLAlchemy's
    ``before_cursor_execute`` hook, or as an observer of the SQLite write lane: a list append) is
    run again, with the same parameter tuples and one transaction per batch, by ``sqlite3`` /
    asyncpg on a second database migrated the same way. So the ratio of the two rates is what our
    layers (validation, event objects, parameter building, SQLAlchemy or the write lane, thread
    crossings) cost over the very same SQL work; the plain-table baseline of ``_PlainTable`` is the
    engine's floor for rows of that count. Time per statement is kept, which says where the database
    work goes.
    """

    def __init__(self, engine: str, url: str, tracker: AvailabilityTracker) -> None:
        self.engine, self.url = engine, url
        self.calls: list[tuple[str, Any, bool]] = []
        self.seconds = 0.0
        self.by_statement: dict[str, float] = {}
        self._sync_engine = tracker.engine.sync_engine
        self._lanes = tracker.sqlite_lanes
        self.sqlite: sqlite3.Connection | None = None
        self.pg: asyncpg.Connection | None = None

    def _record(self, _conn: Any, _cursor: Any, sql: str, params: Any, _ctx: Any, many: bool) -> None:
        self._observe(sql, params, many)

    def _observe(self, sql: str, params: Any, many: bool) -> None:
        if not sql.startswith("BEGIN"):
            self.calls.append((sql, params, many))

    async def __aenter__(self) -> _Replay:
        async with AvailabilityTracker(TrackerConfig(database_url=self.url)):
            pass  # migrated, with its local node: the same starting state as the measured database
        if self.engine == "sqlite":
            self.sqlite = sqlite3.connect(str(make_url(self.url).database), isolation_level=None)
            mmap_bytes = TrackerConfig().sqlite_mmap_mib * 1024 * 1024  # the tracker's own setting
            for pragma in ("synchronous=NORMAL", "foreign_keys=ON", f"mmap_size={mmap_bytes}"):
                self.sqlite.execute(f"PRAGMA {pragma}")
        else:
            self.pg = await asyncpg.connect(driver_dsn(self.url))
        sqlalchemy_event.listen(self._sync_engine, "before_cursor_execute", self._record)
        if self._lanes is not None:
            self._lanes.observers.append(self._observe)
        return self

    async def __aexit__(self, *_: object) -> None:
        sqlalchemy_event.remove(self._sync_engine, "before_cursor_execute", self._record)
        if self._lanes is not None:
            self._lanes.observers.remove(self._observe)
        if self.sqlite is not None:
            self.sqlite.close()
        if self.pg is not None:
            await self.pg.close()

    async def replay(self) -> None:
        """Run what was captured since the last call, in one transaction, timing it."""
        calls, self.calls = self.calls, []
        started = time.perf_counter()
        if self.sqlite is not None:
            self.sqlite.execute("BEGIN IMMEDIATE")
            for sql, params, many in calls:
                t = time.perf_counter()
                (self.sqlite.executemany if many else self.sqlite.execute)(sql, params)
                self._charge(sql, t)
            self.sqlite.execute("COMMIT")
        else:
            assert self.pg is not None
            async with self.pg.transaction():
                for sql, params, many in calls:
                    t = time.perf_counter()
                    if many:
                        await self.pg.executemany(sql, params)
                    else:
                        await self.pg.execute(sql, *params)
                    self._charge(sql, t)
        self.seconds += time.perf_counter() - started

    def _charge(self, sql: str, started: float) -> None:
        words = sql.split()
        table = next((w for w in words[1:6] if w.islower() and w.isidentifier() and w != "into"), "?")
        key = f"{words[0]} {table}"
        self.by_statement[key] = self.by_statement.get(key, 0.0) + time.perf_counter() - started


class _RawRanking:
    """The ranking statement's own SQL through the bare driver: the query's cost without our layers."""

    def __init__(self, engine: str, url: str, config: TrackerConfig) -> None:
        self.engine, self.url = engine, url
        self.statement = reads._ranked_select(
            config.dialect, config.reputation, reads._Selection.of(config), "best", True
        )
        self.config = config
        self.sqlite: sqlite3.Connection | None = None
        self.pool: asyncpg.Pool | None = None

    async def __aenter__(self) -> _RawRanking:
        if self.engine == "sqlite":
            self.sqlite = sqlite3.connect(str(make_url(self.url).database), check_same_thread=False)
            # The tracker's own read setting, so the comparison isolates our layers.
            self.sqlite.execute(f"PRAGMA mmap_size={self.config.sqlite_mmap_mib * 1024 * 1024}")
        else:
            self.pool = await asyncpg.create_pool(driver_dsn(self.url), min_size=1, max_size=32)
        return self

    async def __aexit__(self, *_: object) -> None:
        if self.sqlite is not None:
            self.sqlite.close()
        if self.pool is not None:
            await self.pool.close()

    def params(self, cid: str) -> tuple[Any, ...]:
        now = self.config.clock()
        return self.statement._row({"cid": cid, "limit": 5, "seed": 0, **reads.times(now, self.config)})

    async def explain(self, cid: str) -> list[str]:
        """The plan for ``cid``: EXPLAIN (ANALYZE, BUFFERS) on Postgres, EXPLAIN QUERY PLAN on SQLite."""
        if self.sqlite is not None:
            rows = self.sqlite.execute(
                "EXPLAIN QUERY PLAN " + self.statement.sql, self.params(cid)
            ).fetchall()
            return [f"{row[0]} {row[1]} {row[3]}" for row in rows]
        assert self.pool is not None
        plan = await self.pool.fetch("EXPLAIN (ANALYZE, BUFFERS) " + self.statement.sql, *self.params(cid))
        return [row[0] for row in plan]

    async def query(self, cid: str) -> list[Any]:
        if self.sqlite is not None:
            return self.sqlite.execute(self.statement.sql, self.params(cid)).fetchall()
        assert self.pool is not None
        return list(await self.pool.fetch(self.statement.sql, *self.params(cid)))


class _Memory:
    """The HashMap design: dicts of peers and holders, scores computed per query, ``heapq`` for top n."""

    def __init__(self, swarm: Swarm) -> None:
        self.online = {p for p in swarm.peers if p not in swarm.offline}
        self.stats = {
            p: (swarm.reliability[p] * 5, (1 - swarm.reliability[p]) * 5, 600.0, swarm.speed[p])
            for p in swarm.peers
        }
        self.holders = {cid: swarm.holders[i] for i, cid in enumerate(swarm.contents)}

    def best(self, cid: str, n: int = 5) -> list[tuple[float, int, str]]:
        candidates = []
        for peer in self.holders[cid]:
            if peer in self.online:
                s, f, up, speed = self.stats[peer]
                candidates.append((reputation(s, f, up, DEFAULT_PARAMS), speed, peer))
        return heapq.nlargest(n, candidates)


def _memory_call(memory: _Memory, swarm: Swarm) -> Callable[[random.Random], Awaitable[None]]:
    async def in_memory(r: random.Random) -> None:
        memory.best(swarm.draw_content(r))

    return in_memory


async def _redis_baseline(swarm: Swarm, memory: _Memory, queries: int, callers: int) -> dict[str, Any] | None:
    """Sorted sets per content (score = reputation, speed as tie-break) and ZREVRANGE; None without Redis."""
    try:
        import redis.asyncio as aioredis
    except ImportError:
        return None
    client = aioredis.from_url(REDIS_URL)
    try:
        await client.ping()
    except Exception:
        await client.aclose()
        return None
    try:
        await client.flushdb()
        pipe = client.pipeline(transaction=False)
        for i, cid in enumerate(swarm.contents):
            scores = {}
            for peer in swarm.holders[i]:
                if peer in memory.online:
                    s, f, up, speed = memory.stats[peer]
                    scores[peer] = reputation(s, f, up, DEFAULT_PARAMS) * 1e9 + speed / 1e3
            if scores:
                pipe.zadd(f"c:{cid}", scores)
            if len(pipe) >= 500:
                await pipe.execute()
        await pipe.execute()

        async def call(rng: random.Random) -> None:
            await client.zrevrange(f"c:{swarm.draw_content(rng)}", 0, 4, withscores=True)

        one = await _timed_calls(call, 1, queries, 11)
        many = await _timed_calls(call, callers, max(1, queries // callers), 12)
        sweep = await _concurrency_sweep(call, queries, 13)
        await client.flushdb()
        return {"one": one, "many": many, "concurrency": sweep}
    finally:
        await client.aclose()


async def _ingest(
    engine: str,
    url: str,
    tracker: AvailabilityTracker,
    swarm: Swarm,
    scratch: Path,
    sample: int,
    replay_statements: bool,
    log: Callable[[str], None],
) -> tuple[dict[str, Any], list[Any]]:
    """Every event of the swarm through ``record_batch`` in batches of 1,000, beside its baselines.

    Streams the events (the ``1m`` swarm has 26 million); returns the figures and every n-th event
    (``sample`` of them, the same mix) for the single-call workload.
    """
    stream = events(swarm, T0)
    total = event_count(swarm)
    stride = max(1, total // sample)
    mix: list[Any] = []
    batch_s, count = 0.0, 0
    replay: _Replay | None = None
    async with contextlib.AsyncExitStack() as stack:
        plain = await stack.enter_async_context(_PlainTable(url))
        if replay_statements:
            replay = _Replay(engine, await _database(engine, scratch, "replay"), tracker)
            stack.push_async_callback(drop_database, replay.url)
            await stack.enter_async_context(replay)
        while batch := list(itertools.islice(stream, 1000)):
            mix.extend(batch[(-count) % stride :: stride])
            count += len(batch)
            started = time.perf_counter()
            await tracker.record_batch(batch)
            batch_s += time.perf_counter() - started
            if replay is not None:
                await replay.replay()
            await plain.write(batch)
    figures: dict[str, Any] = {
        "events": count,
        "events_per_s": count / batch_s,
        "raw_rows_per_s": plain.rows / plain.seconds,
        "ratio_to_raw": plain.seconds / batch_s,
    }
    line = f"[{engine}] batch ingest {count:,} events: {count / batch_s:,.0f}/s; "
    if replay is not None:
        by_statement = dict(sorted(replay.by_statement.items(), key=lambda kv: -kv[1]))
        figures |= {
            "replay_events_per_s": count / replay.seconds,
            "ratio_to_replay": replay.seconds / batch_s,
            "replay_seconds_by_statement": by_statement,
        }
        line += (
            f"same statements via the bare driver {count / replay.seconds:,.0f}/s "
            f"(ratio {replay.seconds / batch_s:.2f}); "
        )
    log(line + f"plain-table rows {plain.rows / plain.seconds:,.0f}/s (ratio {plain.seconds / batch_s:.2f})")
    if replay is not None:
        log(
            f"[{engine}] replayed statements, seconds: "
            + ", ".join(f"{k} {v:.1f}" for k, v in by_statement.items())
        )
    return figures, mix[:sample]


async def _concurrent_singles(tracker: AvailabilityTracker, mix: list[Any], callers: int) -> float:
    """Seconds for ``callers`` coroutines to send ``mix`` one event per call (``tracker.record``)."""

    async def caller(i: int) -> None:
        for e in mix[i::callers]:
            await tracker.record(e)

    started = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(callers)))
    return time.perf_counter() - started


async def _release_leases(engine: str, url: str) -> None:
    """Drop every lease between selection phases, as if the last phase's downloads had ended.

    The suite's clock stands still, so no lease expires, and it reports no outcomes, so none is
    closed: without this, every phase would rank over the leases of all the phases before it (the
    hot peers carried thousands of open leases, each counted by every ranking that reaches them),
    which no tracker in service sees: leases expire after ``lease_ttl_s`` and a peer carries at most
    ``max_load_per_peer``. A plain statement through the bare driver while the tracker is idle;
    ``TRUNCATE`` on Postgres, so that no dead index entries stay behind for the next rankings to
    visit (the CI server runs without autovacuum).
    """
    if engine == "sqlite":
        with contextlib.closing(sqlite3.connect(str(make_url(url).database), timeout=30)) as conn:
            conn.execute("DELETE FROM peer_leases")
            conn.commit()
        return
    await execute(url, "TRUNCATE peer_leases")


async def _beside_ingest(
    tracker: AvailabilityTracker,
    swarm: Swarm,
    select: Callable[[random.Random], Awaitable[None]],
    per_caller: int,
    batches_alone: int,
) -> dict[str, Any]:
    """Selections from 32 callers while one coroutine ingests heartbeats of online peers in batches of
    1,000, and that ingest alone just before: what selections and ingest cost each other on one
    tracker (the 32 callers alone are the run's ``select_many``)."""
    online = sorted(set(swarm.peers) - swarm.offline)
    rng = random.Random(41)

    def heartbeats() -> list[PeerOnline]:
        return [PeerOnline(peer) for peer in rng.sample(online, 1000)]

    started = time.perf_counter()
    for _ in range(batches_alone):
        await tracker.record_batch(heartbeats())
    alone = batches_alone * 1000 / (time.perf_counter() - started)
    stop = asyncio.Event()

    async def ingest() -> int:
        written = 0
        while not stop.is_set():
            await tracker.record_batch(heartbeats())
            written += 1000
        return written

    writer = asyncio.create_task(ingest())
    started = time.perf_counter()
    try:
        selections = await _timed_calls(select, 32, per_caller, 25)
    finally:
        stop.set()
        written = await writer
    beside = written / (time.perf_counter() - started)
    return {
        "ingest_alone_per_s": alone,
        "ingest_beside_per_s": beside,
        "ingest_ratio": beside / alone,
        "select": selections,
    }


async def _gossip(
    engine: str,
    tracker: AvailabilityTracker,
    clock: ManualClock,
    swarm: Swarm,
    scratch: Path,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """The whole swarm as one gossip delta to an empty tracker of the same engine (what a new
    neighbour's first contact costs), beside the bare driver writing the same rows; then a round in
    which every online peer heartbeats once (the steady state). Default gossip settings.

    Each stage is timed (``benchmarks.gossip.transfer``); the target must end up holding what the
    source holds, or the figures would be of a transfer that lost rows.
    """
    url = await _database(engine, scratch, "gossip")
    config = TrackerConfig(database_url=url, clock=clock, max_batch_events=1_000, pool_size=8)
    try:
        async with AvailabilityTracker(config) as target:
            link = Link(engine, tracker, target, GossipConfig(keys=(KEY,)), Keyring([KEY]), clock)
            async with RawRows(url) as raw:
                first = await transfer(link, ({}, {}), raw=raw)
            have, got = await tracker.stats(), await target.stats()
            for field in ("peers_total", "peers_online", "contents_total", "mappings_available"):
                assert getattr(got, field) == getattr(have, field), (field, have, got)
            online = sorted(set(swarm.peers) - swarm.offline)
            beat = await heartbeat_round(link, first["vectors"], online)
            assert beat["applied"] == len(online) == (await target.stats()).peers_online
    finally:
        await drop_database(url)

    def figures(r: dict[str, Any]) -> dict[str, Any]:
        return {
            **{k: r[k] for k in ("rows", "samples", "messages", "bytes", "total_s")},
            **{f"{k}_s": v for k, v in r["stages"].items()},
            "rows_per_s": r["rows"] / r["total_s"],
        }

    result = {
        "first_contact": {
            **figures(first),
            "raw_s": raw.seconds,
            "raw_rows": raw.rows,
            "merge_over_raw": first["stages"]["merge"] / raw.seconds,
        },
        "heartbeat_round": figures(beat),
    }
    one = result["first_contact"]
    log(
        f"[{engine}] gossip first contact: {one['rows']:,} rows with {one['samples']:,} samples in "
        f"{one['messages']:,} messages, {one['total_s']:.1f} s ({one['rows_per_s']:,.0f} rows/s), merge "
        f"{one['merge_s']:.1f} s, {one['merge_over_raw']:.1f}x the bare driver's {raw.seconds:.2f} s; "
        f"a heartbeat round of {beat['rows']:,} peers {beat['total_s']:.1f} s"
    )
    return result


async def _analyze(engine: str, url: str) -> None:
    """Vacuum and refresh the planner's statistics after the bulk load, as autovacuum would have
    done by then on a default server.

    The CI server runs with autovacuum off: without this, Postgres plans the ranking from empty
    statistics (it estimated 2M rows of ``peer_stats`` for 100k and chose a parallel scan), and every
    ranking probes indexes still full of the entries of rows the ingest replaced (each peer's stats
    row is rewritten by ~26 events).
    """
    if engine == "sqlite":
        # SQLite picks these statements' indexes without statistics, and the same with them: on the
        # 100k file ANALYZE left the ranking's plan (plan-sqlite-*.txt) and its p50 as they were.
        return
    await execute(url, "VACUUM (ANALYZE)")


# -- the run ------------------------------------------------------------------------------------


#: Server settings that moved the figures (docs/benchmarks.md): recorded with every run.
_PG_SETTINGS = ("server_version", "shared_buffers", "effective_cache_size", "work_mem", "autovacuum")


async def _server(engine: str, url: str, config: TrackerConfig) -> dict[str, Any]:
    """The engine's version and the settings a reader needs to compare runs (the 1m Postgres run
    cost 2.1x its 100k figure with the default ``shared_buffers``, 1.4x with 2 GB)."""
    if engine == "sqlite":
        return {"version": sqlite3.sqlite_version, "mmap_mib": config.sqlite_mmap_mib}
    conn = await asyncpg.connect(driver_dsn(url))
    try:
        settings = {name: await conn.fetchval(f"SHOW {name}") for name in _PG_SETTINGS}
    finally:
        await conn.close()
    return {"version": settings.pop("server_version"), **settings}


async def _database(engine: str, scratch: Path, name: str = "suite") -> str:
    if engine == "sqlite":
        return f"sqlite+aiosqlite:///{scratch / name}.db"
    return await create_database(f"bench_{name}")


async def run_engine(
    engine: str,
    swarm: Swarm,
    quick: bool,
    scratch: Path,
    log: Callable[[str], None],
    replay: bool,
    memory: _Memory,
    gossip: bool = True,
) -> dict[str, Any]:
    url = await _database(engine, scratch)
    clock = ManualClock(T0)
    config = TrackerConfig(database_url=url, clock=clock, max_batch_events=1_000, pool_size=8)
    result: dict[str, Any] = {"engine": engine}
    try:
        result["server"] = await _server(engine, url, config)
        async with AvailabilityTracker(config) as tracker:
            # 1. ingest, batched, each batch's statements replayed raw right after it (same conditions)
            result["ingest_batch"], mix = await _ingest(
                engine, url, tracker, swarm, scratch, 2_000 if quick else 20_000, replay, log
            )
            await _analyze(engine, url)

            # 1b. single calls from 100 coroutines: the same mix of events, one per call (group commit)
            single_s = await _concurrent_singles(tracker, mix, 100)
            mix_batch_s = 0.0
            for start in range(0, len(mix), 1000):
                started = time.perf_counter()
                await tracker.record_batch(mix[start : start + 1000])
                mix_batch_s += time.perf_counter() - started
            result["ingest_single"] = {
                "calls": len(mix),
                "callers": 100,
                "events_per_s": len(mix) / single_s,
                "same_events_batched_per_s": len(mix) / mix_batch_s,
                "ratio_to_batch": mix_batch_s / single_s,
            }
            log(
                f"[{engine}] single-event ingest, 100 coroutines: {len(mix) / single_s:,.0f}/s; the same "
                f"events in batches of 1,000 {len(mix) / mix_batch_s:,.0f}/s "
                f"({result['ingest_single']['ratio_to_batch']:.2f} of batch)"
            )

            # 2. selection
            queries = 300 if quick else 3_000

            async def select(r: random.Random) -> None:
                await tracker.select_best_peers(swarm.draw_content(r), 5)

            # The ranking as the tracker's own reads run it (on SQLite, on its read lane).
            read_lane = None if tracker.sqlite_lanes is None else tracker.sqlite_lanes.read

            async def rank(r: random.Random) -> None:
                cid = swarm.draw_content(r)

                async def work(conn: Any) -> Any:
                    return await reads.ranked_holders(conn, cid, clock.now, config, limit=5, mode="best")

                await run_read_unit(tracker.engine, read_lane, work)

            # One caller, paired call by call with the in-memory baseline on the same contents.
            async def select_cid(cid: str) -> None:
                await tracker.select_best_peers(cid, 5)

            async def memory_cid(cid: str) -> None:
                memory.best(cid)

            async def release() -> None:
                await _release_leases(engine, url)

            await release()
            result["select_one"], result["memory_beside"] = await _paired_calls(
                select_cid, memory_cid, swarm.draw_content, queries, 21
            )
            await release()
            result["select_many"] = await _timed_calls(select, 32, max(1, queries // 32), 22)
            result["select_concurrency"] = await _concurrency_sweep(select, queries // 3, 40, release)
            log(
                f"[{engine}] selections/s by callers: "
                + ", ".join(f"{c}: {r['qps']:,.0f}" for c, r in result["select_concurrency"].items())
            )
            await release()
            result["beside_ingest"] = await _beside_ingest(
                tracker, swarm, select, max(1, queries // 32), 5 if quick else 30
            )
            result["beside_ingest"]["select_ratio"] = (
                result["beside_ingest"]["select"]["qps"] / result["select_many"]["qps"]
            )
            result["rank_one"] = await _timed_calls(rank, 1, queries, 23)
            async with _RawRanking(engine, url, config) as raw:

                async def raw_rank(r: random.Random) -> None:
                    await raw.query(swarm.draw_content(r))

                result["raw_rank_one"] = await _timed_calls(raw_rank, 1, queries, 23)
                if engine == "postgresql":
                    result["raw_rank_many"] = await _timed_calls(raw_rank, 32, max(1, queries // 32), 24)
                # What bounds the query: its plan for the hottest content, with timings on Postgres.
                result["plan_hottest"] = await raw.explain(swarm.contents[0])
            result["rank_over_raw_p50"] = result["rank_one"]["p50_ms"] / result["raw_rank_one"]["p50_ms"]
            log(
                f"[{engine}] select_best_peers p50 {result['select_one']['p50_ms']:.2f} ms, "
                f"p99 {result['select_one']['p99_ms']:.2f} ms; "
                f"32 callers {result['select_many']['qps']:,.0f}/s; "
                f"ranking p50 {result['rank_one']['p50_ms']:.2f} ms vs raw SQL "
                f"{result['raw_rank_one']['p50_ms']:.2f} ms ({result['rank_over_raw_p50']:.2f}x)"
            )
            beside = result["beside_ingest"]
            log(
                f"[{engine}] beside ingest: 32 callers {beside['select']['qps']:,.0f}/s "
                f"({beside['select_ratio']:.2f} of alone), heartbeats {beside['ingest_beside_per_s']:,.0f}/s "
                f"({beside['ingest_ratio']:.2f} of {beside['ingest_alone_per_s']:,.0f}/s alone)"
            )

            # 3. sweep
            clock.advance(400)
            report = await tracker.sweep()
            result["sweep"] = {
                "duration_s": report.duration_s,
                "peers_marked_offline": report.peers_marked_offline,
            }
            log(f"[{engine}] sweep {report.duration_s:.2f} s, {report.peers_marked_offline:,} peers offline")

            # 4. gossip: the swarm (now swept offline) to a new neighbour, then the peers' return
            if gossip:
                result["gossip"] = await _gossip(engine, tracker, clock, swarm, scratch, log)
    finally:
        await drop_database(url)
    return result


async def run(
    quick: bool,
    engines: list[str],
    scale: str,
    out: Path,
    log: Callable[[str], None] = print,
    replay: bool = True,
    gossip: bool = True,
) -> dict[str, Any]:
    n_peers = 5_000 if quick else {"100k": 100_000, "1m": 1_000_000}[scale]
    swarm = generate(n_peers)
    log(
        f"swarm: {len(swarm.peers):,} peers ({len(swarm.offline):,} offline), "
        f"{len(swarm.contents):,} contents, "
        f"{swarm.mappings:,} mappings"
    )
    results: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "date": time.strftime("%Y-%m-%d"),
        },
        "scale": "quick" if quick else scale,
        "swarm": {"peers": len(swarm.peers), "contents": len(swarm.contents), "mappings": swarm.mappings},
        "engines": [],
    }
    queries = 300 if quick else 3_000
    memory = _Memory(swarm)
    results["memory"] = await _timed_calls(_memory_call(memory, swarm), 1, queries, 31)
    results["redis"] = await _redis_baseline(swarm, memory, queries, 32)
    log(
        f"in-memory heapq p50 {results['memory']['p50_ms']:.3f} ms; "
        + (
            "Redis unavailable"
            if results["redis"] is None
            else f"Redis ZREVRANGE p50 {results['redis']['one']['p50_ms']:.3f} ms, 32 callers "
            f"{results['redis']['many']['qps']:,.0f}/s"
        )
    )
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-suite-") as tmp:
        for engine in engines:
            results["engines"].append(
                await run_engine(engine, swarm, quick, Path(tmp), log, replay, memory, gossip)
            )
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(results))
    plot(results, out)
    write_plans(results, out)
    log(f"wrote {out / 'results.json'}, {out / 'results.md'} and plots")
    return results

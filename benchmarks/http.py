"""HTTP benchmark: the service's throughput and latency beside the same operations called in-process.

Run: ``python -m benchmarks.http [--quick] [--engine sqlite|postgresql|all] [--concurrency C] [--seconds S]``.

For each engine, one swarm (built through the library) is measured twice with the same workloads and
concurrency: first in-process through ``AvailabilityTracker``, then through ``tracker serve`` running as a
subprocess on a loopback port, driven by a load generator in a third process (so client and server do
not share a core's event loop). The ratio HTTP / in-process is the cost of the HTTP layer: parsing,
validation, routing, serialisation and the loopback socket. The load generator is Python (httpx) too,
so on a 2-core machine its own CPU is part of what bounds the HTTP figures: read the ratio as a lower
bound of what a native client would see.

Workloads: ``best`` (``select_best_peers(cid, 5)`` / ``GET /v1/content/{cid}/best?n=5`` for random
contents), ``single`` (one heartbeat per call / ``POST /v1/peers/heartbeat``), ``batch`` (100 events per
call / ``POST /v1/events``). Leases are granted by ``best``; the cap is raised so that the measured
work stays the same throughout the run instead of turning into "every peer is full".
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy.engine import make_url

from benchmarks.scratch import PG_URL
from benchmarks.scratch import admin as _admin
from tracker import AvailabilityTracker, TrackerConfig
from tracker.demo import SwarmSpec, load_swarm, plan_swarm
from tracker.events import PeerOnline, SpeedSample

WORKLOADS = ("best", "single", "batch")
BATCH = 100
# The load generator is one client on few connections: the per-connection rate limit would measure itself.
SERVER_ENV = {
    "TRACKER_MAX_LOAD_PER_PEER": "1000000",
    "TRACKER_LOG_LEVEL": "warning",
    "TRACKER_RATE_LIMIT_PER_S": "0",
}


@dataclass(frozen=True)
class Figures:
    """Calls per second and latency percentiles of one workload on one side."""

    calls: int
    seconds: float
    latencies_s: list[float]
    events_per_call: int

    @property
    def calls_per_s(self) -> float:
        return self.calls / self.seconds

    @property
    def events_per_s(self) -> float:
        return self.calls_per_s * self.events_per_call

    def percentile_ms(self, q: float) -> float:
        ordered = sorted(self.latencies_s)
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _drive(
    call: Callable[[random.Random], Awaitable[None]], concurrency: int, seconds: float
) -> Figures:
    """Run ``call`` from ``concurrency`` workers for ``seconds``; each worker has its own seeded RNG."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker(seed: int) -> None:
        rng = random.Random(seed)
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await call(rng)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker(seed) for seed in range(concurrency)))
    return Figures(len(latencies), time.perf_counter() - started, latencies, 1)


def _batch_events(rng: random.Random, peers: int) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    for _ in range(BATCH // 2):
        peer = f"peer-{rng.randrange(peers):04d}"
        events.append({"type": "peer_online", "peer_id": peer})
        events.append({"type": "speed_sample", "peer_id": peer, "bytes_per_sec": rng.randrange(1, 10**7)})
    return events


async def _in_process(url: str, workload: str, spec: SwarmSpec, concurrency: int, seconds: float) -> Figures:
    config = TrackerConfig(database_url=url, max_load_per_peer=1_000_000)
    async with AvailabilityTracker(config) as tracker:

        async def best(rng: random.Random) -> None:
            await tracker.select_best_peers(f"cid-{rng.randrange(spec.contents):05d}", 5)

        async def single(rng: random.Random) -> None:
            await tracker.record_peer_online(f"peer-{rng.randrange(spec.peers):04d}")

        async def batch(rng: random.Random) -> None:
            events = [
                PeerOnline(e["peer_id"])
                if e["type"] == "peer_online"
                else SpeedSample(e["peer_id"], e["bytes_per_sec"])
                for e in _batch_events(rng, spec.peers)
            ]
            await tracker.record_batch(events)

        figures = await _drive(
            {"best": best, "single": single, "batch": batch}[workload], concurrency, seconds
        )
    return _per_call(figures, workload)


def _per_call(figures: Figures, workload: str) -> Figures:
    events = BATCH if workload == "batch" else 1
    return Figures(figures.calls, figures.seconds, figures.latencies_s, events)


def _generate(base_url: str, workload: str, spec: SwarmSpec, concurrency: int, seconds: float) -> Figures:
    """The load generator's body, run in its own process."""

    async def main() -> Figures:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30) as client:

            async def best(rng: random.Random) -> None:
                cid = f"cid-{rng.randrange(spec.contents):05d}"
                (await client.get(f"/v1/content/{cid}/best", params={"n": 5})).raise_for_status()

            async def single(rng: random.Random) -> None:
                body = {"peer_id": f"peer-{rng.randrange(spec.peers):04d}"}
                (await client.post("/v1/peers/heartbeat", json=body)).raise_for_status()

            async def batch(rng: random.Random) -> None:
                body = {"events": _batch_events(rng, spec.peers)}
                (await client.post("/v1/events", json=body)).raise_for_status()

            calls = {"best": best, "single": single, "batch": batch}
            return await _drive(calls[workload], concurrency, seconds)

    return _per_call(asyncio.run(main()), workload)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _start_server(url: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "tracker", "serve", "--database-url", url, "--port", str(port)]
    command.append("--no-sweeper")
    env = {**os.environ, **SERVER_ENV}
    with log.open("wb") as sink:
        server = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"tracker serve exited with {server.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    server.terminate()
    raise RuntimeError("tracker serve did not become ready within 30 s")


def _stop_server(server: subprocess.Popen[bytes]) -> None:
    server.terminate()
    try:
        code = server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        raise RuntimeError("tracker serve did not stop within 30 s of SIGTERM") from None
    if code != 0:
        raise RuntimeError(f"tracker serve exited with {code} after SIGTERM")


async def _populate(url: str, spec: SwarmSpec) -> None:
    async with AvailabilityTracker(TrackerConfig(database_url=url)) as tracker:
        await load_swarm(tracker, plan_swarm(spec, time.time()))


def run(engine: str, spec: SwarmSpec, concurrency: int, seconds: float, scratch: Path) -> list[str]:
    """Measure one engine; returns the Markdown table rows."""
    if engine == "sqlite":
        url = f"sqlite+aiosqlite:///{scratch / 'http.db'}"
    else:
        name = f"bench_http_{uuid.uuid4().hex[:8]}"
        asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
        url = make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    rows = []
    try:
        asyncio.run(_populate(url, spec))
        local = {w: asyncio.run(_in_process(url, w, spec, concurrency, seconds)) for w in WORKLOADS}
        port = _free_port()
        server = _start_server(url, port, scratch / f"serve-{engine}.log")
        try:
            with ProcessPoolExecutor(max_workers=1) as generator:
                remote = {
                    w: generator.submit(
                        _generate, f"http://127.0.0.1:{port}", w, spec, concurrency, seconds
                    ).result()
                    for w in WORKLOADS
                }
        finally:
            _stop_server(server)
        for workload in WORKLOADS:
            mine, http = local[workload], remote[workload]
            cells = [engine, workload]
            for side in (mine, http):
                cells += [f"{side.events_per_s:,.0f}", f"{side.percentile_ms(0.5):.2f}"]
                cells.append(f"{side.percentile_ms(0.99):.2f}")
            cells.append(f"{http.events_per_s / mine.events_per_s:.2f}")
            rows.append("| " + " | ".join(cells) + " |")
    finally:
        if engine == "postgresql":
            asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)'))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=("sqlite", "postgresql", "all"), default="all")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0, help="Per workload and side.")
    parser.add_argument("--quick", action="store_true", help="Small swarm, 1 s per workload (smoke run).")
    args = parser.parse_args()
    spec = (
        SwarmSpec(peers=500, contents=500, holders=8)
        if args.quick
        else SwarmSpec(peers=5_000, contents=5_000, holders=10)
    )
    seconds = 1.0 if args.quick else args.seconds
    engines = ("sqlite", "postgresql") if args.engine == "all" else (args.engine,)
    print(
        f"swarm: {spec.peers:,} peers, {spec.contents:,} contents x {spec.holders} holders; "
        f"{args.concurrency} concurrent callers, {seconds:g} s per workload; batch = {BATCH} events; "
        f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}"
    )
    header = [
        "| engine | workload | in-process events/s | p50 ms | p99 ms "
        "| HTTP events/s | p50 ms | p99 ms | HTTP / in-process |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows: list[str] = []
    with tempfile.TemporaryDirectory(prefix="tracker-http-bench-") as scratch:
        for engine in engines:
            rows += run(engine, spec, args.concurrency, seconds, Path(scratch))
    print("\n".join(header + rows))


if __name__ == "__main__":
    main()

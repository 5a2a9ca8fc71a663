"""The tracker behind PgBouncer, against the same tracker connected to Postgres directly.

Run: ``python -m benchmarks.pooler [--quick] [--peers N] [--rounds R]``. Needs ``pgbouncer`` installed
(Debian: ``apt-get install pgbouncer``); Postgres comes from TRACKER_BENCH_POSTGRES_URL (default: the
test server), in a scratch database. The poolers listen on loopback only.

Three routes to one database, each workload run on each route in turn, ``--rounds`` times, in
alternating order (so drift on a noisy machine falls on every route alike): direct (the baseline),
PgBouncer in session mode, and in transaction mode with ``pg_transaction_pooling`` (statements
parsed each time they run, the session's settings set in each transaction). Workloads: single
outcomes from 100 coroutines, batches of 1,000 heartbeats, and ``select_best_peers`` from 8 callers.
The figures are ratios to the direct route in the same run.

``pgbouncer(...)`` starts a PgBouncer of its own; tests/test_pgbouncer.py uses it too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pwd
import random
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

from benchmarks.scratch import create_database, driver_dsn, drop_database, execute
from tracker import AvailabilityTracker, TrackerConfig
from tracker.db import pg_server_settings
from tracker.events import ContentAvailable, Event, PeerOnline, SpeedSample, UploadOutcome

#: The pgbouncer binary (Debian installs it outside a normal user's PATH), or None.
PGBOUNCER = shutil.which("pgbouncer") or next(
    (path for path in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.access(path, os.X_OK)), None
)


@asynccontextmanager
async def pgbouncer(db_url: str, mode: str, server_connections: int) -> AsyncIterator[str]:
    """``async with pgbouncer(url, "session" | "transaction", n) as pooled_url``: a PgBouncer of its
    own on a free loopback port in front of the server of ``url``, with at most ``n`` server
    connections per database; ``pooled_url`` is ``url`` through it. Stopped on exit."""
    if PGBOUNCER is None:
        raise RuntimeError("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
    server = make_url(db_url)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    folder = Path(tempfile.mkdtemp(prefix="pgbouncer-"))
    folder.chmod(0o755)  # PgBouncer refuses to run as root: started as root it becomes another user
    (folder / "users.txt").write_text(f'"{server.username}" "{server.password or ""}"\n')
    (folder / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"* = host={server.host or '127.0.0.1'} port={server.port or 5432}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {folder / 'users.txt'}\n"
        f"pool_mode = {mode}\ndefault_pool_size = {server_connections}\nmax_client_conn = 500\n"
    )
    for name in ("users.txt", "pgbouncer.ini"):
        (folder / name).chmod(0o644)
    user = ["-u", _unprivileged_user()] if os.geteuid() == 0 else []
    log = (folder / "pgbouncer.log").open("wb")
    process = subprocess.Popen([PGBOUNCER, *user, str(folder / "pgbouncer.ini")], stderr=log)
    url = server.set(host="127.0.0.1", port=port).render_as_string(hide_password=False)
    try:
        await _wait_until_it_answers(url, process, folder / "pgbouncer.log")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


def _unprivileged_user() -> str:
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name).pw_name
        except KeyError:
            continue
    raise RuntimeError("no unprivileged user for PgBouncer to run as")


async def _wait_until_it_answers(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            conn = await asyncpg.connect(driver_dsn(url), timeout=2, statement_cache_size=0)
        except (OSError, asyncpg.PostgresError):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pgbouncer did not start: {log.read_text(errors='replace')}") from None
            await asyncio.sleep(0.05)
            continue
        await conn.close()
        return


def _swarm(peers: int, contents: int, now: float) -> list[Event]:
    """Peers online for a while with a speed and a few outcomes; each content held by ~50 of them."""
    rng = random.Random(7)
    events: list[Event] = []
    for i in range(peers):
        name = f"peer-{i:06d}"
        events += [PeerOnline(name, at=now - 600), SpeedSample(name, rng.randint(10**5, 10**7), at=now - 5)]
        events += [UploadOutcome(name, rng.random() < 0.9, at=now - 4) for _ in range(3)]
    for c in range(contents):
        events += [
            ContentAvailable(f"cid-{c}", f"peer-{rng.randrange(peers):06d}", at=now - 3) for _ in range(50)
        ]
    return events


Workload = Callable[[AvailabilityTracker], Awaitable[dict[str, float]]]


def _workloads(peers: int, contents: int, scale: int) -> dict[str, Workload]:
    names = [f"peer-{i:06d}" for i in range(peers)]

    async def singles(tracker: AvailabilityTracker) -> dict[str, float]:
        per_caller = 50 * scale

        async def caller(k: int) -> None:
            for i in range(per_caller):
                await tracker.record_upload_success(names[(k * 131 + i) % peers])

        started = time.perf_counter()
        await asyncio.gather(*(caller(k) for k in range(100)))
        return {"events_per_s": 100 * per_caller / (time.perf_counter() - started)}

    async def batches(tracker: AvailabilityTracker) -> dict[str, float]:
        count = 20 * scale
        started = time.perf_counter()
        for b in range(count):
            await tracker.record_batch([PeerOnline(names[(b * 1000 + i) % peers]) for i in range(1000)])
        return {"events_per_s": count * 1000 / (time.perf_counter() - started)}

    async def selections(tracker: AvailabilityTracker) -> dict[str, float]:
        per_caller = 25 * scale
        latencies: list[float] = []

        async def caller(k: int) -> None:
            rng = random.Random(k)
            for _ in range(per_caller):
                started = time.perf_counter()
                await tracker.select_best_peers(f"cid-{rng.randrange(contents)}", 5)
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(caller(k) for k in range(8)))
        elapsed = time.perf_counter() - started
        return {"per_s": 8 * per_caller / elapsed, "p50_ms": statistics.median(latencies) * 1000}

    return {"single outcomes x100": singles, "batches of 1,000": batches, "selections x8": selections}


async def measure(
    peers: int, contents: int, scale: int, rounds: int, *, server_defaults: bool = False
) -> dict[str, Any]:
    """Each workload on each route, ``rounds`` times in alternating order; the median of each.
    ``server_defaults``: the database's defaults carry the tracker's session settings, which the
    transaction route then need not set in each transaction."""
    url = await create_database("bench_pooler")
    base = TrackerConfig(database_url=url, pool_size=5, max_load_per_peer=10_000, lease_ttl_s=1.0)
    figures: dict[str, dict[str, list[dict[str, float]]]] = {}
    try:
        async with AvailabilityTracker(base) as tracker:
            swarm = _swarm(peers, contents, time.time())
            for start in range(0, len(swarm), 20_000):
                await tracker.record_batch(swarm[start : start + 20_000])
        await execute(url, "VACUUM ANALYZE")
        if server_defaults:
            database = make_url(url).database
            for name, value in pg_server_settings(base).items():
                await execute(url, f"ALTER DATABASE \"{database}\" SET {name} = '{value}'")
        async with (
            pgbouncer(url, "session", 2 * base.pool_size) as session_url,
            pgbouncer(url, "transaction", base.pool_size) as transaction_url,
        ):
            routes = {
                "direct": base,
                "session": replace(base, database_url=session_url),
                "transaction": replace(base, database_url=transaction_url, pg_transaction_pooling=True),
            }
            for round_no in range(rounds):
                order = list(routes) if round_no % 2 == 0 else list(reversed(routes))
                for route in order:
                    async with AvailabilityTracker(replace(routes[route], auto_migrate=False)) as tracker:
                        for name, workload in _workloads(peers, contents, scale).items():
                            figures.setdefault(name, {}).setdefault(route, []).append(await workload(tracker))
    finally:
        await drop_database(url)
    return {
        name: {
            route: {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            for route, runs in by_route.items()
        }
        for name, by_route in figures.items()
    }


def table(results: dict[str, Any]) -> str:
    lines = [
        "| workload | figure | direct | session | transaction | session / direct | transaction / direct |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, by_route in results.items():
        for key in by_route["direct"]:
            d, s, t = (by_route[route][key] for route in ("direct", "session", "transaction"))
            lines.append(f"| {name} | {key} | {d:,.1f} | {s:,.1f} | {t:,.1f} | {s / d:.2f} | {t / d:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pooler", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small swarm, one round: seconds")
    parser.add_argument("--peers", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--server-defaults",
        action="store_true",
        help="ALTER DATABASE ... SET the tracker's session settings (none set per transaction then)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    peers, contents, scale, rounds = (
        (500, 20, 1, 1) if args.quick else (args.peers, max(20, args.peers // 100), 4, args.rounds)
    )
    results = asyncio.run(measure(peers, contents, scale, rounds, server_defaults=args.server_defaults))
    defaults = "; the settings are the database's defaults" if args.server_defaults else ""
    print(f"PgBouncer against a direct connection: {peers:,} peers, {contents:,} contents{defaults}")
    print(f"(median of {rounds} rounds)")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

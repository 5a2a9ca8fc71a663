"""Gossip benchmark: a big delta through every stage, and rounds to converge in a simulated swarm.

Run: ``python -m benchmarks.gossip [--quick] [--engine sqlite|postgresql|all] [--json PATH]``.
Postgres comes from TRACKER_BENCH_POSTGRES_URL (default: the test server), in scratch databases.

1. Delta: a tracker holding 10,000 changed peers (10 bandwidth samples each) and 100,000 content
   mappings sends them all to an empty tracker of the same engine, in messages of ``max_rows`` rows.
   Timed per stage: stamping, reading the delta (SQL), encoding and signing, verifying and decoding,
   merging (SQL); bytes on the wire per row. Then the same transfer end to end over HTTP on 127.0.0.1
   (``GossipAgent.exchange`` against a uvicorn server). Baseline in the same run: the same rows inserted
   into empty tables by the bare driver (``sqlite3.executemany`` / asyncpg ``copy_records_to_table``),
   the storage engine's own floor for writing them. Then the steady state: a round in which every
   peer heartbeats once, sent as message version 2 and version 1; and rounds of heartbeats staggered
   over the interval (each peer at its own phase) with the source's ``heartbeat_resolution_s`` at
   0, 60 and 150 s: rows carried and seconds of stages per round, against no resolution.
2. Convergence: n trackers (SQLite files, in-process transport), every node knowing every other, fanout
   3; each node announces one peer and one content; rounds until every node holds all of them, against
   log2(n).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from benchmarks.scratch import BareTables, create_database, drop_database
from tracker import AvailabilityTracker, TrackerConfig
from tracker.db import run_read, run_write
from tracker.events import ContentAvailable, PeerOnline, SpeedSample
from tracker.gossip.agent import GOSSIP_PATH, GossipAgent
from tracker.gossip.config import GossipConfig
from tracker.gossip.protocol import VERSION, Keyring, Message, decode, new_nonce, signed
from tracker.queries import gossip as q
from tracker.service.app import create_app
from tracker.testing import ManualClock

KEY = "benchmark-gossip-key-0123456789"
T0 = 1_800_000_000.0


async def _database(engine: str, scratch: Path, name: str) -> str:
    if engine == "sqlite":
        return f"sqlite+aiosqlite:///{scratch / (name + '.db')}"
    return await create_database(f"bench_gossip_{name}")


def _peer_names(n_peers: int) -> list[str]:
    return [f"peer-{i:06d}" for i in range(n_peers)]


async def _populate(tracker: AvailabilityTracker, n_peers: int, n_mappings: int) -> None:
    rng = random.Random(5)
    peers = _peer_names(n_peers)
    events: list[Any] = [PeerOnline(p, at=T0 - 60) for p in peers]
    events += [SpeedSample(p, rng.randrange(10**5, 10**8), at=T0 - 60 + k) for p in peers for k in range(10)]
    holders = max(1, n_mappings // max(1, n_peers))
    contents = n_mappings // holders
    events += [
        ContentAvailable(f"cid-{c:06d}", peers[(c * 7 + h * 101) % n_peers], at=T0 - 30)
        for c in range(contents)
        for h in range(holders)
    ]
    for start in range(0, len(events), 20_000):
        await tracker.record_batch(events[start : start + 20_000])


class RawRows(BareTables):
    """The bare driver's floor for a delta: each message's peer, sample and mapping rows inserted into
    plain tables right after the message is merged, one transaction per message, so no message need be
    kept (the ``1m`` swarm's first contact is millions of rows)."""

    def __init__(self, url: str) -> None:
        super().__init__(
            url,
            {
                "raw_peers": "peer text, origin text, last_seen float8, uptime float8, served bigint, "
                "failed bigint, sw float8, version bigint",
                "raw_samples": "peer text, origin text, at float8, speed float8",
                "raw_maps": "cid text, peer text, origin text, available boolean, changed_at float8, "
                "version bigint",
            },
        )

    async def write(self, message: Message) -> None:
        deltas = message.deltas
        await self.insert(
            {
                "raw_peers": [
                    (
                        p.peer,
                        d.origin,
                        p.last_seen,
                        p.uptime_s,
                        p.served,
                        p.failed,
                        p.success_weight,
                        p.version,
                    )
                    for d in deltas
                    for p in d.peers
                ],
                "raw_samples": [
                    (p.peer, d.origin, at, speed)
                    for d in deltas
                    for p in d.peers
                    for at, speed in p.samples or ()
                ],
                "raw_maps": [
                    (x.cid, x.peer, d.origin, x.available, x.changed_at, x.version)
                    for d in deltas
                    for x in d.mappings
                ],
            }
        )


@dataclass(frozen=True)
class Link:
    """A source tracker sending to a target of the same engine, and the settings they use."""

    engine: str
    source: AvailabilityTracker
    target: AvailabilityTracker
    cfg: GossipConfig
    keyring: Keyring
    clock: ManualClock


Vectors = tuple[dict[str, int], dict[str, int]]  # version and samples vectors (q.vectors)


async def transfer(
    link: Link, vectors: Vectors, version: int = VERSION, raw: RawRows | None = None
) -> dict[str, Any]:
    """Stamp the source and send the target everything past ``vectors``, timing each stage; ``raw``
    writes each message's rows by the bare driver right after its merge (the floor)."""
    engine, source, target, cfg, keyring, clock = (
        link.engine,
        link.source,
        link.target,
        link.cfg,
        link.keyring,
        link.clock,
    )
    stages = dict.fromkeys(("stamp", "read", "encode", "decode", "merge"), 0.0)

    async def stamp(conn: Any) -> int:
        return (await q.stamp(conn, engine, source.node_id, cfg.stamp_chunk, at=clock.now)).clock

    t = time.perf_counter()
    await run_write(source.engine, stamp, 3)
    stages["stamp"] = time.perf_counter() - t
    wire = rows = samples = applied = messages = 0
    while True:
        t = time.perf_counter()

        async def read(conn: Any, vectors: Vectors = vectors) -> q.Delta:
            return await q.read_deltas(
                conn, vectors[0], (), cfg.max_rows, 10, samples=vectors[1], every_sample=version == 1
            )

        delta = await run_read(source.engine, read)
        stages["read"] += time.perf_counter() - t
        if not delta.deltas:
            break
        t = time.perf_counter()
        message = Message(
            version=version,  # type: ignore[arg-type]
            kind="sync",
            node=source.node_key,
            sent_at=clock.now,
            nonce=new_nonce(),
            vector={},
            deltas=delta.deltas,
        )
        body, headers = signed(message, keyring)
        stages["encode"] += time.perf_counter() - t
        t = time.perf_counter()
        received = decode(
            body, headers["Authorization"], keyring, max_bytes=cfg.max_bytes, now=clock.now, max_skew_s=60
        )
        stages["decode"] += time.perf_counter() - t
        t = time.perf_counter()

        async def merge(conn: Any, received: Message = received) -> tuple[q.MergeCounts, Vectors]:
            counts = await q.merge(conn, engine, target.node_key, received.deltas, 10, clock.now)
            return counts, await q.vectors(conn)

        counts, vectors = await run_write(target.engine, merge, 3)
        applied += counts.peers
        stages["merge"] += time.perf_counter() - t
        if raw is not None:
            await raw.write(received)
        messages += 1
        wire += len(body)
        rows += received.rows
        samples += sum(len(p.samples or ()) for d in received.deltas for p in d.peers)
    total = sum(stages.values())
    return {
        "stages": stages,
        "messages": messages,
        "bytes": wire,
        "rows": rows,
        "samples": samples,
        "total_s": total,
        "vectors": vectors,
        "applied": applied,
    }


async def heartbeat_round(
    link: Link, vectors: Vectors, peers: Sequence[str], version: int = VERSION
) -> dict[str, Any]:
    """Every one of ``peers`` heartbeats once on the source (nothing else changes); the round that
    sends it: gossip's steady state, every peer row changed and none of its samples."""
    engine = link.engine
    link.clock.advance(link.cfg.interval_s or 30.0)
    beats = [PeerOnline(p, at=link.clock.now - 1) for p in peers]
    chunk = link.source.config.max_batch_events
    for start in range(0, len(beats), chunk):
        await link.source.record_batch(beats[start : start + chunk])
    result = await transfer(link, vectors, version)
    stages = result["stages"]
    print(
        f"[{engine}] heartbeat round, message version {version}: {result['rows']:,} rows with "
        f"{result['samples']:,} samples, {result['bytes']:,} bytes; stamp {stages['stamp']:.2f} s, "
        f"read {stages['read']:.2f} s, encode+sign {stages['encode']:.2f} s, "
        f"verify+decode {stages['decode']:.2f} s, merge {stages['merge']:.2f} s; "
        f"total {result['total_s']:.2f} s"
    )
    return result


#: Heartbeat resolutions compared in staggered rounds: off, a minute, and the most allowed with the
#: default peer_timeout (300 s).
RESOLUTIONS = (0.0, 60.0, 150.0)
STAGGERED_ROUNDS = 10  # a whole number of cycles of every resolution (2 and 5 rounds)


async def staggered_rounds(link: Link, vectors: Vectors, peers: Sequence[str], rounds: int) -> dict[str, Any]:
    """``rounds`` rounds in which every peer heartbeats every ``interval`` seconds at a phase of its
    own (spread evenly over the interval), each round then sent: what a swarm of real heartbeats
    looks like, where the rounds above beat all at one instant. Returns the sums over the rounds."""
    interval = link.cfg.interval_s or 30.0
    total = dict.fromkeys(("stamp", "read", "encode", "decode", "merge"), 0.0)
    carried = ingest = 0.0
    n = len(peers)
    for _ in range(rounds):
        link.clock.advance(interval)
        start = link.clock.now - interval
        beats = [PeerOnline(p, at=start + interval * (i + 1) / n) for i, p in enumerate(peers)]
        chunk = link.source.config.max_batch_events
        t = time.perf_counter()
        for first in range(0, n, chunk):
            await link.source.record_batch(beats[first : first + chunk])
        ingest += time.perf_counter() - t
        result = await transfer(link, vectors)
        vectors = result["vectors"]
        carried += result["rows"]
        for stage, seconds in result["stages"].items():
            total[stage] += seconds
    return {
        "rounds": rounds,
        "rows_per_round": carried / rounds,
        "stages_s_per_round": sum(total.values()) / rounds,
        **{f"{k}_s_per_round": v / rounds for k, v in total.items()},
        "ingest_s_per_round": ingest / rounds,
        "vectors": vectors,
    }


async def bench_delta(
    engine: str, n_peers: int, n_mappings: int, max_rows: int, scratch: Path
) -> dict[str, Any]:
    clock = ManualClock(T0)
    names = ("source", "target", "http")
    source_url, target_url, http_url = [await _database(engine, scratch, n) for n in names]
    # The HTTP pull sends message after message to one server: with small messages (--max-rows 5000,
    # the default's size) it outran the per-neighbour limit (5/s, bursts of 30) and got 429s. This
    # measures the transfer; the limiter has its own tests.
    cfg = GossipConfig(
        keys=(KEY,),
        max_rows=max_rows,
        stamp_chunk=min(500, max_rows - 1),
        max_bytes=256 * 2**20,
        max_messages_per_s=1000.0,
        message_burst=1000,
    )
    keyring = Keyring([KEY])
    try:
        source = await AvailabilityTracker.open(TrackerConfig(database_url=source_url, clock=clock))
        target = await AvailabilityTracker.open(TrackerConfig(database_url=target_url, clock=clock))
        started = time.perf_counter()
        await _populate(source, n_peers, n_mappings)
        print(
            f"[{engine}] populated {n_peers:,} peers, {n_mappings:,} mappings "
            f"in {time.perf_counter() - started:.1f} s"
        )

        link = Link(engine, source, target, cfg, keyring, clock)
        async with RawRows(target_url) as raw:
            full = await transfer(link, ({}, {}), raw=raw)
        stages, messages, wire, rows = full["stages"], full["messages"], full["bytes"], full["rows"]
        total = sum(stages.values())
        assert len(await target.list_peers(limit=10_000)) == min(n_peers, 10_000)
        baseline = raw.seconds

        # The steady state: every peer heartbeats once a round and nothing else changes. The same
        # round sent as message version 2 and as version 1 (every row with its samples, as gossip did
        # before samples_version), one after the other, to the same target. Version 1 goes second:
        # rows it brings record their own version as their samples version (it has none), so the next
        # version 2 row without samples would ask for one resend.
        vectors, rounds, peer_names = full["vectors"], {}, _peer_names(n_peers)
        for version in (VERSION, 1):
            rounds[version] = await heartbeat_round(link, vectors, peer_names, version)
            vectors = rounds[version]["vectors"]
            assert rounds[version]["applied"] == n_peers, rounds[version]["applied"]
        old_round, new_round = rounds[1], rounds[VERSION]
        print(
            f"[{engine}] heartbeat round without unchanged samples: {new_round['total_s']:.2f} s against "
            f"{old_round['total_s']:.2f} s with them ({new_round['total_s'] / old_round['total_s']:.2f}x), "
            f"{new_round['bytes'] / old_round['bytes']:.2f}x the bytes"
        )

        # Staggered heartbeats at each resolution: the source reopened with it, the same target.
        staggered: dict[str, Any] = {}
        for resolution in RESOLUTIONS:
            await source.close()
            source = await AvailabilityTracker.open(
                TrackerConfig(database_url=source_url, clock=clock, heartbeat_resolution_s=resolution)
            )
            link = Link(engine, source, target, cfg, keyring, clock)
            found = await staggered_rounds(link, vectors, peer_names, STAGGERED_ROUNDS)
            vectors = found.pop("vectors")
            staggered[f"{resolution:g}"] = found
            off = staggered["0"]
            print(
                f"[{engine}] staggered heartbeats, resolution {resolution:g} s: "
                f"{found['rows_per_round']:,.0f} rows and {found['stages_s_per_round']:.2f} s of stages "
                f"a round ({found['stages_s_per_round'] / off['stages_s_per_round']:.2f}x without), "
                f"ingest {found['ingest_s_per_round']:.2f} s a round"
            )

        # End to end over HTTP: a fresh tracker pulls everything from the source's server.
        app = create_app(source, gossip=GossipAgent(source, cfg))
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off", log_config=None)
        )
        serving = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        fresh = await AvailabilityTracker.open(TrackerConfig(database_url=http_url, clock=clock))
        puller = GossipAgent(fresh, cfg)
        t = time.perf_counter()
        pulled = 0
        while True:
            got = await puller.exchange(f"http://127.0.0.1:{port}")
            pulled += got
            if not got:
                break
        http_s = time.perf_counter() - t
        assert pulled == rows, f"the HTTP pull applied {pulled:,} of {rows:,} rows"
        server.should_exit = True
        await serving
        await puller.aclose()
        for tracker in (source, target, fresh):
            await tracker.close()
        result = {
            "engine": engine,
            "rows": rows,
            "messages": messages,
            "bytes": wire,
            "bytes_per_row": wire / rows,
            **{f"{k}_s": v for k, v in stages.items()},
            "total_s": total,
            "rows_per_s": rows / total,
            "raw_insert_s": baseline,
            "merge_over_raw": stages["merge"] / baseline,
            "http_s": http_s,
            "http_rows_applied": pulled,
            "http_over_stages": http_s / total,
            **{
                f"heartbeat_round_v{version}": {
                    "rows": r["rows"],
                    "samples": r["samples"],
                    "bytes": r["bytes"],
                    "messages": r["messages"],
                    **{f"{k}_s": v for k, v in r["stages"].items()},
                    "total_s": r["total_s"],
                }
                for version, r in rounds.items()
            },
            "heartbeat_round_over_v1": new_round["total_s"] / old_round["total_s"],
            "staggered_heartbeats": staggered,
        }
        print(
            f"[{engine}] delta of {rows:,} rows in {messages} messages, {wire:,} bytes "
            f"({wire / rows:.1f} B/row): stamp {stages['stamp']:.2f} s, read {stages['read']:.2f} s, "
            f"encode+sign {stages['encode']:.2f} s, verify+decode {stages['decode']:.2f} s, "
            f"merge {stages['merge']:.2f} s; total {total:.2f} s ({rows / total:,.0f} rows/s)"
        )
        print(
            f"[{engine}] baseline raw insert of the same rows {baseline:.2f} s: "
            f"merge/raw {stages['merge'] / baseline:.1f}x; "
            f"end to end over HTTP {http_s:.2f} s ({http_s / total:.2f}x the stages)"
        )
        return result
    finally:
        for url in (source_url, target_url, http_url):
            await drop_database(url)


class _Net:
    def __init__(self) -> None:
        self.agents: dict[str, GossipAgent] = {}

    async def __call__(
        self, url: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, bytes, dict[str, str]]:
        status, answer, answer_headers = await self.agents[url.removesuffix(GOSSIP_PATH)].handle(
            body, headers.get("Authorization")
        )
        return status, answer, {k.lower(): v for k, v in answer_headers.items()}


async def bench_convergence(n: int, scratch: Path, seed: int = 1) -> dict[str, Any]:
    clock = ManualClock(T0)
    net = _Net()
    names = [f"http://node{i:03d}" for i in range(n)]
    agents = []
    for i, name in enumerate(names):
        tracker = await AvailabilityTracker.open(
            TrackerConfig(
                database_url=f"sqlite+aiosqlite:///{scratch / f'conv{n}-{i}.db'}", clock=clock, pool_size=1
            )
        )
        await tracker.record_peer_online(f"peer-of-{i}")
        await tracker.record_content_available(f"cid-of-{i}", f"peer-of-{i}")
        agent = GossipAgent(
            tracker,
            GossipConfig(keys=(KEY,), fanout=3, neighbors=tuple(x for x in names if x != name)),
            transport=net,
            rng=random.Random(seed * 1000 + i),
        )
        net.agents[name] = agent
        agents.append(agent)
    started = time.perf_counter()
    rounds = 0
    try:
        while True:
            rounds += 1
            await asyncio.gather(*(a.round() for a in agents))
            counts = [await a.tracker.stats() for a in agents]
            if all(c.peers_total == n and c.mappings_available == n for c in counts):
                break
            if rounds > 50:
                raise RuntimeError("no convergence in 50 rounds")
        result = {
            "nodes": n,
            "rounds": rounds,
            "log2_n": math.log2(n),
            "rounds_over_log2_n": rounds / math.log2(n),
            "rows_sent": sum(a.stats.rows_sent for a in agents),
            "bytes_sent": sum(a.stats.bytes_sent for a in agents),
            "wall_s": time.perf_counter() - started,
        }
        print(
            f"[convergence] {n} nodes, fanout 3: {rounds} rounds (log2 n = {math.log2(n):.1f}, "
            f"ratio {rounds / math.log2(n):.2f}); {result['rows_sent']:,} rows and "
            f"{result['bytes_sent']:,} bytes sent in all; {result['wall_s']:.1f} s"
        )
        return result
    finally:
        for agent in agents:
            await agent.tracker.close()


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    engines = ["sqlite", "postgresql"] if args.engine == "all" else [args.engine]
    sizes: tuple[int, ...]
    peers, mappings, sizes = (1_000, 10_000, (8, 16)) if args.quick else (10_000, 100_000, (64, 256))
    peers = args.peers if args.peers is not None else peers
    mappings = args.mappings if args.mappings is not None else mappings
    if args.nodes is not None:
        sizes = tuple(int(n) for n in args.nodes.split(",") if n)
    results: dict[str, Any] = {"delta": [], "convergence": []}
    with tempfile.TemporaryDirectory(prefix="bench-gossip-") as tmp:
        scratch = Path(tmp)
        for engine in engines if not args.skip_delta else []:
            results["delta"].append(await bench_delta(engine, peers, mappings, args.max_rows, scratch))
        for n in sizes:
            results["convergence"].append(await bench_convergence(n, scratch))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 peers and 8/16 nodes (seconds)")
    parser.add_argument("--engine", choices=["sqlite", "postgresql", "all"], default="all")
    parser.add_argument("--max-rows", type=int, default=20_000, help="rows per message")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--peers", type=int, help="changed peers in the delta (default 10,000)")
    parser.add_argument("--mappings", type=int, help="changed mappings in the delta (default 100,000)")
    parser.add_argument(
        "--nodes", help="swarm sizes for the convergence simulation, e.g. 64,256 ('' for none)"
    )
    parser.add_argument("--skip-delta", action="store_true", help="only the convergence simulation")
    args = parser.parse_args()
    results = asyncio.run(main_async(args))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Load-balancing simulation: a swarm of downloaders driven through the real tracker, by strategy.

Run: ``python -m benchmarks.loadbalance [--quick] [--seed N] [--peers N] [--downloads N] [--json PATH]``.

A discrete-event simulation whose clock is the tracker's clock (``ManualClock``), on a real SQLite file,
one fresh database per strategy with the same swarm and the same arrivals:

- peers with heterogeneous upload capacity (fast / medium / slow tiers) and reliability (good / flaky /
  bad tiers, independent of speed), each holding some of the contents; a warm-up history gives every
  peer a reputation and a measured speed before the measured phase;
- downloaders arrive as a Poisson process and pick a content by Zipf popularity; each asks for ``n``
  peers and fetches one part of the content from each;
- a peer's capacity is shared equally among its concurrent transfers (processor sharing, so a
  peer every downloader picks becomes slow for all of them);
- a transfer fails, part-way through, with the peer's failure probability; the downloader reports every
  outcome and measured speed to the tracker (which closes the lease) and asks again for the failed part;
  a request that gets no peer (all at their cap) waits one simulated second and asks again.

Strategies: ``best`` and ``weighted`` (``select_best_peers``, leases and cap); ``naive``, the top ``n`` of
``get_content_availability`` (ranked by quality, no load awareness, no leases); ``random``, a uniform
sample of ``get_available_peers``. Reported: mean, p50 and p99 download completion time, transfer
failure rate, most concurrent transfers on one peer, and requests that had to wait. The run exits 1
unless both load-aware strategies beat naive and random on p99 completion time.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tracker import AvailabilityTracker, TrackerConfig
from tracker.events import Event, PeerOnline, SpeedSample, UploadOutcome
from tracker.testing import ManualClock

STRATEGIES = ("best", "weighted", "naive", "random")
MB = 1_000_000
# (share of peers, bytes/s) and (share of peers, failure probability per transfer)
SPEED_TIERS = ((0.2, 20 * MB), (0.5, 5 * MB), (0.3, 1 * MB))
RELIABILITY_TIERS = ((0.6, 0.02), (0.3, 0.15), (0.1, 0.5))
HEARTBEAT_S = 60.0
RETRY_S = 1.0


@dataclass(frozen=True)
class Scenario:
    """Everything that defines a run; two strategies given the same scenario see the same world."""

    peers: int = 300
    contents: int = 60
    holders: tuple[int, int] = (8, 30)
    downloads: int = 2000
    parts: int = 3
    part_bytes: int = 20 * MB
    load: float = 0.5  # offered load as a share of the swarm's total capacity
    zipf_s: float = 1.0
    seed: int = 7
    #: The tracker's lease TTL. A lease only counts as load until it lapses, so a TTL shorter than a
    #: transfer lets the tracker hand a busy peer out again (see docs/load-balancing.md).
    lease_ttl_s: float = 600.0


@dataclass
class Figures:
    """What one strategy achieved."""

    strategy: str
    downloads: int
    mean_s: float
    p50_s: float
    p99_s: float
    transfers: int
    failure_rate: float
    max_peer_load: int
    waits: int
    tracker_calls: int
    wall_s: float


@dataclass(frozen=True)
class Swarm:
    capacity: list[float]
    failure: list[float]
    holders: list[list[int]]
    popularity: list[float]


def _tiered(rng: random.Random, tiers: tuple[tuple[float, float], ...], count: int) -> list[float]:
    values: list[float] = []
    for share, value in tiers:
        values += [value] * round(share * count)
    values = (values + [tiers[-1][1]] * count)[:count]
    rng.shuffle(values)
    return values


def build_swarm(scenario: Scenario) -> Swarm:
    rng = random.Random(scenario.seed)
    low, high = scenario.holders
    holders = [rng.sample(range(scenario.peers), rng.randint(low, high)) for _ in range(scenario.contents)]
    weights = [1.0 / (rank + 1) ** scenario.zipf_s for rank in range(scenario.contents)]
    total = sum(weights)
    return Swarm(
        capacity=_tiered(rng, SPEED_TIERS, scenario.peers),
        failure=_tiered(rng, RELIABILITY_TIERS, scenario.peers),
        holders=holders,
        popularity=[w / total for w in weights],
    )


def peer_name(index: int) -> str:
    return f"peer-{index:04d}"


def content_name(index: int) -> str:
    return f"cid-{index:03d}"


@dataclass
class _Peer:
    """Processor sharing by virtual time: every active transfer has received ``attained`` bytes since
    the peer's virtual clock started; a transfer finishes when ``attained`` reaches its target."""

    capacity: float
    attained: float = 0.0
    updated_at: float = 0.0
    version: int = 0
    targets: list[tuple[float, int]] = field(default_factory=list)

    def advance(self, now: float) -> None:
        if self.targets:
            self.attained += self.capacity / len(self.targets) * (now - self.updated_at)
        self.updated_at = now

    def next_finish(self) -> float:
        target = self.targets[0][0]
        return self.updated_at + max(0.0, target - self.attained) * len(self.targets) / self.capacity


@dataclass
class _Transfer:
    download: int
    part: int
    peer: int
    started_at: float
    work: float
    fails: bool


@dataclass
class _Download:
    cid: int
    arrived_at: float
    parts_left: int


Select = Callable[[str, int], Awaitable[list[str]]]


async def simulate(scenario: Scenario, strategy: str, database: Path) -> Figures:
    """Run one strategy over the scenario on a fresh SQLite file at ``database``."""
    swarm = build_swarm(scenario)
    rng = random.Random(scenario.seed + 1)
    clock = ManualClock(1_800_000_000.0)
    config = TrackerConfig(
        database_url=f"sqlite+aiosqlite:///{database}",
        clock=clock,
        random_seed=scenario.seed,
        lease_ttl_s=scenario.lease_ttl_s,
    )
    wall_started = time.perf_counter()
    calls = 0
    async with AvailabilityTracker(config) as tracker:
        await _warm_up(tracker, clock, swarm, rng)
        select = _selector(tracker, strategy, rng)

        peers = [_Peer(capacity) for capacity in swarm.capacity]
        transfers: dict[int, _Transfer] = {}
        downloads: list[_Download] = []
        finish_heap: list[tuple[float, int, int]] = []  # (time, peer, version)
        retry_heap: list[tuple[float, int, int, int]] = []  # (time, seq, download, part)
        completion: list[float] = []
        transfers_started = failures = max_load = waits = 0
        next_id = 0

        def reschedule(index: int) -> None:
            peer = peers[index]
            peer.version += 1
            if peer.targets:
                heapq.heappush(finish_heap, (peer.next_finish(), index, peer.version))

        async def assign(now: float, download: int, wanted: list[int]) -> None:
            nonlocal calls, next_id, transfers_started, max_load, waits
            clock.now = now
            calls += 1
            chosen = await select(content_name(downloads[download].cid), len(wanted))
            for part, name in zip(wanted, chosen, strict=False):
                index = int(name.removeprefix("peer-"))
                peer = peers[index]
                peer.advance(now)
                fails = rng.random() < swarm.failure[index]
                work = scenario.part_bytes * (rng.uniform(0.1, 0.9) if fails else 1.0)
                next_id += 1
                transfers[next_id] = _Transfer(download, part, index, now, work, fails)
                heapq.heappush(peer.targets, (peer.attained + work, next_id))
                transfers_started += 1
                max_load = max(max_load, len(peer.targets))
                reschedule(index)
            for part in wanted[len(chosen) :]:
                waits += 1
                heapq.heappush(retry_heap, (now + RETRY_S, next_id, download, part))
                next_id += 1

        arrivals = _arrivals(scenario, swarm, rng)
        arrival_index = 0
        next_heartbeat = clock.now + HEARTBEAT_S
        while arrival_index < len(arrivals) or finish_heap or retry_heap:
            candidates = [
                (arrivals[arrival_index][0], 0) if arrival_index < len(arrivals) else (math.inf, 0),
                (finish_heap[0][0], 1) if finish_heap else (math.inf, 1),
                (retry_heap[0][0], 2) if retry_heap else (math.inf, 2),
            ]
            now, kind = min(candidates)
            while now >= next_heartbeat:  # peers keep reporting; none times out mid-run
                clock.now = next_heartbeat
                await tracker.record_batch([PeerOnline(peer_name(i)) for i in range(scenario.peers)])
                next_heartbeat += HEARTBEAT_S
            if kind == 0:
                _, content = arrivals[arrival_index]
                arrival_index += 1
                downloads.append(_Download(content, now, scenario.parts))
                await assign(now, len(downloads) - 1, list(range(scenario.parts)))
            elif kind == 2:
                _, _, retried, part = heapq.heappop(retry_heap)
                await assign(now, retried, [part])
            else:
                _, index, version = heapq.heappop(finish_heap)
                peer = peers[index]
                if version != peer.version:
                    continue  # a stale entry: this peer's schedule changed since
                peer.advance(now)
                _, transfer_id = heapq.heappop(peer.targets)
                reschedule(index)
                transfer = transfers.pop(transfer_id)
                clock.now = now
                download = downloads[transfer.download]
                cid = content_name(download.cid)
                elapsed = max(now - transfer.started_at, 1e-6)
                events: list[Event] = [
                    UploadOutcome(peer_name(index), not transfer.fails, cid=cid, bytes=round(transfer.work)),
                    SpeedSample(peer_name(index), round(transfer.work / elapsed)),
                ]
                calls += 1
                await tracker.record_batch(events)
                if transfer.fails:
                    failures += 1
                    await assign(now, transfer.download, [transfer.part])
                else:
                    download.parts_left -= 1
                    if download.parts_left == 0:
                        completion.append(now - download.arrived_at)
    completion.sort()
    return Figures(
        strategy=strategy,
        downloads=len(completion),
        mean_s=sum(completion) / len(completion),
        p50_s=completion[len(completion) // 2],
        p99_s=completion[min(len(completion) - 1, math.ceil(0.99 * len(completion)) - 1)],
        transfers=transfers_started,
        failure_rate=failures / transfers_started,
        max_peer_load=max_load,
        waits=waits,
        tracker_calls=calls,
        wall_s=time.perf_counter() - wall_started,
    )


def _arrivals(scenario: Scenario, swarm: Swarm, rng: random.Random) -> list[tuple[float, int]]:
    """Poisson arrivals at the rate that offers ``scenario.load`` of the swarm's total capacity."""
    bytes_per_download = scenario.parts * scenario.part_bytes
    rate = scenario.load * sum(swarm.capacity) / bytes_per_download
    now, arrivals = 1_800_000_000.0 + 1.0, []
    for _ in range(scenario.downloads):
        now += rng.expovariate(rate)
        arrivals.append((now, rng.choices(range(scenario.contents), weights=swarm.popularity)[0]))
    return arrivals


async def _warm_up(
    tracker: AvailabilityTracker, clock: ManualClock, swarm: Swarm, rng: random.Random
) -> None:
    """An hour of history before the measured phase: presence, speed, 20 outcomes per peer, mappings."""
    start = clock.now - 3600
    events: list[Event] = []
    for index, capacity in enumerate(swarm.capacity):
        name = peer_name(index)
        events.append(PeerOnline(name, at=start))
        events.append(SpeedSample(name, round(capacity), at=start + 1))
        for k in range(20):
            events.append(UploadOutcome(name, rng.random() >= swarm.failure[index], at=start + 10 + k))
        events.append(PeerOnline(name, at=clock.now))
    for cid, holders in enumerate(swarm.holders):
        events += [_available(content_name(cid), peer_name(index), clock.now) for index in holders]
    await tracker.record_batch(events)


def _available(cid: str, peer: str, at: float) -> Event:
    from tracker.events import ContentAvailable

    return ContentAvailable(cid, peer, at=at)


def _selector(tracker: AvailabilityTracker, strategy: str, rng: random.Random) -> Select:
    async def leased(cid: str, n: int) -> list[str]:
        return [peer.peer_id for peer in await tracker.select_best_peers(cid, n, strategy=strategy)]

    async def naive(cid: str, n: int) -> list[str]:
        availability = await tracker.get_content_availability(cid)
        return [] if availability is None else [peer.peer_id for peer in availability.peers[:n]]

    async def uniform(cid: str, n: int) -> list[str]:
        online = await tracker.get_available_peers(cid)
        return rng.sample(online, min(n, len(online)))

    return {"best": leased, "weighted": leased, "naive": naive, "random": uniform}[strategy]


def table(results: list[Figures]) -> str:
    """The results as Markdown, with each strategy's p99 relative to naive and random."""
    by_name = {r.strategy: r for r in results}
    lines = [
        "| strategy | mean s | p50 s | p99 s | p99 / naive | p99 / random | failure rate | max peer load "
        "| waits | tracker calls | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.strategy} | {r.mean_s:.1f} | {r.p50_s:.1f} | {r.p99_s:.1f} "
            f"| {r.p99_s / by_name['naive'].p99_s:.2f} | {r.p99_s / by_name['random'].p99_s:.2f} "
            f"| {r.failure_rate:.1%} | {r.max_peer_load} | {r.waits} | {r.tracker_calls:,} | {r.wall_s:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="A smaller swarm and fewer downloads (< 60 s).")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--peers", type=int)
    parser.add_argument("--downloads", type=int)
    parser.add_argument("--lease-ttl", type=float, help="The tracker's lease_ttl_s (default 600).")
    parser.add_argument("--load", type=float, help="Offered load, a share of total capacity (default 0.5).")
    parser.add_argument("--json", type=Path, help="Also write the figures to this file.")
    args = parser.parse_args()
    base = Scenario(peers=150, contents=40, downloads=400) if args.quick else Scenario()
    scenario = Scenario(
        **{
            **asdict(base),
            "seed": args.seed,
            **({"peers": args.peers} if args.peers else {}),
            **({"downloads": args.downloads} if args.downloads else {}),
            **({"lease_ttl_s": args.lease_ttl} if args.lease_ttl else {}),
            **({"load": args.load} if args.load else {}),
        }
    )
    print(f"scenario: {scenario}; machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    results = []
    with tempfile.TemporaryDirectory(prefix="tracker-lb-") as scratch:
        for strategy in STRATEGIES:
            results.append(asyncio.run(simulate(scenario, strategy, Path(scratch) / f"{strategy}.db")))
            print(f"  {strategy}: done in {results[-1].wall_s:.1f} s", flush=True)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    by_name = {r.strategy: r for r in results}
    losers = [
        f"{aware} p99 {by_name[aware].p99_s:.1f} s is not below {other} ({by_name[other].p99_s:.1f} s)"
        for aware in ("best", "weighted")
        for other in ("naive", "random")
        if by_name[aware].p99_s >= by_name[other].p99_s
    ]
    if losers:
        print("FAIL: " + "; ".join(losers))
        sys.exit(1)
    print("load-aware strategies beat naive top-N and uniform random on p99 completion time")


if __name__ == "__main__":
    main()

"""A seeded synthetic swarm with realistic skew, as the events a tracker would receive.

At the ``100k`` scale: 100,000 peers (20% offline), 10,000 contents whose popularity and number of
holders follow a Zipf law (s = 1, at most 2,000 holders: a tracker's answer for a hot content is bounded
by what a client asks for, not by the swarm; what the cap cuts off is spread over the tail), about
1,000,000 content-peer mappings, 10 bandwidth
samples per peer, and 5 upload outcomes per peer drawn from the peer's own reliability. ``1m``
multiplies peers, contents and mappings by ten.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass

from tracker.events import ContentAvailable, Event, PeerOffline, PeerOnline, SpeedSample, UploadOutcome

SCALES = {"quick": 5_000, "100k": 100_000, "1m": 1_000_000}
MAX_HOLDERS = 2_000


@dataclass
class Swarm:
    peers: list[str]
    offline: set[str]
    contents: list[str]
    holders: list[list[str]]  # per content index
    popularity: list[float]  # cumulative weights, for drawing contents to query
    reliability: dict[str, float]
    speed: dict[str, int]

    @property
    def mappings(self) -> int:
        return sum(len(h) for h in self.holders)

    def draw_content(self, rng: random.Random) -> str:
        return self.contents[bisect.bisect(self.popularity, rng.random() * self.popularity[-1])]


def generate(n_peers: int, seed: int = 42) -> Swarm:
    rng = random.Random(seed)
    peers = [f"peer-{i:07d}" for i in range(n_peers)]
    offline = set(rng.sample(peers, n_peers // 5))
    n_contents = max(10, n_peers // 10)
    contents = [f"cid-{i:07d}" for i in range(n_contents)]
    weights = [1.0 / (i + 1) for i in range(n_contents)]
    total = sum(weights)
    target = 10 * n_peers
    cap = min(MAX_HOLDERS, n_peers)
    # Zipf counts, capped; what the cap cuts off the head is spread over the tail in proportion, so
    # the swarm still holds ~10 mappings per peer.
    counts = [min(cap, max(1.0, target * w / total)) for w in weights]
    for _ in range(20):
        missing = target - sum(counts)
        free = sum(w for w, c in zip(weights, counts, strict=True) if c < cap)
        if missing < 1 or free == 0:
            break
        counts = [
            c if c >= cap else min(cap, c + missing * w / free) for w, c in zip(weights, counts, strict=True)
        ]
    holders = [rng.sample(peers, round(c)) for c in counts]
    reliability = {p: rng.choice((0.98, 0.98, 0.98, 0.9, 0.9, 0.6, 0.2)) for p in peers}
    speed = {p: rng.choice((500_000, 2_000_000, 5_000_000, 20_000_000)) for p in peers}
    return Swarm(
        peers=peers,
        offline=offline,
        contents=contents,
        holders=holders,
        popularity=list(itertools.accumulate(weights)),
        reliability=reliability,
        speed=speed,
    )


def event_count(swarm: Swarm) -> int:
    """How many events ``events`` yields for ``swarm``."""
    return 16 * len(swarm.peers) + swarm.mappings + len(swarm.offline)


def events(swarm: Swarm, t0: float, seed: int = 43) -> Iterator[Event]:
    """Every event that builds the swarm, in an order a tracker could see them, dated before ``t0``."""
    rng = random.Random(seed)
    for i, peer in enumerate(swarm.peers):
        at = t0 - 600 + (i % 500)
        yield PeerOnline(peer, at=at)
        for k in range(10):
            yield SpeedSample(peer, max(1, int(swarm.speed[peer] * rng.uniform(0.7, 1.3))), at=at + k)
        for k in range(5):
            yield UploadOutcome(peer, rng.random() < swarm.reliability[peer], at=at + 10 + k)
    for c, cid in enumerate(swarm.contents):
        for peer in swarm.holders[c]:
            yield ContentAvailable(cid, peer, at=t0 - 300)
    for peer in sorted(swarm.offline):
        yield PeerOffline(peer, at=t0 - 120)

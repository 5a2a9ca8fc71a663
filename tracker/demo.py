"""A synthetic swarm for ``tracker demo``: peers of mixed quality, the contents they hold, an hour of history.

Pure domain code: :func:`plan_swarm` turns a :class:`SwarmSpec` and an instant into a list of ordinary
tracker events, and :func:`load_swarm` feeds them through ``AvailabilityTracker.record_batch``, the same
write path real traffic takes. Everything random comes from one ``random.Random(seed)`` and every time is
an offset from ``now``, so a seed always yields the same swarm relative to the moment it is built.

>>> swarm = plan_swarm(SwarmSpec(peers=20, contents=30, holders=3, seed=7), now=1_800_000_000.0)
>>> (swarm.peers, swarm.contents, swarm.mappings)
(20, 30, 90)
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum

from .core import AvailabilityTracker
from .errors import InvalidInput
from .events import ContentAvailable, Event, PeerOffline, PeerOnline, SpeedSample, UploadOutcome

#: One transfer unit of the simulated CDN, the ``bytes`` of each upload outcome.
CHUNK_BYTES = 262_144
#: Share of peers whose last event is a goodbye, so the ranking has absent holders to skip.
OFFLINE_SHARE = 0.10
#: Heartbeat spacing in seconds; the maximum stays under the default 300 s ``peer_timeout`` so that a
#: session of heartbeats reads as one continuous session.
HEARTBEAT_GAP_S = (60.0, 240.0)

ProgressCallback = Callable[[int, int], None]
"""Called after each batch with (events applied so far, events in total)."""


class PeerKind(Enum):
    """The three behaviours the demo mixes, so rankings have something to separate."""

    RELIABLE = "reliable"
    FLAKY = "flaky"
    BAD = "bad"


@dataclass(frozen=True, slots=True)
class _Profile:
    """How one kind of peer behaves; each peer draws its own values from these ranges."""

    share: float
    success_p: tuple[float, float]
    median_bytes_per_sec: float
    #: When the peer first joined, as a fraction of the history before ``now``.
    joined: tuple[float, float]
    #: Chance of one silent outage longer than the peer timeout (a new session afterwards).
    outage_p: float


_PROFILES = {
    PeerKind.RELIABLE: _Profile(0.50, (0.95, 0.995), 6_000_000.0, (0.5, 1.0), 0.05),
    PeerKind.FLAKY: _Profile(0.35, (0.70, 0.92), 2_000_000.0, (0.1, 0.9), 0.6),
    PeerKind.BAD: _Profile(0.15, (0.10, 0.45), 400_000.0, (0.05, 0.8), 0.4),
}


@dataclass(frozen=True, kw_only=True)
class SwarmSpec:
    """The size and shape of a synthetic swarm; validated on construction like an event.

    >>> SwarmSpec(peers=3, holders=5)
    Traceback (most recent call last):
    ...
    tracker.errors.InvalidInput: holders (5) cannot exceed peers (3): each content needs distinct holders
    """

    peers: int = 1_000
    contents: int = 10_000
    #: Distinct holders of every content.
    holders: int = 5
    seed: int = 42
    #: How far back the history reaches from ``now``.
    history_s: float = 3600.0

    def __post_init__(self) -> None:
        for name, low in (("peers", 1), ("contents", 1), ("holders", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InvalidInput(f"{name} must be an integer >= {low}, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise InvalidInput(f"seed must be an integer, got {self.seed!r}")
        if self.holders > self.peers:
            raise InvalidInput(
                f"holders ({self.holders}) cannot exceed peers ({self.peers}): "
                "each content needs distinct holders"
            )
        if not math.isfinite(self.history_s) or self.history_s < 600.0:
            raise InvalidInput(f"history_s must be at least 600 seconds, got {self.history_s!r}")


@dataclass(frozen=True, slots=True)
class Swarm:
    """A planned swarm: its events in time order, and what they add up to."""

    events: list[Event]
    peers: int
    contents: int
    #: (content, holder) pairs announced.
    mappings: int
    #: Every content id, in creation order, so a caller can pick which to show.
    content_ids: list[str]


def peer_id(index: int, total: int) -> str:
    """``peer-0042``: zero-padded so ids sort in creation order (ties in the ranking break by id)."""
    return f"peer-{index:0{max(4, len(str(total - 1)))}d}"


def content_id(index: int, total: int) -> str:
    """``cid-00042``: zero-padded like :func:`peer_id`."""
    return f"cid-{index:0{max(5, len(str(total - 1)))}d}"


def plan_swarm(spec: SwarmSpec, now: float) -> Swarm:
    """Every event of the swarm's history before ``now``, oldest first.

    Each peer lives in one or two sessions of heartbeats no further apart than the peer timeout; its
    speed samples, upload outcomes and content announcements fall inside those sessions, so no event
    revives a peer that had timed out or said goodbye. Outcomes follow the peer's own success
    probability, speeds scatter around its own mean. ``OFFLINE_SHARE`` of the peers end with
    ``PeerOffline``; every other peer's last heartbeat is within a minute of ``now``.
    """
    rng = random.Random(spec.seed)
    kinds = list(_PROFILES)
    weights = [_PROFILES[k].share for k in kinds]
    leaving = set(rng.sample(range(spec.peers), round(spec.peers * OFFLINE_SHARE)))

    sessions: list[list[tuple[float, float]]] = []
    events: list[Event] = []
    for index in range(spec.peers):
        pid = peer_id(index, spec.peers)
        profile = _PROFILES[rng.choices(kinds, weights)[0]]
        peer_sessions = _sessions(rng, profile, now, spec.history_s, index in leaving)
        sessions.append(peer_sessions)
        for start, end in peer_sessions:
            events.extend(PeerOnline(pid, at=at) for at in _heartbeats(rng, start, end))
        success_p = rng.uniform(*profile.success_p)
        mean_bytes_per_sec = profile.median_bytes_per_sec * rng.lognormvariate(0.0, 0.5)
        for _ in range(rng.randint(3, 10)):
            speed = round(mean_bytes_per_sec * rng.uniform(0.6, 1.4))
            events.append(SpeedSample(pid, max(1, speed), at=_moment(rng, peer_sessions)))
        for _ in range(rng.randint(8, 30)):
            success = rng.random() < success_p
            at = _moment(rng, peer_sessions)
            events.append(UploadOutcome(pid, success, at=at, bytes=CHUNK_BYTES if success else None))
        if index in leaving:
            events.append(PeerOffline(pid, at=peer_sessions[-1][1] + 1.0))

    content_ids = [content_id(i, spec.contents) for i in range(spec.contents)]
    for cid in content_ids:
        for holder in rng.sample(range(spec.peers), spec.holders):
            at = _moment(rng, sessions[holder])
            events.append(ContentAvailable(cid, peer_id(holder, spec.peers), at=at))

    # Stable sort: a peer's goodbye, appended after its heartbeats, stays after them even on a tie.
    events.sort(key=lambda event: event.at or 0.0)
    return Swarm(
        events=events,
        peers=spec.peers,
        contents=spec.contents,
        mappings=spec.contents * spec.holders,
        content_ids=content_ids,
    )


def _sessions(
    rng: random.Random, profile: _Profile, now: float, history_s: float, leaves: bool
) -> list[tuple[float, float]]:
    """One or two (start, end) online intervals: joined some time ago, maybe one outage, maybe gone."""
    start = now - history_s * rng.uniform(*profile.joined)
    # The last heartbeat lands shortly before now, well within the peer timeout of a query made now.
    end = now - rng.uniform(5.0, 60.0)
    if leaves:
        end = start + (end - start) * rng.uniform(0.3, 0.9)
    if end - start > 1800.0 and rng.random() < profile.outage_p:
        outage_at = start + (end - start) * rng.uniform(0.2, 0.6)
        outage_s = rng.uniform(360.0, 900.0)  # longer than the 300 s timeout: the session really ends
        return [(start, outage_at), (outage_at + outage_s, end)]
    return [(start, end)]


def _heartbeats(rng: random.Random, start: float, end: float) -> list[float]:
    """Heartbeat times from ``start`` to exactly ``end``, spaced within ``HEARTBEAT_GAP_S``."""
    times = []
    at = start
    while at < end:
        times.append(at)
        at += rng.uniform(*HEARTBEAT_GAP_S)
    times.append(end)
    return times


def _moment(rng: random.Random, sessions: list[tuple[float, float]]) -> float:
    """A uniformly random instant inside one of ``sessions`` (longer sessions are likelier)."""
    start, end = rng.choices(sessions, [b - a for a, b in sessions])[0]
    return rng.uniform(start, end)


async def load_swarm(
    tracker: AvailabilityTracker,
    swarm: Swarm,
    *,
    batch_size: int = 5_000,
    on_progress: ProgressCallback | None = None,
) -> int:
    """Apply the swarm's events in order, ``batch_size`` per transaction; returns the events applied.

    Batches keep each transaction (and the SQLite write lock) short and let a caller show progress;
    the order is preserved across batches, so presence and sessions come out as if replayed live.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInput(f"batch_size must be an integer >= 1, got {batch_size!r}")
    size = min(batch_size, tracker.config.max_batch_events)
    applied = 0
    total = len(swarm.events)
    for batch in _batches(swarm.events, size, tracker.config.max_events_per_peer):
        applied += await tracker.record_batch(batch)
        if on_progress is not None:
            on_progress(applied, total)
    return applied


def _batches(events: Sequence[Event], size: int, per_peer: int) -> Iterator[Sequence[Event]]:
    """``events`` in order, cut every ``size`` and before a peer's ``per_peer``-th event in one batch
    (``max_events_per_peer``: a peer announcing more contents than that in one batch was refused,
    QA round 58)."""
    start, counts = 0, Counter[str]()
    for index, event in enumerate(events):
        if index - start >= size or counts[event.peer_id] >= per_peer:
            yield events[start:index]
            start, counts = index, Counter()
        counts[event.peer_id] += 1
    if start < len(events):
        yield events[start:]

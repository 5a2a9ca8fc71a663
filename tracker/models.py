"""Frozen value types the tracker returns. No SQLAlchemy here: these are what users hold on to."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from . import reputation as rep

_LATEST = datetime.max.replace(tzinfo=UTC)
_EARLIEST = datetime.min.replace(tzinfo=UTC)


def from_unix(seconds: float | None) -> datetime | None:
    """Unix seconds (the storage format) as an aware UTC datetime.

    Every write path refuses times out of range, but the tables are open to operators' SQL: a value
    beyond what ``datetime`` holds (year 1..9999) reads as its limit, and NaN as unknown, rather
    than failing every read that touches the row.
    """
    if seconds is None or seconds != seconds:
        return None
    try:
        return datetime.fromtimestamp(seconds, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return _LATEST if seconds > 0 else _EARLIEST


@dataclass(frozen=True, kw_only=True)
class PeerMetrics:
    """Everything the tracker knows about one peer, merged over every origin tracker.

    ``success_weight``/``failure_weight`` are the decayed evidence behind the score (see
    docs/reputation.md). Built by hand without them, the lifetime counts stand in as the evidence:

    >>> PeerMetrics(chunks_served=100, chunks_failed=10, uptime=timedelta(hours=1)).is_reliable()
    True
    """

    peer_id: str = ""
    uptime: timedelta = timedelta(0)
    last_seen: datetime | None = None
    first_seen: datetime | None = None
    online_since: datetime | None = None
    #: Rolling mean of the latest ``bandwidth_window`` samples, bytes per second, rounded to the
    #: nearest integer (half to even, Python's ``round``: means of 1.5 and 2.5 both show as 2; the
    #: ``peer_scores`` view keeps the exact mean).
    download_speed: int = 0
    chunks_served: int = 0
    chunks_failed: int = 0
    online: bool = False
    success_weight: float | None = None
    failure_weight: float | None = None
    #: The score as the database computed it; left ``None``, it is computed from the fields above.
    reputation_score: float | None = None
    reliable_threshold: float = 0.8
    params: rep.ReputationParams = field(default=rep.DEFAULT_PARAMS, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.reputation_score is None:
            object.__setattr__(self, "reputation_score", self.calculate_reputation())

    @property
    def evidence(self) -> tuple[float, float]:
        """(successes, failures) as the reputation formula sees them."""
        if self.success_weight is None or self.failure_weight is None:
            return float(self.chunks_served), float(self.chunks_failed)
        return self.success_weight, self.failure_weight

    def calculate_reputation(self) -> float:
        """Success rate x uptime factor in [0, 1]; the Python twin of the tracker's SQL."""
        successes, failures = self.evidence
        return rep.reputation(successes, failures, self.uptime.total_seconds(), self.params)

    def is_reliable(self) -> bool:
        """Whether the score is above the reliable threshold (0.8 by default).

        The score this object carries, as ``reputation_score`` and the ``peer_scores`` view say it:
        recomputed from ``uptime`` (a ``timedelta``, whole microseconds), a score a hair above the
        threshold came out below it, and the API answered ``reputation`` 0.8000000000043797 with
        ``reliable: false`` (QA round 63)."""
        score = self.reputation_score if self.reputation_score is not None else self.calculate_reputation()
        return score > self.reliable_threshold

    @property
    def is_proven(self) -> bool:
        """Whether there are enough lifetime outcomes for a low score to exclude this peer from selection."""
        return rep.is_proven(self.chunks_served, self.chunks_failed, self.params)


@dataclass(frozen=True, kw_only=True)
class PeerInfo:
    """One ranked candidate, with the parts of its score so a caller can see why it was chosen."""

    peer_id: str
    reputation: float
    download_speed: int
    rank: int = 0
    success_rate: float = 0.0
    uptime_factor: float = 0.0
    evidence: float = 0.0
    proven: bool = False
    last_seen: datetime | None = None
    #: Open leases (downloads handed out and not yet reported) when this peer was ranked.
    load: int = 0
    #: The most leases this peer may carry now (lower for a newcomer in slow start).
    capacity: int = 0


@dataclass(frozen=True, kw_only=True)
class ContentAvailability:
    """Who can serve a content right now."""

    cid: str
    #: Online holders, best first.
    peers: tuple[PeerInfo, ...]
    #: Number of online holders.
    replication_factor: int
    #: Latest announcement, confirmation or removal of this content by any peer.
    last_updated: datetime | None


@dataclass(frozen=True, kw_only=True)
class TrackerStats:
    """Database-wide counts, for operators (``tracker stats``, ``GET /v1/stats``, ``/metrics``)."""

    #: This tracker's stable node id (the origin of its own observations in gossip).
    node_key: str
    #: Peers the database holds: online, offline and departed ones until they are forgotten
    #: (``peer_retention_s``), and a forgotten one until the tombstones of its mappings go (a week
    #: more), when ``list_peers`` and ``get_peer_metrics`` no longer show it.
    peers_total: int
    #: Peers online by the documented rule (``get_peer_metrics(...).online``): some origin holds
    #: them online (no goodbye since) and saw them within ``peer_timeout``.
    peers_online: int
    contents_total: int
    #: (content, peer) mappings currently available (tombstones excluded).
    mappings_available: int
    #: Leases handed out by selection, neither closed by an outcome nor expired.
    open_leases: int

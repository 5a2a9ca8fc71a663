"""The events every write path shares: API calls, ``record_batch``, HTTP and gossip.

Each event validates itself on construction, so an invalid event cannot exist and the database is never
touched by one. ``at`` is Unix seconds (UTC); ``None`` means "when the tracker applies it".

>>> SpeedSample("peer-a", 2_000_000, at=1_700_000_000.0).bytes_per_sec
2000000
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .errors import InvalidInput

MAX_ID_LENGTH = 256
MAX_BYTES_PER_SEC = 10**12
MAX_TRANSFER_BYTES = 10**15
# C0 and C1 controls, DEL, and lone surrogates (which no database can store as UTF-8).
FORBIDDEN_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def validate_id(value: object, what: str = "peer_id") -> str:
    """Return ``value`` if it is a usable peer or content id, else raise ``InvalidInput``."""
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be a string, got {type(value).__name__}")
    if not value:
        raise InvalidInput(f"{what} must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidInput(f"{what} is {len(value)} characters long; the limit is {MAX_ID_LENGTH}")
    bad = FORBIDDEN_CHARACTERS.search(value)
    if bad:
        kind = "a lone surrogate" if bad.group() >= "\ud800" else "control character"
        raise InvalidInput(f"{what} contains {kind} {bad.group()!r} at position {bad.start()}")
    return value


def validate_count(value: object, what: str, maximum: int) -> int:
    """Return ``value`` if it is an integer within ``0..maximum``, else raise ``InvalidInput``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{what} must be an integer, got {value!r}")
    if not 0 <= value <= maximum:
        raise InvalidInput(f"{what} must be within 0..{maximum}, got {value}")
    return value


def validate_time(value: object, what: str = "at") -> float | None:
    """Return ``value`` as float seconds if it is a usable Unix time (or ``None``)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"{what} must be Unix seconds (a number), got {value!r}")
    try:
        seconds = float(value)
    except OverflowError:  # an int too large for a float
        raise InvalidInput(f"{what} is out of range for a Unix time, got {value!r}") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidInput(f"{what} must be a finite, non-negative Unix time, got {value!r}")
    return seconds


@dataclass(frozen=True, slots=True)
class _PresenceEvent:
    peer_id: str
    at: float | None = None

    def __post_init__(self) -> None:
        validate_id(self.peer_id)
        object.__setattr__(self, "at", validate_time(self.at))


@dataclass(frozen=True, slots=True)
class PeerOnline(_PresenceEvent):
    """The peer announced itself or sent a heartbeat."""


@dataclass(frozen=True, slots=True)
class PeerOffline(_PresenceEvent):
    """The peer said goodbye; its session closes at ``at``."""


@dataclass(frozen=True, slots=True)
class SpeedSample:
    """A download from the peer ran at ``bytes_per_sec``."""

    peer_id: str
    bytes_per_sec: int
    at: float | None = None

    def __post_init__(self) -> None:
        validate_id(self.peer_id)
        validate_count(self.bytes_per_sec, "bytes_per_sec", MAX_BYTES_PER_SEC)
        object.__setattr__(self, "at", validate_time(self.at))


@dataclass(frozen=True, slots=True)
class UploadOutcome:
    """The peer served a chunk (``success``) or failed to; optionally which content and how many bytes."""

    peer_id: str
    success: bool
    at: float | None = None
    cid: str | None = None
    bytes: int | None = None

    def __post_init__(self) -> None:
        validate_id(self.peer_id)
        if not isinstance(self.success, bool):
            raise InvalidInput(f"success must be True or False, got {self.success!r}")
        object.__setattr__(self, "at", validate_time(self.at))
        if self.cid is not None:
            validate_id(self.cid, "cid")
        if self.bytes is not None:
            validate_count(self.bytes, "bytes", MAX_TRANSFER_BYTES)


@dataclass(frozen=True, slots=True)
class _MappingEvent:
    cid: str
    peer_id: str
    at: float | None = None

    def __post_init__(self) -> None:
        validate_id(self.cid, "cid")
        validate_id(self.peer_id)
        object.__setattr__(self, "at", validate_time(self.at))


@dataclass(frozen=True, slots=True)
class ContentAvailable(_MappingEvent):
    """The peer holds content ``cid`` and can serve it."""


@dataclass(frozen=True, slots=True)
class ContentUnavailable(_MappingEvent):
    """The peer no longer holds content ``cid``."""


Event = PeerOnline | PeerOffline | SpeedSample | UploadOutcome | ContentAvailable | ContentUnavailable
EVENT_TYPES: tuple[type, ...] = (
    PeerOnline,
    PeerOffline,
    SpeedSample,
    UploadOutcome,
    ContentAvailable,
    ContentUnavailable,
)

#: The peer's own sightings: one right after the peer's sighting at the same time changes nothing
#: of its ``peer_stats`` row, so the write path writes one row for them and ``check_events_per_peer``
#: counts them once (the two must agree).
SIGHTINGS = (PeerOnline, ContentAvailable, ContentUnavailable)


def wire_name(event: Event) -> str:
    """The event's name as the HTTP API spells its ``type`` (``PeerOnline`` -> ``peer_online``): one
    name in every error, whichever way the event came (QA round 40: dates named the class, ids the
    wire name, in one batch's errors)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(event).__name__).lower()


def check_events_per_peer(events: Sequence[Event], limit: int) -> int:
    """The most events of one peer in ``events``, refused above ``limit`` (``max_events_per_peer``).

    A peer's events are applied one after another (its row upserted once per event, in a statement
    of its own on Postgres), so their number, not the batch's, bounds a transaction's length: one
    request of 50,000 heartbeats of one peer held every write of the process for 32 s on Postgres,
    cost growing faster than the count (QA round 57); 50,000 events of distinct peers took 1.2 s.
    Sightings (online, announcements) right after the peer's sighting at the same time count once:
    one row does for them."""
    counts: dict[str, int] = {}
    last: dict[str, float | None] = {}  # each peer's last sighting's time, while its last event
    most = 0
    for index, event in enumerate(events):
        peer = event.peer_id
        if isinstance(event, SIGHTINGS):
            # A catalog of 5,000 contents announced in one request is one round, not 5,000.
            if peer in last and last[peer] == event.at:
                continue
            last[peer] = event.at
        else:
            last.pop(peer, None)
        count = counts[peer] = counts.get(peer, 0) + 1
        if count > limit:
            raise InvalidInput(
                f"event #{index} ({wire_name(event)}) is event number {count} of peer {event.peer_id!r} "
                f"in this batch; a batch holds at most {limit} events of one peer "
                "(max_events_per_peer): send the rest in later batches"
            )
        most = max(most, count)
    return most


def check_batch(
    events: Iterable[object], *, limit: int, now: float, max_skew_s: float, max_age_s: float
) -> list[Event]:
    """Materialize and check a batch; the error names the offending event's index and why.

    Events validate themselves, so this checks what they cannot: that each item is an event, that the
    batch is not too large, that no time lies further in the future than the allowed clock skew
    (such an event would keep a peer "online" long after it left), nor further in the past than
    ``max_age_s`` (``TrackerConfig.max_event_age_s``).
    """
    batch: Sequence[object] = events if isinstance(events, Sequence) else list(events)
    if len(batch) > limit:
        raise InvalidInput(f"batch has {len(batch)} events; the limit is {limit}")
    checked: list[Event] = []
    for index, item in enumerate(batch):
        if not isinstance(item, EVENT_TYPES):
            raise InvalidInput(f"event #{index} is a {type(item).__name__}, not a tracker event")
        event: Event = item  # type: ignore[assignment]
        if event.at is not None and event.at > now + max_skew_s:
            raise InvalidInput(
                f"event #{index} ({wire_name(event)}) is dated {event.at - now:.6g} s in the future; "
                f"the allowed clock skew is {max_skew_s:g} s"
            )
        if event.at is not None and event.at < now - max_age_s:
            raise InvalidInput(
                f"event #{index} ({wire_name(event)}) is dated {now - event.at:.6g} s ago; events "
                f"older than {max_age_s:g} s are refused (max_event_age_s)"
            )
        checked.append(event)
    return checked

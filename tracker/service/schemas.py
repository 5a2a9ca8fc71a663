"""Request and response bodies of the HTTP API, as pydantic models (they are the OpenAPI schema).

Requests are checked twice on purpose: pydantic rejects wrong types and shapes with a precise location,
then every body becomes a ``tracker.events`` event, whose own validation is the single authority on
what the database may receive (the same rules as the library and gossip).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi.exceptions import RequestValidationError
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SkipValidation,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic_core import InitErrorDetails

from .. import events as ev
from .. import reputation as rep
from ..core import AvailabilityTracker
from ..errors import InvalidInput
from ..models import ContentAvailability, PeerInfo, PeerMetrics, TrackerStats, from_unix

#: What an id may hold, for the schema's readers (the events check it, with their own messages):
#: no C0/C1 control character or DEL (a lone surrogate neither, which a pattern cannot say).
ID_PATTERN = "^[^\\u0000-\\u001f\\u007f-\\u009f]*$"
#: The schema of an id in a path or a query, where FastAPI's own checks would answer in other words.
ID_SCHEMA: dict[str, Any] = {"minLength": 1, "maxLength": ev.MAX_ID_LENGTH, "pattern": ID_PATTERN}


_ID_LIMITS: dict[str, Any] = {
    "min_length": 1,
    "max_length": ev.MAX_ID_LENGTH,
    "json_schema_extra": {"pattern": ID_PATTERN},
}
Id = Annotated[str, Field(examples=["peer-42"], **_ID_LIMITS)]
Cid = Annotated[str, Field(examples=["bafy-cid-1"], **_ID_LIMITS)]
UnixTime = Annotated[
    float | None,
    Field(
        ge=0,
        allow_inf_nan=False,
        description=(
            "When it happened, Unix seconds UTC; omitted means when the tracker receives it. Refused "
            "when more than max_clock_skew_s (60 s by default) ahead of the tracker's clock or more "
            "than max_event_age_s (7 days by default) behind it."
        ),
    ),
]


class _Body(BaseModel):
    # Unknown fields are rejected so a typo ("bytes_per_second") is an error, not a silent default.
    model_config = ConfigDict(extra="forbid", strict=True)


class PeerEventIn(_Body):
    """A peer came online, sent a heartbeat or left."""

    peer_id: Id
    at: UnixTime = None


class SpeedIn(_Body):
    """A download from ``peer_id`` ran at ``bytes_per_sec``."""

    peer_id: Id
    bytes_per_sec: Annotated[
        int, Field(ge=0, le=ev.MAX_BYTES_PER_SEC, description="A JSON integer: 5000000, not 5000000.0.")
    ]
    at: UnixTime = None


class OutcomeIn(_Body):
    """``peer_id`` served a chunk (``success``) or failed to; closes its oldest open lease."""

    peer_id: Id
    success: bool
    cid: Cid | None = None
    bytes: Annotated[
        int | None, Field(ge=0, le=ev.MAX_TRANSFER_BYTES, description="A JSON integer, like every count.")
    ] = None
    at: UnixTime = None


class MappingIn(_Body):
    """``peer_id`` holds (or no longer holds) content ``cid``."""

    cid: Cid
    peer_id: Id
    at: UnixTime = None


class PeerOnlineItem(PeerEventIn):
    type: Literal["peer_online"]


class PeerOfflineItem(PeerEventIn):
    type: Literal["peer_offline"]


class SpeedItem(SpeedIn):
    type: Literal["speed_sample"]


class OutcomeItem(OutcomeIn):
    type: Literal["upload_outcome"]


class AvailableItem(MappingIn):
    type: Literal["content_available"]


class UnavailableItem(MappingIn):
    type: Literal["content_unavailable"]


BatchItem = Annotated[
    PeerOnlineItem | PeerOfflineItem | SpeedItem | OutcomeItem | AvailableItem | UnavailableItem,
    Field(discriminator="type"),
]


class BatchIn(_Body):
    """Events applied in one transaction, all or nothing."""

    # Described as a list of items, checked by ``batch_items`` a slice at a time: validated whole,
    # 50,000 items held the event loop for 0.2-0.4 s (pydantic holds the interpreter lock, so a
    # thread would not free the loop either).
    events: Annotated[list[BatchItem], SkipValidation]

    @model_validator(mode="wrap")
    @classmethod
    def _items_beside_other_errors(cls, data: Any, handler: Any) -> Any:
        """When the body fails for another reason (an unknown field), its events' errors are listed
        too, as before they were skipped here: ``batch_items`` never runs then (QA round 9)."""
        try:
            return handler(data)
        except ValidationError as error:
            events = data.get("events") if isinstance(data, dict) else None
            if not isinstance(events, list):
                raise
            listed: list[InitErrorDetails] = []
            # Up to the first errors of the first items: listed whole, a million bad items made a
            # 140 MB answer (QA round 21); this runs on the event loop, so it stops early too.
            for start in range(0, min(len(events), ITEMS_CHECKED_BESIDE), ITEMS_PER_TURN):
                try:
                    _ITEMS.validate_python(events[start : start + ITEMS_PER_TURN])
                except ValidationError as items:
                    listed += _details(items, ("events",), start)
                    if len(listed) > MOST_ERRORS:
                        break
            if not listed:
                raise
            details = _details(error, ()) + listed[: MOST_ERRORS + 1]  # the body's own first
            raise ValidationError.from_exception_data(error.title, details) from None


_ITEMS: TypeAdapter[list[BatchItem]] = TypeAdapter(list[BatchItem])


def _details(error: ValidationError, prefix: tuple[str, ...], offset: int = 0) -> list[InitErrorDetails]:
    """``error``'s details under ``prefix``; ``offset``: the index of the slice's first item."""
    details = []
    for found in error.errors():
        loc = found["loc"]
        if offset:
            loc = (int(loc[0]) + offset, *loc[1:])
        detail = InitErrorDetails(type=found["type"], loc=(*prefix, *loc), input=found["input"])
        if "ctx" in found:
            detail["ctx"] = found["ctx"]
        details.append(detail)
    return details


#: Items validated between two turns of the event loop: ~5-10 ms of pydantic's time.
ITEMS_PER_TURN = 1_000
#: The most errors an answer lists (beyond them it says ``details_truncated``): every error listed,
#: a 2 MB body of a million bad items took 1.5 GB and a 140 MB answer (QA round 21).
MOST_ERRORS = 100
#: How many items are checked, when the body failed for another reason, to list their errors too.
ITEMS_CHECKED_BESIDE = 5 * ITEMS_PER_TURN  # on the loop, in one go: ~25-50 ms


async def batch_items(raw: object, limit: int) -> list[BatchItem]:
    """``BatchIn.events`` validated as FastAPI would have, with the same error locations, in slices
    of ``ITEMS_PER_TURN`` between which the event loop serves other requests; more than ``limit``
    items (``max_batch_events``) are refused before any is checked."""
    if isinstance(raw, list) and len(raw) > limit:
        raise InvalidInput(f"batch has {len(raw)} events; the limit is {limit}")
    if not isinstance(raw, list):  # JSON gives no other sequence: this raises the list error
        try:
            _ITEMS.validate_python(raw)
        except ValidationError as error:
            raise RequestValidationError(
                [{**found, "loc": ("body", "events", *found["loc"])} for found in error.errors()]
            ) from None
        raise AssertionError(f"events of type {type(raw).__name__} passed as a list")
    items: list[BatchItem] = []
    errors: list[dict[str, Any]] = []
    for start in range(0, len(raw), ITEMS_PER_TURN):
        if start:
            await asyncio.sleep(0)
        try:
            items += _ITEMS.validate_python(raw[start : start + ITEMS_PER_TURN])
        except ValidationError as error:
            for found in error.errors():
                index, *rest = found["loc"]
                errors.append({**found, "loc": ("body", "events", start + int(index), *rest)})
            if len(errors) > MOST_ERRORS:  # enough to say so; the handler lists MOST_ERRORS
                break
    if errors:
        raise RequestValidationError(errors)
    return items


def to_event(item: BatchItem) -> ev.Event:
    """The library event for one validated batch item (its constructor re-validates)."""
    match item:
        case PeerOnlineItem():
            return ev.PeerOnline(item.peer_id, at=item.at)
        case PeerOfflineItem():
            return ev.PeerOffline(item.peer_id, at=item.at)
        case SpeedItem():
            return ev.SpeedSample(item.peer_id, item.bytes_per_sec, at=item.at)
        case OutcomeItem():
            return ev.UploadOutcome(item.peer_id, item.success, at=item.at, cid=item.cid, bytes=item.bytes)
        case AvailableItem():
            return ev.ContentAvailable(item.cid, item.peer_id, at=item.at)
        case UnavailableItem():
            return ev.ContentUnavailable(item.cid, item.peer_id, at=item.at)
    raise AssertionError(f"unhandled batch item {item!r}")


def to_events(items: Sequence[BatchItem]) -> list[ev.Event]:
    """The batch's events; an event's own refusal (a control character in an id) names its index,
    as the library's batch check does: it did not, in a batch of 50,000 (QA round 21)."""
    events = []
    for index, item in enumerate(items):
        try:
            events.append(to_event(item))
        except InvalidInput as error:
            raise InvalidInput(f"event #{index} ({item.type}): {error}") from None
    return events


# -- responses ------------------------------------------------------------------------------------


class Applied(BaseModel):
    """How many events were committed; the response is sent only after the commit."""

    applied: int


class PeerScore(BaseModel):
    """One ranked candidate, with every part of its score, so an operator can see why it was chosen."""

    rank: int
    peer_id: str
    reputation: float = Field(description="success_rate x uptime_factor, 0..1")
    success_rate: float = Field(description="Decayed Beta(1,1) estimate of successful uploads, 0..1")
    uptime_factor: float = Field(description="0.8..1, grows with accumulated uptime")
    download_bytes_per_sec: int = Field(description="Rolling mean of the latest speed samples")
    evidence: float = Field(description="Decayed outcomes behind success_rate")
    proven: bool = Field(description="Enough outcomes for a low score to exclude the peer")
    load: int = Field(description="Open leases (downloads handed out, not yet reported)")
    capacity: int = Field(description="Most leases the peer may carry now (lower during slow start)")
    last_seen: datetime | None

    @classmethod
    def of(cls, peer: PeerInfo) -> PeerScore:
        return cls(
            rank=peer.rank,
            peer_id=peer.peer_id,
            reputation=peer.reputation,
            success_rate=peer.success_rate,
            uptime_factor=peer.uptime_factor,
            download_bytes_per_sec=peer.download_speed,
            evidence=peer.evidence,
            proven=peer.proven,
            load=peer.load,
            capacity=peer.capacity,
            last_seen=peer.last_seen,
        )


class BestPeers(BaseModel):
    """The answer to "which peers should I download ``cid`` from": each one now carries a lease."""

    cid: str
    strategy: str
    lease_ttl_s: float
    peers: list[PeerScore]


class Availability(BaseModel):
    """Every online holder of a content, ranked (reliable or not)."""

    cid: str
    replication_factor: int
    last_updated: datetime | None
    peers: list[PeerScore]

    @classmethod
    def of(cls, availability: ContentAvailability) -> Availability:
        return cls(
            cid=availability.cid,
            replication_factor=availability.replication_factor,
            last_updated=availability.last_updated,
            peers=[PeerScore.of(peer) for peer in availability.peers],
        )


class PeerOut(BaseModel):
    """What the tracker knows about one peer, merged over every origin, with the parts of its score."""

    peer_id: str
    online: bool
    reputation: float
    reliable: bool
    proven: bool
    success_rate: float
    uptime_factor: float
    uptime_s: float
    download_bytes_per_sec: int
    chunks_served: int
    chunks_failed: int
    last_seen: datetime | None
    first_seen: datetime | None
    online_since: datetime | None

    @classmethod
    def of(cls, metrics: PeerMetrics) -> PeerOut:
        successes, failures = metrics.evidence
        return cls(
            peer_id=metrics.peer_id,
            online=metrics.online,
            reputation=metrics.reputation_score or 0.0,
            reliable=metrics.is_reliable(),
            proven=metrics.is_proven,
            success_rate=rep.success_rate(successes, failures, metrics.params),
            uptime_factor=rep.uptime_factor(metrics.uptime.total_seconds(), metrics.params),
            uptime_s=metrics.uptime.total_seconds(),
            download_bytes_per_sec=metrics.download_speed,
            chunks_served=metrics.chunks_served,
            chunks_failed=metrics.chunks_failed,
            last_seen=metrics.last_seen,
            first_seen=metrics.first_seen,
            online_since=metrics.online_since,
        )


class ErrorDetail(BaseModel):
    code: str = Field(examples=["invalid_input"])
    message: str
    request_id: str | None = None
    details: list[dict[str, object]] | None = None
    #: Set when there were more errors than ``details`` lists (at most 100).
    details_truncated: bool | None = None


class ErrorOut(BaseModel):
    """Every 4xx/5xx body: a stable machine-readable code and a sentence that says what is wrong."""

    error: ErrorDetail


class Health(BaseModel):
    status: str
    detail: str | None = None


class PeerPage(BaseModel):
    """One page of peers; pass ``next_after`` as ``after`` for the next page (``null``: last page)."""

    peers: list[PeerOut]
    next_after: str | None


class StatsOut(BaseModel):
    """Counts from the database plus this process's ingest and sweeper counters."""

    #: This tracker's origin key (``tracker_nodes.node_key``; ``node_id`` columns hold its row id).
    node_key: str
    peers_total: int
    peers_online: int
    contents_total: int
    mappings_available: int
    open_leases: int
    ingest_requests: int
    ingest_events: int
    ingest_transactions: int
    sweeps: int
    sweep_failures: int
    last_sweep_at: datetime | None

    @classmethod
    def of(cls, stats: TrackerStats, tracker: AvailabilityTracker) -> StatsOut:
        ingest, sweeps = tracker.ingest_stats, tracker.sweeper_state
        return cls(
            node_key=stats.node_key,
            peers_total=stats.peers_total,
            peers_online=stats.peers_online,
            contents_total=stats.contents_total,
            mappings_available=stats.mappings_available,
            open_leases=stats.open_leases,
            ingest_requests=ingest.requests,
            ingest_events=ingest.events,
            ingest_transactions=ingest.transactions,
            sweeps=sweeps.passes,
            sweep_failures=sweeps.failures,
            last_sweep_at=None if sweeps.last_report is None else from_unix(sweeps.last_report.now),
        )

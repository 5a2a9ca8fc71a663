"""The endpoints: each one validates its body, calls one library method, and shapes the answer.

Writes answer only after their events are committed (group commit), so a 200 means durable. Writes
and selections (``/best`` grants leases: it fills peers' load) need the bearer token when one is
configured; reads and probes never do.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures at definition time, and
# their Query limits refer to `settings`, a local of build_router.
import hmac
import sqlite3
import time
from collections import Counter
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from .. import events as ev
from .. import migrations
from ..config import STRATEGIES
from ..core import AvailabilityTracker
from ..errors import SchemaOutOfDate, TrackerError, is_disconnect, sqlstate_of
from ..offload import off_loop
from .bodies import CappedJsonRoute
from .metrics import ServiceMetrics
from .schemas import (
    ID_SCHEMA,
    Applied,
    Availability,
    BatchIn,
    BestPeers,
    ErrorOut,
    Health,
    MappingIn,
    OutcomeIn,
    PeerEventIn,
    PeerOut,
    PeerPage,
    PeerScore,
    SpeedIn,
    StatsOut,
    batch_items,
    to_events,
)
from .settings import ServiceSettings

_bearer = HTTPBearer(auto_error=False, description="The service's api_token, when one is configured.")

# The dependencies below are coroutines although none awaits: FastAPI runs a plain function
# dependency in a worker thread, four thread hops a request, and up to 40 threads (QA round 17).


async def _tracker(request: Request) -> AvailabilityTracker:
    tracker: AvailabilityTracker = request.app.state.tracker
    return tracker


async def _metrics(request: Request) -> ServiceMetrics:
    metrics: ServiceMetrics = request.app.state.metrics
    return metrics


Tracker = Annotated[AvailabilityTracker, Depends(_tracker)]
Metrics = Annotated[ServiceMetrics, Depends(_metrics)]
CidPath = Annotated[str, Path(json_schema_extra=ID_SCHEMA)]


def token_accepted(request: Request) -> bool:
    """Whether the request may change state: no token is configured, or it carries the right one.

    Read from the header directly, not from FastAPI's dependency, so the error handlers can ask it
    too: a body that fails to parse is answered before any dependency runs, and an unauthenticated
    caller must learn it lacks the token, not how its body was wrong.
    """
    return token_matches(request.headers.get("authorization"), request.app.state.settings.api_token)


def token_matches(authorization: str | None, expected: str | None) -> bool:
    """Whether an ``Authorization`` header value carries ``expected`` (always, when it is ``None``)."""
    if expected is None:
        return True
    scheme, _, offered = (authorization or "").partition(" ")
    # Constant-time comparison: the token must not leak through response timing.
    return scheme.lower() == "bearer" and hmac.compare_digest(offered.strip().encode(), expected.encode())


async def _require_token(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    # ``credentials`` puts the bearer scheme into the OpenAPI schema; the check reads the header.
    if not token_accepted(request):
        raise HTTPException(status_code=401, detail=UNAUTHORIZED)


UNAUTHORIZED = "a valid bearer token is required for writes and selections"


async def _only_known_query(request: Request) -> None:
    """Refuse query parameters the route does not declare: FastAPI ignores them, so a typo
    (``?nn=3``) would silently answer with the defaults. Probes take none and ignore any: a load
    balancer or scraper that adds a cache-buster must not see a live process as failing."""
    route = request.scope.get("route")
    if "probes" in getattr(route, "tags", ()):
        return
    known: set[str] = set()
    pending = [getattr(route, "dependant", None)]
    while pending:  # the route's own parameters and those of its dependencies
        dependant = pending.pop()
        if dependant is not None:
            known.update(param.alias for param in dependant.query_params)
            pending.extend(dependant.dependencies)
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        raise RequestValidationError(
            [{"loc": ("query", unknown[0]), "msg": "unknown query parameter", "type": "extra_forbidden"}]
        )


def needs_token(request: Request) -> bool:
    """Whether the matched route is one that changes state (it depends on the token check)."""
    return route_needs_token(request.scope.get("route"))


def route_needs_token(route: object) -> bool:
    return any(d.dependency is _require_token for d in getattr(route, "dependencies", ()))


def build_router(settings: ServiceSettings) -> APIRouter:
    """All routes; limits that come from settings (largest n, page size) are bound here."""
    router = APIRouter(dependencies=[Depends(_only_known_query)])
    writes = APIRouter(
        prefix="/v1",
        tags=["events"],
        dependencies=[Depends(_require_token)],
        responses=_errors(400, 401, 413, 415, 422, 429, 503),
        route_class=CappedJsonRoute,
    )
    reads = APIRouter(
        prefix="/v1", tags=["queries"], responses=_errors(422, 429, 503), route_class=CappedJsonRoute
    )

    async def commit(
        tracker: AvailabilityTracker, metrics: ServiceMetrics, events: list[ev.Event]
    ) -> Applied:
        applied = await tracker.record_batch(events)
        # Once per kind: once per event, a batch of 50,000 spent ~0.3 s in the client's locks.
        for kind, count in Counter(_KINDS[type(event)] for event in events).items():
            metrics.events_ingested.labels(kind=kind).inc(count)
        return Applied(applied=applied)

    @writes.post("/peers/online", summary="A peer announced itself")
    async def peer_online(body: PeerEventIn, tracker: Tracker, metrics: Metrics) -> Applied:
        return await commit(tracker, metrics, [ev.PeerOnline(body.peer_id, at=body.at)])

    @writes.post("/peers/heartbeat", summary="A peer is still there (same effect as online)")
    async def heartbeat(body: PeerEventIn, tracker: Tracker, metrics: Metrics) -> Applied:
        return await commit(tracker, metrics, [ev.PeerOnline(body.peer_id, at=body.at)])

    @writes.post("/peers/offline", summary="A peer left; its session's uptime is added")
    async def peer_offline(body: PeerEventIn, tracker: Tracker, metrics: Metrics) -> Applied:
        return await commit(tracker, metrics, [ev.PeerOffline(body.peer_id, at=body.at)])

    @writes.post("/peers/speed", summary="A download from a peer ran at some speed")
    async def speed(body: SpeedIn, tracker: Tracker, metrics: Metrics) -> Applied:
        return await commit(tracker, metrics, [ev.SpeedSample(body.peer_id, body.bytes_per_sec, at=body.at)])

    @writes.post("/peers/outcomes", summary="A peer served a chunk or failed to (closes its oldest lease)")
    async def outcome(body: OutcomeIn, tracker: Tracker, metrics: Metrics) -> Applied:
        event = ev.UploadOutcome(body.peer_id, body.success, at=body.at, cid=body.cid, bytes=body.bytes)
        return await commit(tracker, metrics, [event])

    @writes.post("/content/available", summary="A peer holds a content")
    async def available(body: MappingIn, tracker: Tracker, metrics: Metrics) -> Applied:
        return await commit(tracker, metrics, [ev.ContentAvailable(body.cid, body.peer_id, at=body.at)])

    @writes.post("/content/unavailable", summary="A peer dropped a content")
    async def unavailable(body: MappingIn, tracker: Tracker, metrics: Metrics) -> Applied:
        return await commit(tracker, metrics, [ev.ContentUnavailable(body.cid, body.peer_id, at=body.at)])

    @writes.post("/events", summary="Many events in one transaction, all or nothing")
    async def batch(body: BatchIn, tracker: Tracker, metrics: Metrics) -> Applied:
        items = await batch_items(body.events, tracker.config.max_batch_events)
        return await commit(tracker, metrics, await off_loop(len(items), to_events, items))

    @reads.get("/peers", summary="Peers in id order, a page at a time")
    async def list_peers(
        tracker: Tracker,
        online: Annotated[bool, Query(description="Only peers online now.")] = False,
        limit: Annotated[int, Query(ge=1, le=settings.max_page_size)] = min(100, settings.max_page_size),
        after: Annotated[
            str | None,
            Query(
                max_length=ev.MAX_ID_LENGTH,
                description="Last peer_id of the previous page.",
                json_schema_extra=ID_SCHEMA,
            ),
        ] = None,
    ) -> PeerPage:
        peers = await tracker.list_peers(online_only=online, limit=limit, after=after)
        items = [PeerOut.of(peer) for peer in peers]
        return PeerPage(peers=items, next_after=items[-1].peer_id if len(items) == limit else None)

    @reads.get(
        "/peers/{peer_id:path}",
        summary="One peer's metrics and the parts of its score",
        responses=_errors(404),
    )
    async def peer(peer_id: Annotated[str, Path(json_schema_extra=ID_SCHEMA)], tracker: Tracker) -> PeerOut:
        metrics = await tracker.get_peer_metrics(peer_id)
        if metrics is None:
            raise HTTPException(status_code=404, detail=f"no peer {peer_id!r} is known")
        return PeerOut.of(metrics)

    # Registered before /content/{cid}: a path parameter would otherwise swallow the "/best" suffix.
    @reads.get(
        "/content/{cid:path}/best",
        summary="The best n peers to download a content from now (grants their leases)",
        dependencies=[Depends(_require_token)],
        responses=_errors(401),
    )
    async def best(
        cid: CidPath,
        tracker: Tracker,
        metrics: Metrics,
        n: Annotated[int, Query(ge=1, le=settings.max_best_n)] = 3,
        strategy: Annotated[
            str | None, Query(pattern="^(" + "|".join(STRATEGIES) + ")$", description="Default: config.")
        ] = None,
    ) -> BestPeers:
        chosen = strategy or tracker.config.selection_strategy
        started = time.perf_counter()
        peers = await tracker.select_best_peers(cid, n, strategy=chosen)
        metrics.selection_seconds.labels(strategy=chosen).observe(time.perf_counter() - started)
        if not peers:
            metrics.selection_empty.inc()
        return BestPeers(
            cid=cid,
            strategy=chosen,
            lease_ttl_s=tracker.config.lease_ttl_s,
            peers=[PeerScore.of(peer) for peer in peers],
        )

    @reads.get(
        "/content/{cid:path}", summary="Every online holder of a content, ranked", responses=_errors(404)
    )
    async def content(
        cid: CidPath,
        tracker: Tracker,
        limit: Annotated[
            int,
            Query(
                ge=1, le=settings.max_page_size, description="The best this many holders; all are counted."
            ),
        ] = settings.max_page_size,
    ) -> Availability:
        availability = await tracker.get_content_availability(cid, limit=limit)
        if availability is None:
            raise HTTPException(status_code=404, detail=f"no content {cid!r} is known")
        return Availability.of(availability)

    @reads.get("/stats", summary="Counts of peers, contents, mappings and leases; ingest and sweeper state")
    async def stats(tracker: Tracker) -> StatsOut:
        return StatsOut.of(await tracker.stats(), tracker)

    @router.get("/healthz", tags=["probes"], summary="The process is alive")
    async def healthz() -> Health:
        return Health(status="ok")

    @router.get(
        "/readyz",
        tags=["probes"],
        summary="The database answers and its schema is at head",
        responses={200: {"model": Health}, 503: {"model": Health, "description": "Not ready, and why"}},
    )
    async def readyz(tracker: Tracker) -> JSONResponse:
        try:
            async with tracker.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            current, head = await migrations.current_revision(tracker.engine), migrations.head_revision()
        except SchemaOutOfDate as error:  # reachable, with tables no revision dates (QA round 62)
            return JSONResponse(Health(status="unavailable", detail=str(error)).model_dump(), status_code=503)
        except (SQLAlchemyError, OSError, TrackerError) as error:
            detail = f"database unreachable: {_why_unreachable(error)}"
            return JSONResponse(Health(status="unavailable", detail=detail).model_dump(), status_code=503)
        if current != head:
            ahead = migrations.unknown_revision_problem(current)  # a newer tracker migrated it
            detail = ahead or f"schema at {current or 'none'}, this tracker needs {head}"
            return JSONResponse(Health(status="unavailable", detail=detail).model_dump(), status_code=503)
        return JSONResponse(Health(status="ready").model_dump())

    # HEAD as well (load balancers and uptime checkers often probe with it); one OpenAPI entry each.
    for path, probe in (("/healthz", healthz), ("/readyz", readyz)):
        router.add_api_route(path, probe, methods=["HEAD"], include_in_schema=False)

    @router.get(
        "/metrics",
        tags=["probes"],
        summary="Prometheus metrics",
        response_class=Response,
        responses={
            200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}, "description": "Text format"},
            **_errors(429),
        },
    )
    async def metrics_endpoint(metrics: Metrics) -> Response:
        await metrics.refresh_database_gauges()
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    router.include_router(writes)
    router.include_router(reads)
    return router


def _why_unreachable(error: BaseException) -> str:
    """A reason an operator can act on, for an unauthenticated probe: what kind of failure, never
    the server's own words (they name databases, roles and hosts). "DBAPIError" alone said nothing
    of a database that no longer existed (QA round 16); the tracker's log has the full error."""
    state = sqlstate_of(error)
    orig = error.orig if isinstance(error, DBAPIError) else error
    if state == "3D000":
        why = "the database does not exist"
    elif state is not None and state.startswith("28"):
        why = "the server refused this tracker's credentials"
    elif state == "53300":
        why = "the server has no connection free (too many clients)"
    elif state is not None and state.startswith("57P"):
        why = "the server is shutting down or starting"
    elif isinstance(orig, TimeoutError):
        why = "the server did not answer in time"
    elif isinstance(orig, sqlite3.Error):
        why = str(orig).splitlines()[0] if str(orig) else "the SQLite file cannot be used"
    elif is_disconnect(error):
        why = "cannot connect to the server, or the connection was lost"
    else:
        why = "the database failed"
    return f"{why} ({type(orig).__name__})"


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses a group of routes can answer (all share ``ErrorOut``)."""
    return {status: {"model": ErrorOut, "description": _ERROR_MEANINGS[status]} for status in statuses}


_ERROR_MEANINGS = {
    400: "Body is not parseable (not UTF-8, not JSON)",
    415: "Body sent without Content-Type: application/json",
    401: "Missing or wrong bearer token",
    404: "Unknown peer or content",
    413: "Request body over max_body_bytes",
    422: "Invalid request or input",
    429: "Too many requests on this connection (rate_limit_per_s); retry after Retry-After seconds",
    503: "Database busy or unavailable; retry",
}

_KINDS: dict[type, str] = {
    ev.PeerOnline: "peer_online",
    ev.PeerOffline: "peer_offline",
    ev.SpeedSample: "speed_sample",
    ev.UploadOutcome: "upload_outcome",
    ev.ContentAvailable: "content_available",
    ev.ContentUnavailable: "content_unavailable",
}

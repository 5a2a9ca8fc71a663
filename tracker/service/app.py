"""The ASGI app factory: routes, error mapping, request ids, body limits and request metrics.

``create_app`` takes an *open* tracker and never opens or closes it: the caller (``tracker serve``, a
test, an embedder) owns the tracker's lifetime, so the app stays a thin shell over the library and
shutting the server down never races the database.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from urllib.parse import quote, unquote_to_bytes

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..core import AvailabilityTracker
from ..errors import (
    CommitOutcomeUnknown,
    InvalidInput,
    StorageError,
    TrackerClosed,
    TrackerError,
    TransientStorageError,
    describe,
)
from ..events import FORBIDDEN_CHARACTERS
from ..gossip import limits as gossip_limits
from ..gossip.agent import GOSSIP_PATH, GossipAgent
from ..ratelimit import TokenBuckets
from .bodies import TooManyKeys
from .metrics import ServiceMetrics
from .routes import UNAUTHORIZED, build_router, needs_token, route_needs_token, token_accepted, token_matches
from .schemas import MOST_ERRORS, ErrorOut
from .settings import ServiceSettings, is_loopback

log = logging.getLogger("tracker.service")
access_log = logging.getLogger("tracker.access")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_UNLIMITED = frozenset({"/healthz", "/readyz"})
#: Asked every few seconds by orchestrators and scrapers: their successes are logged at DEBUG, or
#: they made most of the INFO access lines (QA round 16: ~28 lines/s per process).
_PROBES = frozenset({"/healthz", "/readyz", "/metrics"})
#: Their successes at DEBUG: the probes, and neighbours' gossip, a third of the access log of a mesh
#: gossiping every few seconds (QA round 24); /metrics counts exchanges, the agent logs refusals.
_QUIET = _PROBES | {GOSSIP_PATH}
#: Methods counted under their own name in the request metrics; any other is "other": a label
#: per method a client made up grew /metrics without bound (QA round 21: 6,000 series from 3,000 requests).
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "body_timeout",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "invalid_input",
    429: "rate_limited",
}


def create_app(
    tracker: AvailabilityTracker,
    settings: ServiceSettings | None = None,
    gossip: GossipAgent | None = None,
    *,
    rate_clock: Callable[[], float] | None = None,
    loopback_hosts_only: bool = False,
) -> FastAPI:
    """The HTTP API over an open ``tracker``; see docs/api.md for the flows and ``/docs`` for the schema.

    With a ``gossip`` agent, ``POST /v1/gossip`` takes its neighbours' signed messages (docs/gossip.md).
    Each connection is rate-limited (``rate_limit_per_s``; ``rate_clock`` is injectable for tests).
    ``loopback_hosts_only``: answer only requests whose ``Host`` names this machine (``tracker
    serve`` without a token: ``_RequestGate``).
    """
    settings = settings or ServiceSettings()
    app = FastAPI(
        title="peer-tracker",
        version=__version__,
        summary="Which peers of a P2P CDN are online, how good they are, and whom to download from.",
        # A path with a trailing slash is not one of ours: redirected, it got a 307 to a Location
        # built from the client's Host header (QA round 21); docs/api.md promises a 404.
        redirect_slashes=False,
    )
    app.state.tracker = tracker
    app.state.settings = settings
    app.state.metrics = ServiceMetrics(tracker, gossip)
    app.state.gossip = gossip
    app.include_router(build_router(settings))
    _add_gossip_route(app, gossip)
    _install_error_handlers(app)
    # Outermost: ids and limits apply to every request, including those that fail validation.
    limiter = (
        TokenBuckets(settings.rate_limit_per_s, settings.rate_limit_burst, clock=rate_clock or time.monotonic)
        if settings.rate_limit_per_s > 0
        else None
    )
    app.add_middleware(
        _RequestGate,
        max_body_bytes=settings.max_body_bytes,
        metrics=app.state.metrics,
        limiter=limiter,
        routes=app.router.routes,
        api_token=settings.api_token,
        loopback_hosts_only=loopback_hosts_only,
        body_timeout_s=settings.body_timeout_s,
        access_log=settings.access_log,
    )
    return app


def _add_gossip_route(app: FastAPI, gossip: GossipAgent | None) -> None:
    """The one endpoint that takes raw bytes: the body is signed as sent, so it is read, not parsed.

    Authenticated by its HMAC signature rather than the bearer token: neighbours share the gossip key.
    """

    @app.post(
        "/v1/gossip",
        tags=["gossip"],
        summary="Exchange gossip with a neighbour tracker (signed, gzip-compressed JSON)",
        responses={
            200: {"content": {"application/gzip": {}}},
            **{status: {"model": ErrorOut, "description": why} for status, why in _GOSSIP_REFUSALS.items()},
        },
        include_in_schema=gossip is not None,
    )
    async def gossip_exchange(request: Request) -> Response:
        if gossip is None:
            return error_response(request, 404, "gossip_disabled", "gossip is not enabled on this tracker")
        # Read no more than the gossip limit (4 MiB) and one byte: past it the message is refused
        # anyway, and the service's own limit (8 MiB) let a sender have twice that read (QA round 68).
        sent, whole = await _read_at_most(request, gossip.config.max_bytes)
        status, body, headers = await gossip.handle(
            sent,
            request.headers.get("authorization"),
            address=_client(request.scope),
            max_bytes=request.headers.get(gossip_limits.HEADER),
        )
        if status != 200:
            detail = json.loads(body)
            refusal = error_response(request, status, f"gossip_{detail['reason']}", detail["error"])
            refusal.headers[gossip_limits.HEADER] = headers[gossip_limits.HEADER]
            if not whole:  # the rest of the body is never read
                refusal.headers["Connection"] = "close"
            return refusal
        return Response(body, status_code=200, headers=headers)


async def _read_at_most(request: Request, limit: int) -> tuple[bytes, bool]:
    """The body and ``True``; or, when it is longer than ``limit``, its first ``limit`` + 1 bytes and
    ``False``, the rest left unread."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return b"".join(chunks)[: limit + 1], False
    return b"".join(chunks), True


#: What a neighbour's message can be refused with (docs/gossip.md has each reason).
_GOSSIP_REFUSALS = {
    400: "Malformed, sent by this tracker itself, another format version, or sent_at out of range",
    401: "Unsigned, or a signature that does not verify",
    409: "A replay: this nonce was already received",
    413: "Over max_bytes, or inflating beyond 20x that",
    429: "Too many messages from this node (or on this connection)",
}


def _read_as_json(content_type: str | None) -> bool:
    """Whether FastAPI parsed the body as JSON: ``application/json`` or
    ``application/<anything>+json``, parameters aside, in any case (with no Content-Type at all it
    does not: ``strict_content_type``, its default). Anything else reaches the models as bytes;
    "json" anywhere in the header was taken for JSON, and ``text/json`` got a 422 about a
    dictionary instead of the 415 (QA round 11)."""
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    main, _, sub = media.partition("/")
    return main == "application" and (sub == "json" or sub.endswith("+json"))


def _client(scope: Scope) -> str | None:
    """The connecting address, ``host:port``, for logs (``None`` where the server gives none)."""
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else None


def error_response(
    request: Request | None,
    status: int,
    code: str,
    message: str,
    *,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """The one shape of every error body: ``{"error": {"code", "message", "request_id", ...}}``."""
    request_id = None if request is None else request.scope.get("request_id")
    body: dict[str, Any] = {"code": code, "message": message, "request_id": request_id}
    body.update(extra)
    headers = dict(headers or {})
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if status == 503:
        headers["Retry-After"] = "1"
    if request is not None:
        request.app.state.metrics.requests_rejected.labels(code=code).inc()
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    async def invalid_input(request: Request, error: Exception) -> JSONResponse:
        return error_response(request, 422, "invalid_input", str(error))

    async def invalid_request(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        # Who may ask comes before what was asked (FastAPI parses the body before any dependency).
        if needs_token(request) and not token_accepted(request):
            return error_response(request, 401, "unauthorized", UNAUTHORIZED)
        # Echoing "input" back could return a megabyte string; location and reason are what helps.
        # Listed up to MOST_ERRORS: 200,000 unknown keys made an 18 MB answer (QA round 21).
        details = [
            {"loc": list(item.get("loc", ())), "msg": item.get("msg", ""), "type": item.get("type", "")}
            for item in error.errors()
        ]
        unparsed = next((d for d in details if d["type"] == "json_invalid"), None)
        if unparsed is not None:
            at = unparsed["loc"][-1] if unparsed["loc"] else "?"
            return error_response(
                request, 400, "bad_request", f"the body is not valid JSON ({unparsed['msg']} at byte {at})"
            )
        if not _read_as_json(request.headers.get("content-type")) and any(
            d["loc"][:1] == ["body"] for d in details
        ):
            return error_response(
                request,
                415,
                "unsupported_media_type",
                "send the body as JSON, with the header Content-Type: application/json",
            )
        first = details[0] if details else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(part) for part in first["loc"])
        listed: dict[str, Any] = {"details": details[:MOST_ERRORS]}
        if len(details) > MOST_ERRORS:
            listed["details_truncated"] = True
        return error_response(
            request,
            422,
            "invalid_request",
            f"{where}: {first['msg']}" if where else str(first["msg"]),
            **listed,
        )

    async def http_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, StarletteHTTPException)
        code = _STATUS_CODES.get(error.status_code, f"http_{error.status_code}")
        # Starlette's own headers, a 405's Allow above all (RFC 9110; QA round 21 found it dropped).
        headers = dict(error.headers or {})
        message = _unparsed_body(error) or _routing_sentence(request, error, headers) or str(error.detail)
        return error_response(request, error.status_code, code, message, headers=headers)

    async def busy(request: Request, error: Exception) -> JSONResponse:
        log.warning(
            "storage busy: %s", describe(error), extra={"request_id": request.scope.get("request_id")}
        )
        return error_response(request, 503, "storage_busy", "the database is busy; retry shortly")

    async def storage(request: Request, error: Exception) -> JSONResponse:
        log.error("storage error: %s", describe(error), extra={"request_id": request.scope.get("request_id")})
        advice = error.advice if isinstance(error, TrackerError) else None
        said = "the database is unavailable; retry later" if advice is None else f"database error: {advice}"
        return error_response(request, 503, "storage_unavailable", said)

    async def unknown(request: Request, error: Exception) -> JSONResponse:
        log.error(
            "commit outcome unknown: %s",
            describe(error),
            extra={"request_id": request.scope.get("request_id")},
        )
        assert isinstance(error, CommitOutcomeUnknown)
        # On SQLite only a forced shutdown gets here, and no connection failed (QA round 16).
        why = (
            "the tracker was shut down (forced) while this write was being committed"
            if error.abandoned
            else "the database connection failed while committing and the outcome could not be checked"
        )
        message = (
            f"{why}: the events may have been applied; "
            "resending upload outcomes or speed samples may count them twice"
        )
        return error_response(request, 503, "commit_unknown", message)

    async def closed(request: Request, error: Exception) -> JSONResponse:
        return error_response(request, 503, "shutting_down", "the tracker is shutting down")

    app.add_exception_handler(InvalidInput, invalid_input)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(TransientStorageError, busy)
    app.add_exception_handler(StorageError, storage)
    app.add_exception_handler(CommitOutcomeUnknown, unknown)
    app.add_exception_handler(TrackerClosed, closed)


def _routing_sentence(request: Request, error: StarletteHTTPException, headers: dict[str, str]) -> str | None:
    """Starlette's routing answers "Not Found" / "Method Not Allowed" alone; the message says what
    was asked and where to look, as every other error does (QA round 56)."""
    asked = f"{request.method} {request.url.path}"
    if error.status_code == 404 and error.detail == "Not Found":
        return f"no route {asked}: the API's routes are listed at /docs and /openapi.json"
    if error.status_code == 405 and error.detail == "Method Not Allowed":
        allowed = headers.get("Allow") or headers.get("allow")
        return f"{request.method} is not allowed on {request.url.path}" + (
            f"; allowed: {allowed}" if allowed else ""
        )
    return None


def _unparsed_body(error: StarletteHTTPException) -> str | None:
    """What FastAPI's "There was an error parsing the body" stood for: it says the same for bytes that
    are not text and for a number too long to convert (QA round 21); the cause tells them apart."""
    cause = error.__cause__
    if error.status_code != 400 or cause is None:
        return None
    if isinstance(cause, TooManyKeys):
        return str(cause)
    if isinstance(cause, UnicodeDecodeError):
        return f"the body is not valid UTF-8 (nor UTF-16/32) text: byte {cause.start} cannot be decoded"
    if isinstance(cause, ValueError) and "integer string conversion" in str(cause):
        return "the body holds a number of more than 4,300 digits"
    return f"the body could not be parsed as JSON ({type(cause).__name__})"


class _BodyStalled(StarletteHTTPException):
    """Raised from ``receive`` when a body goes ``body_timeout_s`` without a byte (as ``_BodyTooLarge``)."""

    def __init__(self, timeout_s: float) -> None:
        message = f"the request body sent nothing for {timeout_s:g} s (body_timeout_s)"
        super().__init__(408, message, headers={"Connection": "close"})  # the rest is never read


class _BodyTooLarge(StarletteHTTPException):
    """Raised from ``receive``: FastAPI re-raises HTTP exceptions met while reading a body, so the
    app's own handler answers it, in the same error shape as every other error."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the limit of {limit} bytes")


def _leaves(routes: Sequence[BaseRoute]) -> Iterator[BaseRoute]:
    """The routes themselves: FastAPI (0.16x) keeps an included router as one entry that matches
    every path under it, with the router's own routes in ``original_router``."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _leaves(inner.routes)
        else:
            yield route


class _RequestGate:
    """Pure ASGI middleware: request id, body-size limit, one access-log line and request metrics.

    Pure ASGI (not ``BaseHTTPMiddleware``) so a streamed body is counted as it arrives and an
    oversized one is refused before it is buffered, whatever ``Content-Length`` claimed. (FastAPI's own
    ``max_body_size`` answers in plain text, outside our error shape, request ids and metrics.)
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        metrics: ServiceMetrics,
        limiter: TokenBuckets | None,
        routes: Sequence[BaseRoute],
        api_token: str | None,
        loopback_hosts_only: bool,
        body_timeout_s: float,
        access_log: bool = True,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.limiter = limiter
        self.routes = routes
        self.api_token = api_token
        self.loopback_hosts_only = loopback_hosts_only
        self.body_timeout_s = body_timeout_s
        self.access_log = access_log

    def _route(self, scope: Scope) -> BaseRoute | None:
        """The route the request was matched to, or before routing the one it is meant for."""
        route: BaseRoute | None = scope.get("route")
        if route is None:
            for candidate in _leaves(self.routes):
                if candidate.matches(scope)[0] is not Match.NONE:
                    return candidate
        return route

    def _template(self, scope: Scope) -> str:
        """The route template for the metrics: the matched route's, or for a request refused before
        routing (429, 413, a bad path) the route it was meant for, so a throttled route shows."""
        return str(getattr(self._route(scope), "path", "unmatched"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        offered = headers.get("x-request-id", "")
        request_id = offered if _REQUEST_ID.fullmatch(offered) else uuid.uuid4().hex
        scope["request_id"] = request_id
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        received, body_done = 0, False

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if body_done:  # past the body, receive() waits for a disconnect as long as a response runs
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout_s)
            except TimeoutError:
                raise _BodyStalled(self.body_timeout_s) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise _BodyTooLarge(self.max_body_bytes)
                body_done = not message.get("more_body", False)
            else:
                body_done = True
            return message

        try:
            # One bucket per connection (client address and port); probes are never limited.
            if self.limiter is not None and _app_path(scope) not in _UNLIMITED:
                wait = self.limiter.take(tuple(scope.get("client") or ("?", 0)))
                if wait > 0:
                    message = "too many requests on this connection; retry after the Retry-After seconds"
                    retry = {"Retry-After": str(max(1, math.ceil(wait)))}
                    await self._reject(scope, send_with_id, 429, "rate_limited", message, retry)
                    return
            if self.loopback_hosts_only and not _names_this_machine(headers.get("host")):
                # Without a token the service is open to this machine only, and a web page whose
                # name its attacker re-points at 127.0.0.1 (DNS rebinding) is this machine to the
                # socket: it read, wrote and took leases (QA round 68). Its Host still says its name.
                message = (
                    "this tracker has no api_token and answers requests addressed to this machine "
                    f"only (Host localhost, 127.0.0.1 or [::1]), not {headers.get('host', '')[:100]!r}: "
                    "set TRACKER_API_TOKEN to answer other names"
                )
                await self._reject(scope, send_with_id, 421, "misdirected_request", message)
                return
            if (refusal := _undecodable(scope)) is not None:
                await self._reject(scope, send_with_id, 400, "bad_request", refusal)
                return
            # A coded body is refused (read as JSON, it was "There was an error parsing the body");
            # a header on a request without a body changes nothing.
            encoding = headers.get("content-encoding", "").strip().lower() or "identity"
            has_body = "transfer-encoding" in headers or headers.get("content-length", "0") != "0"
            if encoding != "identity" and has_body:
                message = f"Content-Encoding {encoding} is not supported: send the body uncompressed"
                await self._reject(scope, send_with_id, 415, "unsupported_media_type", message)
                return
            # A control character in the path (a percent-encoded newline, say) is refused here:
            # route patterns end in `$`, which matches before a final newline and would drop it.
            bad = FORBIDDEN_CHARACTERS.search(scope["path"])
            if bad is not None:
                message = f"the path contains control character {bad.group()!r} at position {bad.start()}"
                await self._reject(scope, send_with_id, 422, "invalid_input", message)
                return
            # Who may ask before anything of the body is read: FastAPI reads and decodes a JSON body
            # before any dependency runs, so a caller without the token had its 8 MB decoded on the
            # event loop (1.8 s) and held in memory, as many at once as it liked (QA round 68).
            if self.api_token is not None and not token_matches(headers.get("authorization"), self.api_token):
                if route_needs_token(self._route(scope)):
                    close = {"Connection": "close"} if has_body else None  # its body is never read
                    await self._reject(scope, send_with_id, 401, "unauthorized", UNAUTHORIZED, close)
                    return
            declared = headers.get("content-length")
            if (
                declared is not None
                and declared.isascii()
                and declared.isdigit()
                and int(declared) > self.max_body_bytes
            ):
                raise _BodyTooLarge(self.max_body_bytes)
            await self.app(scope, limited_receive, send_with_id)
        except _BodyTooLarge:
            if response_started:
                raise
            message = f"request body exceeds the limit of {self.max_body_bytes} bytes"
            # The rest of the body is never read; tell the client this connection is done.
            close = {"Connection": "close"}
            await self._reject(scope, send_with_id, 413, "body_too_large", message, close)
        finally:
            template = self._template(scope)
            elapsed = time.perf_counter() - started
            method = scope["method"] if scope["method"] in _METHODS else "other"
            self.metrics.http_requests.labels(method=method, route=template, status=str(status)).inc()
            self.metrics.http_seconds.labels(route=template).observe(elapsed)
            quiet = status < 400 and (not self.access_log or _app_path(scope) in _QUIET)
            access_log.log(
                logging.DEBUG if quiet else logging.INFO,
                "%s %s %d %.1f ms",
                scope["method"],
                _as_sent(scope),
                status,
                elapsed * 1000,
                extra={
                    "request_id": request_id,
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 2),
                    "client": _client(scope),
                },
            )

    async def _reject(
        self,
        scope: Scope,
        send: Send,
        status: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer before the app runs, in the shape of every other error (``error_response``)."""
        self.metrics.requests_rejected.labels(code=code).inc()
        if status == 401:
            headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
        body = {"error": {"code": code, "message": message, "request_id": scope.get("request_id")}}
        await JSONResponse(body, status_code=status, headers=headers)(scope, _no_body, send)


def _names_this_machine(host: str | None) -> bool:
    """Whether a ``Host`` header (``name[:port]``, ``[v6]:port``) names a loopback address or
    localhost; a request without one (HTTP/1.0) came from no browser's page."""
    if host is None:
        return True
    name = host.strip()
    if name.startswith("["):
        name = name[: name.find("]") + 1] if "]" in name else name
    elif name.count(":") == 1:
        name = name.rsplit(":", 1)[0]
    return is_loopback(name) or name.lower().endswith(".localhost")


def _as_sent(scope: Scope) -> str:
    """The path as the client sent it, percent-encoded: decoded, ``/v1/peers/x%20client=10.9.9.9``
    wrote words of its choosing into the access line's message (QA round 68)."""
    raw = scope.get("raw_path")
    return raw.decode("latin-1") if isinstance(raw, bytes) else quote(scope["path"], safe="/")


def _app_path(scope: Scope) -> str:
    """The path within this app: mounted under a prefix (an embedding application's ``/tracker``),
    the full path missed the probes' exemption from the rate limit (QA round 22)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _undecodable(scope: Scope) -> str | None:
    """Why the path or the query string is not text, if it is not: percent-decoded bytes that are not
    UTF-8 were read with U+FFFD in their place (``/v1/peers/%FF`` read the peer named U+FFFD;
    QA round 21)."""
    raw_path = scope.get("raw_path")
    if raw_path is not None and not _is_utf8(unquote_to_bytes(raw_path.split(b"?", 1)[0])):
        return "the path is not UTF-8 once percent-decoded"
    query = scope.get("query_string", b"")
    if query and not _is_utf8(unquote_to_bytes(query.replace(b"+", b" "))):
        return "the query string is not UTF-8 once percent-decoded"
    return None


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


async def _no_body() -> Message:
    return {"type": "http.disconnect"}

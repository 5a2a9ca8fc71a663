"""The HTTP API in-process (ASGI transport), on both engines: flows, errors, auth, limits, probes, metrics."""

from __future__ import annotations

import asyncio
import gzip
import inspect
import json
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import pytest
from conftest import PG_URL, _dsn
from sqlalchemy import text
from sqlalchemy.engine import make_url

from tracker import AvailabilityTracker, TrackerConfig
from tracker.errors import (
    CommitOutcomeUnknown,
    ConfigError,
    InvalidInput,
    StorageError,
    TransientStorageError,
)
from tracker.events import ContentAvailable, PeerOffline, PeerOnline
from tracker.gossip.agent import GossipAgent
from tracker.gossip.config import GossipConfig
from tracker.service import ServiceSettings, create_app
from tracker.service import metrics as metrics_module
from tracker.service.app import _leaves
from tracker.testing import ManualClock

TOKEN = "s3cret-token-0123456789"


def _client(tracker: AvailabilityTracker, **settings: Any) -> httpx.AsyncClient:
    app = create_app(tracker, ServiceSettings(**settings))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tracker.test")


@pytest.fixture
async def api(tracker: AvailabilityTracker) -> AsyncIterator[httpx.AsyncClient]:
    async with _client(tracker) as client:
        yield client


async def _swarm(api: httpx.AsyncClient, clock: ManualClock) -> None:
    """Three holders of cid-1: a reliable fast peer, a mediocre one, and a proven bad one."""
    events: list[dict[str, Any]] = []
    for peer, speed, served, failed in (
        ("good", 9_000_000, 20, 0),
        ("meh", 2_000_000, 6, 6),
        ("bad", 5_000_000, 0, 9),
    ):
        events.append({"type": "peer_online", "peer_id": peer, "at": clock.now - 3600})
        events.append({"type": "content_available", "cid": "cid-1", "peer_id": peer})
        events.append({"type": "speed_sample", "peer_id": peer, "bytes_per_sec": speed})
        events += [{"type": "upload_outcome", "peer_id": peer, "success": True}] * served
        events += [{"type": "upload_outcome", "peer_id": peer, "success": False}] * failed
        events.append({"type": "peer_online", "peer_id": peer})
    response = await api.post("/v1/events", json={"events": events})
    assert response.status_code == 200, response.text
    assert response.json() == {"applied": len(events)}


async def test_best_peers_rank_by_quality_and_show_each_score_component(
    api: httpx.AsyncClient, clock: ManualClock
) -> None:
    await _swarm(api, clock)
    response = await api.get("/v1/content/cid-1/best", params={"n": 3, "strategy": "best"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [peer["peer_id"] for peer in body["peers"]] == ["good", "meh"]  # "bad" is proven unreliable
    good = body["peers"][0]
    assert good["rank"] == 1 and good["load"] == 0 and good["capacity"] >= 1
    assert good["reputation"] == pytest.approx(good["success_rate"] * good["uptime_factor"])
    assert good["download_bytes_per_sec"] == 9_000_000
    assert body["strategy"] == "best" and body["lease_ttl_s"] > 0


async def test_a_selection_takes_a_lease_that_the_next_answer_shows_as_load(
    api: httpx.AsyncClient, clock: ManualClock
) -> None:
    await _swarm(api, clock)
    await api.get("/v1/content/cid-1/best", params={"n": 1})
    availability = (await api.get("/v1/content/cid-1")).json()
    loads = {peer["peer_id"]: peer["load"] for peer in availability["peers"]}
    assert loads["good"] == 1
    outcome = await api.post("/v1/peers/outcomes", json={"peer_id": "good", "success": True, "cid": "cid-1"})
    assert outcome.status_code == 200
    availability = (await api.get("/v1/content/cid-1")).json()
    assert {peer["peer_id"]: peer["load"] for peer in availability["peers"]}["good"] == 0


async def test_single_event_endpoints_each_record_their_event(api: httpx.AsyncClient) -> None:
    for path, body in (
        ("/v1/peers/online", {"peer_id": "p1"}),
        ("/v1/peers/heartbeat", {"peer_id": "p1"}),
        ("/v1/peers/speed", {"peer_id": "p1", "bytes_per_sec": 1_000}),
        ("/v1/peers/outcomes", {"peer_id": "p1", "success": True, "bytes": 4096}),
        ("/v1/peers/outcomes", {"peer_id": "p1", "success": False}),
        ("/v1/content/available", {"cid": "c1", "peer_id": "p1"}),
    ):
        response = await api.post(path, json=body)
        assert response.status_code == 200, (path, response.text)
        assert response.json() == {"applied": 1}
    peer = (await api.get("/v1/peers/p1")).json()
    assert (peer["online"], peer["chunks_served"], peer["chunks_failed"]) == (True, 1, 1)
    assert peer["download_bytes_per_sec"] == 1_000
    assert (await api.get("/v1/content/c1")).json()["replication_factor"] == 1

    assert (await api.post("/v1/content/unavailable", json={"cid": "c1", "peer_id": "p1"})).status_code == 200
    assert (await api.post("/v1/peers/offline", json={"peer_id": "p1"})).status_code == 200
    assert (await api.get("/v1/content/c1")).json()["replication_factor"] == 0
    assert (await api.get("/v1/peers/p1")).json()["online"] is False


async def test_ids_with_slashes_and_unicode_round_trip_through_paths(api: httpx.AsyncClient) -> None:
    await api.post("/v1/peers/online", json={"peer_id": "eu/west/päer-1"})
    await api.post("/v1/content/available", json={"cid": "dir/file.bin", "peer_id": "eu/west/päer-1"})
    assert (await api.get("/v1/peers/eu/west/päer-1")).json()["peer_id"] == "eu/west/päer-1"
    best = (await api.get("/v1/content/dir/file.bin/best")).json()
    assert best["cid"] == "dir/file.bin"
    assert [peer["peer_id"] for peer in best["peers"]] == ["eu/west/päer-1"]


async def test_a_batch_with_one_bad_event_is_rejected_whole(api: httpx.AsyncClient) -> None:
    events = [
        {"type": "peer_online", "peer_id": "p1"},
        {"type": "content_available", "cid": "c1", "peer_id": "p1"},
        {"type": "speed_sample", "peer_id": "p1", "bytes_per_sec": -5},
    ]
    response = await api.post("/v1/events", json={"events": events})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert "events.2" in error["message"]
    assert (await api.get("/v1/peers/p1")).status_code == 404
    assert (await api.get("/v1/content/c1")).status_code == 404


async def test_a_batch_with_an_unknown_field_lists_its_bad_events_too(api: httpx.AsyncClient) -> None:
    """Events are validated in slices after the body (docs/operations.md): when the body itself
    failed, the bad events went unlisted (QA round 9)."""
    good = [{"type": "peer_online", "peer_id": "p"}] * 1200
    body = {"events": [*good, {"type": "speed_sample", "peer_id": "p", "bytes_per_sec": -5}], "x": 1}
    response = await api.post("/v1/events", json=body)
    assert response.status_code == 422
    assert [d["loc"] for d in response.json()["error"]["details"]] == [
        ["body", "x"],
        ["body", "events", 1200, "speed_sample", "bytes_per_sec"],
    ]


async def test_a_batch_over_the_limit_is_refused_before_its_events_are_checked(
    api: httpx.AsyncClient, tracker: AvailabilityTracker
) -> None:
    """Each bad item was listed before the count was checked: a 2 MB body of a million zeros took
    1.5 GB and answered 140 MB (QA round 21)."""
    limit = tracker.config.max_batch_events
    response = await api.post("/v1/events", json={"events": [0] * (limit + 1)})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["message"] == f"batch has {limit + 1} events; the limit is {limit}"
    assert len(response.content) < 1_000


@pytest.mark.parametrize(
    ("path", "body", "first"),
    [
        ("/v1/events", {"events": [0] * 5_000}, ["body", "events", 0]),
        ("/v1/events", {"events": [0] * 5_000, "x": 1}, ["body", "x"]),
    ],
)
async def test_an_answer_lists_at_most_a_hundred_errors_and_says_it_stopped(
    api: httpx.AsyncClient, path: str, body: dict[str, Any], first: list[object]
) -> None:
    """Every error was listed: 200,000 unknown keys made an 18 MB answer (QA round 21); since QA round
    57 an object of more than 64 keys is refused before validation (400)."""
    response = await api.post(path, json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert len(error["details"]) == 100 and error["details_truncated"] is True
    assert error["details"][0]["loc"] == first
    assert len(response.content) < 20_000
    assert (await api.get("/v1/peers/p")).status_code == 404


@pytest.mark.parametrize(
    ("path", "body", "code", "says"),
    [
        ("/v1/peers/online", {"peer_id": ""}, "invalid_request", "peer_id"),
        ("/v1/peers/online", {"peer_id": "a\x00b"}, "invalid_input", "control character"),
        ("/v1/peers/online", {"peer_id": "x" * 257}, "invalid_request", "peer_id"),
        ("/v1/peers/online", {"peer_id": 7}, "invalid_request", "peer_id"),
        ("/v1/peers/online", {"peer_id": "p", "at": -1}, "invalid_request", "at"),
        ("/v1/peers/online", {"peer_id": "p", "at": 9e15}, "invalid_input", "future"),
        ("/v1/peers/online", {"peer_id": "p", "at": 0}, "invalid_input", "older than 604800 s"),
        ("/v1/peers/online", {"peer_id": "p", "extra": 1}, "invalid_request", "extra"),
        ("/v1/peers/online", {}, "invalid_request", "peer_id"),
        ("/v1/peers/speed", {"peer_id": "p", "bytes_per_sec": -1}, "invalid_request", "bytes_per_sec"),
        ("/v1/peers/speed", {"peer_id": "p", "bytes_per_sec": 1.5}, "invalid_request", "bytes_per_sec"),
        ("/v1/peers/speed", {"peer_id": "p", "bytes_per_sec": "100"}, "invalid_request", "bytes_per_sec"),
        ("/v1/peers/outcomes", {"peer_id": "p", "success": "yes"}, "invalid_request", "success"),
        ("/v1/peers/outcomes", {"peer_id": "p", "success": 1}, "invalid_request", "success"),
        ("/v1/events", {"events": [{"type": "nonsense", "peer_id": "p"}]}, "invalid_request", "events.0"),
        ("/v1/events", {"events": "peer_online"}, "invalid_request", "events"),
    ],
)
async def test_bad_input_gets_a_422_that_says_what_is_wrong_and_writes_nothing(
    api: httpx.AsyncClient, path: str, body: dict[str, Any], code: str, says: str
) -> None:
    response = await api.post(path, json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert says in error["message"]
    assert error["request_id"] == response.headers["x-request-id"]
    assert (await api.get("/v1/stats")).json()["peers_total"] == 0


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (b"{not json", 400, "bad_request"),
        (b'{"peer_id": "p"' + b" " * 10, 400, "bad_request"),  # cut short
        (b"\xff\xfe{}", 400, "bad_request"),  # not UTF-8
        (b'{"peer_id": "\xff"}', 400, "bad_request"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "bad_request"),  # nested beyond the parser's depth
        (b"", 422, "invalid_request"),  # JSON, but not the shape asked for
        (b"[]", 422, "invalid_request"),
        (b"null", 422, "invalid_request"),
    ],
)
async def test_malformed_bodies_are_rejected_with_their_documented_status(
    api: httpx.AsyncClient, raw: bytes, status: int, code: str
) -> None:
    response = await api.post("/v1/peers/online", content=raw, headers={"content-type": "application/json"})
    assert (response.status_code, response.json()["error"]["code"]) == (status, code), response.text
    assert (await api.get("/v1/stats")).json()["peers_total"] == 0


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "text/json", "application/jsonx", "application/x-ndjson"]
)
async def test_a_body_without_a_json_content_type_is_415(
    api: httpx.AsyncClient, content_type: str | None
) -> None:
    headers = {} if content_type is None else {"content-type": content_type}
    response = await api.post("/v1/peers/online", content=b'{"peer_id": "p"}', headers=headers)
    assert response.status_code == 415, response.text
    assert "Content-Type: application/json" in response.json()["error"]["message"]
    assert (await api.get("/v1/stats")).json()["peers_total"] == 0


@pytest.mark.parametrize(
    "content_type", ["application/json; charset=utf-8", "Application/JSON", "application/vnd.x+json"]
)
async def test_a_body_in_any_json_media_type_is_read(api: httpx.AsyncClient, content_type: str) -> None:
    response = await api.post(
        "/v1/peers/online", content=b'{"peer_id": "p"}', headers={"content-type": content_type}
    )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("path", ["/v1/peers/p%0A", "/v1/peers/a%0Ab", "/v1/content/c%0A", "/v1/peers/%7F"])
async def test_a_control_character_in_a_path_is_422_even_at_its_end(
    api: httpx.AsyncClient, path: str
) -> None:
    await api.post("/v1/peers/online", json={"peer_id": "p"})
    await api.post("/v1/content/available", json={"cid": "c", "peer_id": "p"})
    response = await api.get(path)  # a final newline must not read peer "p" or content "c"
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_input"
    assert "control character" in response.json()["error"]["message"]


async def test_a_body_over_the_limit_is_refused_before_it_is_read(tracker: AvailabilityTracker) -> None:
    async with _client(tracker, max_body_bytes=4096) as api:
        events = [{"type": "peer_online", "peer_id": f"peer-{i}"} for i in range(200)]
        response = await api.post("/v1/events", json={"events": events})
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "body_too_large"

        async def chunks() -> AsyncIterator[bytes]:
            # No Content-Length: the limit must hold while streaming, too.
            for _ in range(10):
                yield b" " * 1024

        streamed = await api.post(
            "/v1/events", content=chunks(), headers={"content-type": "application/json"}
        )
        assert streamed.status_code == 413
        assert (await api.get("/v1/stats")).json()["peers_total"] == 0
        # Refused before routing, still counted under the route it was for (it was "unmatched").
        metrics = (await api.get("/metrics")).text
        assert 'tracker_http_requests_total{method="POST",route="/v1/events",status="413"} 2.0' in metrics


async def test_writes_need_the_token_when_one_is_configured_and_reads_do_not(
    tracker: AvailabilityTracker,
) -> None:
    async with _client(tracker, api_token=TOKEN) as api:
        body = {"peer_id": "p1"}
        missing = await api.post("/v1/peers/online", json=body)
        wrong = await api.post("/v1/peers/online", json=body, headers={"Authorization": "Bearer nope"})
        assert (missing.status_code, wrong.status_code) == (401, 401)
        assert missing.json()["error"]["code"] == "unauthorized"
        assert missing.headers["www-authenticate"] == "Bearer"
        assert (await api.get("/v1/peers/p1")).status_code == 404  # nothing was written
        right = await api.post("/v1/peers/online", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
        assert right.status_code == 200
        assert (await api.get("/v1/peers/p1")).status_code == 200


async def test_without_the_token_a_write_is_401_however_wrong_its_body(tracker: AvailabilityTracker) -> None:
    async with _client(tracker, api_token=TOKEN) as api:
        for raw in (b"{bad", b'{"peer_id": 123}', b"[]"):
            response = await api.post(
                "/v1/peers/online", content=raw, headers={"content-type": "application/json"}
            )
            assert response.status_code == 401, (raw, response.text)
        unlabelled = await api.post("/v1/peers/online", content=b'{"peer_id": "p"}')
        assert unlabelled.status_code == 401
        assert (await api.get("/v1/stats")).json()["peers_total"] == 0


async def _asgi_call(
    app: Any,
    path: str,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    *,
    stall: bool = False,
    endless: bool = False,
) -> tuple[dict[str, Any], dict[str, Any], int]:
    """One POST straight through the ASGI app: the response's start message, its JSON body, and how
    often the app asked for the request's body. ``stall``: ``body`` is only its first part, and the
    rest never comes. ``endless``: ``body`` comes again each time the app asks, with more to come."""
    sent: list[dict[str, Any]] = []
    asked = 0

    async def receive() -> dict[str, Any]:
        nonlocal asked
        asked += 1
        if stall and asked > 1:
            await asyncio.sleep(3600)
        return {"type": "http.request", "body": body, "more_body": stall or endless}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
        "headers": headers, "client": ("127.0.0.1", 5000), "server": ("tracker.test", 80),
    }  # fmt: skip
    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    answer = json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))
    return start, answer, asked


async def test_a_gossip_message_is_read_no_further_than_the_gossip_limit(
    tracker: AvailabilityTracker,
) -> None:
    """/v1/gossip read up to the service's max_body_bytes (8 MiB) before its own check of the gossip
    max_bytes (4 MiB) refused it (QA round 68): now it stops one byte past the gossip limit, refuses the
    message as oversized and closes the connection (the rest is never read)."""
    agent = GossipAgent(tracker, GossipConfig(keys=("k" * 32,), max_bytes=200_000))
    app = create_app(tracker, gossip=agent)
    headers = [(b"content-type", b"application/gzip")]
    start, answer, asked = await _asgi_call(app, "/v1/gossip", headers, b"x" * 10_000, endless=True)
    assert start["status"] == 413 and asked == 21, (start, asked)
    assert dict(start["headers"])[b"connection"] == b"close"
    assert answer["error"]["code"] == "gossip_oversized"
    assert "over 200000 bytes" in answer["error"]["message"]


async def test_without_the_token_a_write_is_refused_before_its_body_is_read(
    tracker: AvailabilityTracker,
) -> None:
    """FastAPI reads and decodes a JSON body before any dependency: a caller without the token had 8 MB
    decoded on the event loop (1.8 s, /healthz stalled 3.5 s) and held in memory, as many at once as
    it liked, before its 401 (QA round 68). Now the 401 comes before the first byte of the body is
    asked for, and the connection is closed (the body is never read)."""
    app = create_app(tracker, ServiceSettings(api_token=TOKEN))
    for authorization in (None, b"Bearer wrong"):
        headers = [(b"content-type", b"application/json"), (b"content-length", b"8000000")]
        headers += [(b"authorization", authorization)] if authorization else []
        start, answer, asked = await _asgi_call(app, "/v1/events", headers, b'{"events": []}')
        assert start["status"] == 401 and asked == 0, (start, asked)
        sent_headers = dict(start["headers"])
        assert sent_headers[b"connection"] == b"close" and sent_headers[b"www-authenticate"] == b"Bearer"
        assert answer["error"]["code"] == "unauthorized"
    async with _client(tracker, api_token=TOKEN) as api:  # reads need no token, and read no body anyway
        assert (await api.get("/v1/stats")).status_code == 200


async def test_a_body_that_stalls_is_answered_408_and_its_connection_closed(
    tracker: AvailabilityTracker,
) -> None:
    """A stalled upload held its buffered body for as long as its sender kept the connection open:
    40 of them held 430 MB (QA round 68). After ``body_timeout_s`` without a byte: 408, closed."""
    app = create_app(tracker, ServiceSettings(body_timeout_s=0.2))
    headers = [(b"content-type", b"application/json"), (b"content-length", b"100")]
    call = _asgi_call(app, "/v1/peers/online", headers, b'{"peer_id": ', stall=True)
    start, answer, _ = await asyncio.wait_for(call, timeout=10)
    assert start["status"] == 408 and dict(start["headers"])[b"connection"] == b"close"
    assert answer["error"]["code"] == "body_timeout", answer
    async with _client(tracker) as api:  # a body that keeps coming is no stall: all of it in one go here
        assert (await api.post("/v1/peers/online", json={"peer_id": "p"})).status_code == 200
    with pytest.raises(ConfigError, match="body_timeout_s"):
        ServiceSettings(body_timeout_s=0)


@pytest.mark.parametrize(
    "bad",
    [
        {"header_timeout_s": 0},
        {"header_timeout_s": float("nan")},
        {"max_connections": 0},
        {"max_connections": True},
    ],
)
def test_the_connection_guards_refuse_settings_that_would_refuse_everything(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=next(iter(bad))):
        ServiceSettings(**bad)
    assert ServiceSettings.from_env({"TRACKER_MAX_CONNECTIONS": "7"}).max_connections == 7


async def test_a_content_length_of_unicode_digits_is_no_error_of_the_gate(
    tracker: AvailabilityTracker,
) -> None:
    """``"²".isdigit()`` is true: ``int("²")`` raised out of the middleware (QA round 68; uvicorn's h11
    refuses such a header first, an embedding server may not)."""
    headers = [(b"content-type", b"application/json"), (b"content-length", "²".encode("latin-1"))]
    start, answer, _ = await _asgi_call(create_app(tracker), "/v1/peers/online", headers, b'{"peer_id": "p"}')
    assert start["status"] == 200, answer


async def test_selections_need_the_token_because_they_take_leases(
    tracker: AvailabilityTracker, clock: ManualClock
) -> None:
    async with _client(tracker, api_token=TOKEN) as api:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        await api.post("/v1/peers/online", json={"peer_id": "p"}, headers=auth)
        await api.post("/v1/content/available", json={"cid": "c", "peer_id": "p"}, headers=auth)
        refused = await api.get("/v1/content/c/best", params={"n": 1})
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
        loads = [peer["load"] for peer in (await api.get("/v1/content/c")).json()["peers"]]
        assert loads == [0]  # the refused call granted nothing
        granted = await api.get("/v1/content/c/best", params={"n": 1}, headers=auth)
        assert [peer["peer_id"] for peer in granted.json()["peers"]] == ["p"]
        assert [peer["load"] for peer in (await api.get("/v1/content/c")).json()["peers"]] == [1]


def test_a_non_loopback_address_needs_a_token() -> None:
    with pytest.raises(ConfigError, match="api_token"):
        ServiceSettings(host="0.0.0.0")
    assert ServiceSettings(host="0.0.0.0", api_token=TOKEN).host == "0.0.0.0"
    assert ServiceSettings(host="::1").api_token is None
    with pytest.raises(ConfigError, match="16 characters"):
        ServiceSettings(api_token="short")
    # Never matchable: headers arrive as latin-1, and an offered token is stripped (QA round 6).
    for token in ("s3cret-tökén-0123456789", " s3cret-token-0123456789", "s3cret-token-012345678\n"):
        with pytest.raises(ConfigError, match="printable ASCII"):
            ServiceSettings(api_token=token)


@pytest.mark.parametrize("grace", [0.0, -1.0, float("nan"), float("inf")])
def test_the_shutdown_grace_is_positive_and_finite(grace: float) -> None:
    """NaN passed (``nan <= 0`` is false) and failed only at shutdown, after creating the database."""
    with pytest.raises(ConfigError, match="shutdown_grace_s"):
        ServiceSettings(shutdown_grace_s=grace)


def test_service_settings_come_from_the_environment() -> None:
    settings = ServiceSettings.from_env({"TRACKER_PORT": "9000", "TRACKER_LOG_JSON": "yes"}, host="::1")
    assert (settings.port, settings.log_json, settings.host) == (9000, True, "::1")
    with pytest.raises(ConfigError, match="TRACKER_PORT"):
        ServiceSettings.from_env({"TRACKER_PORT": "eighty"})
    assert ServiceSettings.from_env({"TRACKER_PORT": "eighty"}, port=8080).port == 8080  # --port wins


async def test_best_rejects_an_out_of_range_n_and_an_unknown_strategy(api: httpx.AsyncClient) -> None:
    for params in ({"n": 0}, {"n": 101}, {"n": "three"}, {"strategy": "cheapest"}):
        response = await api.get("/v1/content/c1/best", params=params)
        assert response.status_code == 422, params
        assert response.json()["error"]["code"] == "invalid_request"


async def test_unknown_peers_and_contents_are_404_and_an_unknown_cid_has_no_best_peers(
    api: httpx.AsyncClient,
) -> None:
    assert (await api.get("/v1/peers/ghost")).json()["error"]["code"] == "not_found"
    assert (await api.get("/v1/content/ghost")).status_code == 404
    best = await api.get("/v1/content/ghost/best")
    assert best.status_code == 200 and best.json()["peers"] == []
    assert (await api.delete("/v1/peers/online")).status_code == 405


async def test_peers_are_listed_a_page_at_a_time(api: httpx.AsyncClient, clock: ManualClock) -> None:
    events = [{"type": "peer_online", "peer_id": f"peer-{i:02d}"} for i in range(5)]
    await api.post("/v1/events", json={"events": events})
    clock.advance(400)
    await api.post("/v1/peers/online", json={"peer_id": "peer-03"})
    first = (await api.get("/v1/peers", params={"limit": 2})).json()
    assert [peer["peer_id"] for peer in first["peers"]] == ["peer-00", "peer-01"]
    second = (await api.get("/v1/peers", params={"limit": 2, "after": first["next_after"]})).json()
    assert [peer["peer_id"] for peer in second["peers"]] == ["peer-02", "peer-03"]
    online = (await api.get("/v1/peers", params={"online": True})).json()
    assert [peer["peer_id"] for peer in online["peers"]] == ["peer-03"] and online["next_after"] is None


async def test_stats_count_what_the_database_holds(
    api: httpx.AsyncClient, tracker: AvailabilityTracker, clock: ManualClock
) -> None:
    await _swarm(api, clock)
    await api.get("/v1/content/cid-1/best", params={"n": 2})
    stats = (await api.get("/v1/stats")).json()
    assert (stats["peers_total"], stats["peers_online"], stats["contents_total"]) == (3, 3, 1)
    assert (stats["mappings_available"], stats["open_leases"]) == (3, 2)
    assert stats["ingest_events"] > 0 and stats["last_sweep_at"] is None
    assert stats["node_key"] == (await tracker.stats()).node_key


async def test_stats_give_the_last_sweep_as_a_time_like_every_other_time(
    api: httpx.AsyncClient, tracker: AvailabilityTracker, clock: ManualClock
) -> None:
    tracker.sweeper_state.last_report = await tracker.sweep()  # as the background sweeper keeps it
    stats = (await api.get("/v1/stats")).json()
    assert datetime.fromisoformat(stats["last_sweep_at"]) == datetime.fromtimestamp(clock.now, tz=UTC)


async def test_probes_report_alive_and_ready(api: httpx.AsyncClient) -> None:
    assert (await api.get("/healthz")).json() == {"status": "ok", "detail": None}
    ready = await api.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    # A cache-buster a load balancer adds is ignored by the probes (it was a 422: "dead").
    for probe in ("/healthz?t=1", "/readyz?t=1", "/metrics?t=1"):
        assert (await api.get(probe)).status_code == 200, probe


async def test_readiness_names_the_trackers_tables_left_without_a_revision(
    api: httpx.AsyncClient, tracker: AvailabilityTracker
) -> None:
    """Reachable, but its revision deleted (a partial restore): not "database unreachable" (QA round 62)."""
    async with tracker.engine.begin() as conn:
        await conn.execute(text("DELETE FROM alembic_version"))
    ready = await api.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["detail"].startswith("the database holds tables named as the tracker's ("), (
        ready.json()
    )


async def test_readiness_says_why_the_database_is_unreachable(empty_pg_url: str, clock: ManualClock) -> None:
    """A database dropped under a running tracker was "database unreachable: DBAPIError" (QA round
    16); the probe says what kind of failure it is, without the server's words (names, hosts)."""
    async with AvailabilityTracker(TrackerConfig(database_url=empty_pg_url, clock=clock)) as tracker:
        transport = httpx.ASGITransport(app=create_app(tracker))
        async with httpx.AsyncClient(transport=transport, base_url="http://tracker") as api:
            assert (await api.get("/readyz")).status_code == 200
            name = make_url(empty_pg_url).database
            admin = await asyncpg.connect(_dsn(PG_URL))
            try:
                await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            finally:
                await admin.close()
            details = []
            for _ in range(3):  # the pooled connection is found dead first, then a new one is refused
                ready = await api.get("/readyz")
                assert ready.status_code == 503
                details.append(ready.json()["detail"])
    assert "database unreachable: the database does not exist (" in details[-1], details
    assert all(str(name) not in detail for detail in details), details


async def test_metrics_count_events_selections_and_the_swarm(
    api: httpx.AsyncClient, clock: ManualClock
) -> None:
    await _swarm(api, clock)
    await api.get("/v1/content/cid-1/best", params={"n": 1})
    await api.get("/v1/content/nothing/best")
    await api.post("/v1/peers/online", json={"peer_id": ""})
    response = await api.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = _samples(response.text)
    assert samples['tracker_events_ingested_total{kind="peer_online"}'] == 6
    assert samples['tracker_events_ingested_total{kind="upload_outcome"}'] == 41
    assert samples['tracker_selection_seconds_count{strategy="best"}'] == 2
    assert samples["tracker_selection_empty_total"] == 1
    assert samples['tracker_requests_rejected_total{code="invalid_request"}'] == 1
    assert samples["tracker_peers_online"] == 3
    assert samples["tracker_open_leases"] == 1
    assert samples["tracker_sweeps_total"] == 0
    assert any(
        key.startswith('tracker_http_requests_total{method="POST",route="/v1/events"') for key in samples
    )


def _samples(exposition: str) -> dict[str, float]:
    """Prometheus text format as {"name{labels}": value} (comments skipped)."""
    samples = {}
    for line in exposition.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


async def test_request_ids_are_echoed_or_generated(api: httpx.AsyncClient) -> None:
    echoed = await api.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert echoed.headers["x-request-id"] == "abc-123"
    generated = await api.get("/healthz", headers={"X-Request-ID": "bad id with spaces"})
    assert generated.headers["x-request-id"] != "bad id with spaces"
    assert len(generated.headers["x-request-id"]) == 32


async def test_openapi_describes_every_endpoint(api: httpx.AsyncClient) -> None:
    schema = (await api.get("/openapi.json")).json()
    paths = set(schema["paths"])
    assert {"/v1/events", "/v1/peers/online", "/v1/content/{cid}/best", "/metrics", "/readyz"} <= paths
    assert "HTTPBearer" in schema["components"]["securitySchemes"]
    documented_404 = {
        path for path, ops in schema["paths"].items() if "404" in ops.get("get", {}).get("responses", {})
    }
    assert documented_404 == {"/v1/peers/{peer_id}", "/v1/content/{cid}"}  # the only reads that answer it
    # Every operation but the probes can be rate limited, /metrics too (QA round 21: it did not say).
    # The probes and /metrics ignore every query parameter, so they never answer 422 (QA round 31:
    # the schema said they did); whatever does answers with our error body.
    for path, ops in schema["paths"].items():
        for op in ops.values():
            limited = path not in {"/healthz", "/readyz"}
            assert ("429" in op["responses"]) == limited, (path, op["responses"].keys())
            invalid = op["responses"].get("422")
            assert (invalid is None) == (path in {"/healthz", "/readyz", "/metrics"}), (path, invalid)
            if invalid is not None:
                assert invalid["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/ErrorOut"
                }, (path, invalid)
    # Ids in paths and queries state what the service checks (QA round 21: a fuzzer read none of it).
    for path, name in [
        ("/v1/peers/{peer_id}", "peer_id"),
        ("/v1/content/{cid}", "cid"),
        ("/v1/peers", "after"),
    ]:
        (parameter,) = [p for p in schema["paths"][path]["get"]["parameters"] if p["name"] == name]
        stated = parameter["schema"] if "pattern" in parameter["schema"] else parameter["schema"]["anyOf"][0]
        assert (stated.get("minLength"), stated["maxLength"]) == (1, 256), stated
        assert stated["pattern"] == "^[^\\u0000-\\u001f\\u007f-\\u009f]*$"


@pytest.mark.parametrize("probe", ["/healthz", "/readyz"])
async def test_probes_answer_head_like_get_without_a_body(api: httpx.AsyncClient, probe: str) -> None:
    got, head = await api.get(probe), await api.head(probe)
    assert (head.status_code, got.status_code) == (200, 200)
    assert head.content == b"" and head.headers["content-type"] == got.headers["content-type"]


@pytest.mark.parametrize("url", ["/v1/content/c/best?nn=3", "/v1/peers?limt=5", "/v1/content/c/best?=0"])
async def test_an_unknown_query_parameter_is_422_not_ignored(api: httpx.AsyncClient, url: str) -> None:
    response = await api.get(url)  # a typo must not answer with the defaults
    assert response.status_code == 422, response.text
    assert "unknown query parameter" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (TransientStorageError("deadlock, retries exhausted"), "storage_busy"),
        (StorageError("database error: connection refused"), "storage_unavailable"),
        (CommitOutcomeUnknown("the connection failed while committing"), "commit_unknown"),
    ],
)
async def test_storage_failures_are_503_with_a_code_that_says_whether_to_resend(
    api: httpx.AsyncClient,
    tracker: AvailabilityTracker,
    monkeypatch: pytest.MonkeyPatch,
    error: Exception,
    code: str,
) -> None:
    async def failing(events: object) -> int:
        raise error

    monkeypatch.setattr(tracker, "record_batch", failing)  # the database's failure, as the tracker raises it
    response = await api.post("/v1/peers/outcomes", json={"peer_id": "p", "success": True})
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == code


@pytest.mark.parametrize(
    ("abandoned", "why"),
    [
        (False, "the database connection failed while committing and the outcome could not be checked"),
        (True, "the tracker was shut down (forced) while this write was being committed"),
    ],
)
async def test_an_unknown_commit_outcome_says_whether_a_connection_failed_or_a_shutdown_abandoned_it(
    api: httpx.AsyncClient,
    tracker: AvailabilityTracker,
    monkeypatch: pytest.MonkeyPatch,
    abandoned: bool,
    why: str,
) -> None:
    """On SQLite only a forced shutdown leaves a commit's outcome unknown; the answer said a
    connection had failed (QA round 16)."""

    async def failing(events: object) -> int:
        raise CommitOutcomeUnknown("lost", abandoned=abandoned)

    monkeypatch.setattr(tracker, "record_batch", failing)
    response = await api.post("/v1/peers/outcomes", json={"peer_id": "p", "success": True})
    assert response.status_code == 503 and response.json()["error"]["code"] == "commit_unknown"
    assert response.json()["error"]["message"].startswith(f"{why}: the events may have been applied")


async def test_content_lists_the_best_limit_holders_and_counts_them_all(
    api: httpx.AsyncClient, tracker: AvailabilityTracker, clock: ManualClock
) -> None:
    await _swarm(api, clock)  # three holders of cid-1
    everyone = (await api.get("/v1/content/cid-1")).json()
    top = (await api.get("/v1/content/cid-1", params={"limit": 2})).json()
    assert top["peers"] == everyone["peers"][:2] and top["replication_factor"] == 3
    assert (await api.get("/v1/content/cid-1", params={"limit": 1001})).status_code == 422  # max_page_size
    assert (await api.get("/v1/content/cid-1", params={"limit": 0})).status_code == 422
    library = await tracker.get_content_availability("cid-1", limit=1)
    assert library is not None and len(library.peers) == 1 and library.replication_factor == 3
    roomy = await tracker.get_content_availability("cid-1", limit=10)
    unlimited = await tracker.get_content_availability("cid-1")
    assert roomy is not None and unlimited is not None
    assert roomy.peers == unlimited.peers and roomy.replication_factor == unlimited.replication_factor == 3
    with pytest.raises(InvalidInput, match="limit"):
        await tracker.get_content_availability("cid-1", limit=0)
    await tracker.record_batch([ContentAvailable("cid-gone", "lone"), PeerOffline("lone")])
    gone = await tracker.get_content_availability("cid-gone", limit=5)
    assert gone is not None and gone.peers == () and gone.replication_factor == 0


async def test_a_peer_listing_without_a_limit_stays_within_max_page_size(
    tracker: AvailabilityTracker,
) -> None:
    """The default page was 100 whatever ``max_page_size`` said (QA round 14: 20 rows at 5)."""
    await tracker.record_batch([PeerOnline(f"p{i:02}") for i in range(20)])
    async with _client(tracker, max_page_size=5) as client:
        assert len((await client.get("/v1/peers")).json()["peers"]) == 5


def test_no_dependency_of_ours_runs_in_a_worker_thread(tracker: AvailabilityTracker) -> None:
    """FastAPI runs a plain function dependency in a worker thread: four thread hops a request
    (a heartbeat took 1.8 ms in-process instead of 0.9; QA round 17)."""
    plain = set()
    for route in _leaves(create_app(tracker).routes):
        pending = [getattr(route, "dependant", None)]
        while pending:
            dependant = pending.pop()
            if dependant is None:
                continue
            pending.extend(dependant.dependencies)
            call = dependant.call
            if (
                call is not None
                and call.__module__.startswith("tracker.")
                and not inspect.iscoroutinefunction(call)
            ):
                plain.add(f"{call.__module__}.{call.__qualname__}")
    assert plain == set()


async def test_a_made_up_method_is_counted_as_other_in_the_request_metrics(api: httpx.AsyncClient) -> None:
    """Every method a client sent became a label of its own: /metrics grew without bound (QA round 21)."""
    for i in range(3):
        assert (await api.request(f"M{i:06d}", "/v1/stats")).status_code == 405
    metrics = (await api.get("/metrics")).text
    assert 'method="other",route="/v1/stats",status="405"} 3.0' in metrics
    assert "M000001" not in metrics


async def test_a_405_says_which_methods_the_route_allows(api: httpx.AsyncClient) -> None:
    """Starlette's Allow header was dropped by our error handler (RFC 9110 requires it; QA round 21)."""
    response = await api.put("/v1/peers/online", json={"peer_id": "p"})
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    error = response.json()["error"]
    assert error["code"] == "method_not_allowed"
    # "Method Not Allowed" alone, where every other error says what happened (QA round 56).
    assert error["message"] == "PUT is not allowed on /v1/peers/online; allowed: POST"
    error = (await api.get("/v1/nowhere")).json()["error"]
    assert error["code"] == "not_found"
    assert (
        error["message"] == "no route GET /v1/nowhere: the API's routes are listed at /docs and /openapi.json"
    )


@pytest.mark.parametrize(
    ("method", "path"), [("GET", "/v1/stats/"), ("GET", "/healthz/"), ("POST", "/v1/events/")]
)
async def test_a_trailing_slash_is_an_unknown_route_not_a_redirect(
    api: httpx.AsyncClient, method: str, path: str
) -> None:
    """It was a 307 to a Location built from the client's Host header (QA round 21)."""
    response = await api.request(method, path, headers={"host": "evil.example"}, json={"events": []})
    assert response.status_code == 404 and "location" not in response.headers
    assert response.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("/v1/peers/%FF", "the path is not UTF-8"),
        ("/v1/content/%C3/best", "the path is not UTF-8"),
        ("/v1/peers?after=%ff", "the query string is not UTF-8"),
    ],
)
async def test_a_path_or_query_that_is_not_utf8_is_400_not_read_as_another_id(
    api: httpx.AsyncClient, url: str, says: str
) -> None:
    """Read with U+FFFD in place of the bad bytes: /v1/peers/%FF read the peer named U+FFFD
    (QA round 21)."""
    await api.post("/v1/peers/online", json={"peer_id": "\ufffd"})
    response = await api.get(url)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "bad_request" and says in response.json()["error"]["message"]
    assert (await api.get("/v1/peers/%EF%BF%BD")).status_code == 200  # U+FFFD itself, in UTF-8


async def test_a_content_encoding_on_a_request_without_a_body_changes_nothing(api: httpx.AsyncClient) -> None:
    for value in ("gzip", "", "identity"):
        assert (await api.get("/healthz", headers={"content-encoding": value})).status_code == 200


async def test_a_compressed_body_is_415_and_writes_nothing(api: httpx.AsyncClient) -> None:
    """FastAPI parsed the gzip bytes as JSON and answered "There was an error parsing the body"."""
    body = gzip.compress(json.dumps({"peer_id": "p"}).encode())
    response = await api.post(
        "/v1/peers/online",
        content=body,
        headers={"content-type": "application/json", "content-encoding": "gzip"},
    )
    assert response.status_code == 415
    assert "Content-Encoding gzip is not supported" in response.json()["error"]["message"]
    assert (await api.get("/v1/peers/p")).status_code == 404


async def test_an_events_own_refusal_in_a_batch_names_its_index(api: httpx.AsyncClient) -> None:
    """The id's check raised in the event's constructor, before the batch check that adds the index
    (QA round 21: "peer_id contains control character" in a batch of 50,000)."""
    events = [{"type": "peer_online", "peer_id": f"p{i}"} for i in range(3)]
    events.append({"type": "content_available", "cid": "c", "peer_id": "bad\x01id"})
    response = await api.post("/v1/events", json={"events": events})
    assert response.status_code == 422
    assert response.json()["error"]["message"].startswith("event #3 (content_available): peer_id contains")
    assert (await api.get("/v1/peers/p0")).status_code == 404


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b'{"peer_id": "p\xff"}', "the body is not valid UTF-8 (nor UTF-16/32) text: byte 14"),
        (b'{"peer_id": "p", "at": 1' + b"0" * 5000 + b"}", "a number of more than 4,300 digits"),
        # 620,000 unknown keys held the event loop for 3 s while pydantic named each (QA round 57).
        (
            json.dumps({"peer_id": "p", **{f"k{i}": 0 for i in range(64)}}).encode(),
            "an object of 65 members (a key given twice counts twice); objects have at most 64",
        ),
        # Repeated keys are members too (QA round 58: they read as "65 keys").
        (b"{" + b", ".join([b'"peer_id": "p"'] * 65) + b"}", "an object of 65 members (a key given twice"),
        (
            json.dumps(
                {"events": [{"type": "peer_online", "peer_id": "p", **{f"k{i}": 0 for i in range(99)}}]}
            ).encode(),
            "the body holds an object of 101 members",
        ),
    ],
)
async def test_a_body_that_cannot_be_parsed_is_400_saying_why(
    api: httpx.AsyncClient, body: bytes, says: str
) -> None:
    """Both got FastAPI's "There was an error parsing the body" (QA round 21)."""
    path = "/v1/events" if body.startswith(b'{"events"') else "/v1/peers/online"
    response = await api.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "bad_request"
    assert says in response.json()["error"]["message"]
    assert (await api.get("/v1/peers/p")).status_code == 404


async def test_metrics_give_the_sqlite_write_ahead_logs_size(
    api: httpx.AsyncClient, tracker: AvailabilityTracker
) -> None:
    """A read left open grew the log to 2.56 GB with nothing in /metrics (QA round 19)."""
    await api.post("/v1/peers/online", json={"peer_id": "p"})
    metrics = (await api.get("/metrics")).text
    database = make_url(tracker.config.database_url).database
    if database is None or tracker.config.dialect != "sqlite":
        assert "tracker_sqlite_wal_bytes" not in metrics
        return
    size = os.path.getsize(f"{database}-wal")
    assert size > 0 and f"tracker_sqlite_wal_bytes {float(size)}" in metrics


async def test_a_scrape_waits_boundedly_for_the_database_figures_and_scrapes_share_one_read(
    tracker: AvailabilityTracker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At 1,000,000 peers the under-replicated count took 28-48 s a scrape, past Prometheus's
    timeout, and each scrape started one more (QA round 20)."""
    app = create_app(tracker)
    api = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tracker.test")
    await api.post("/v1/content/available", json={"cid": "c", "peer_id": "p"})
    assert "tracker_under_replicated_contents 1.0" in (await api.get("/metrics")).text
    real, reads, gate = tracker.under_replicated_count, [], asyncio.Event()

    async def slow() -> int:  # a count that takes its time, as at scale
        reads.append(1)
        await gate.wait()
        return await real()

    monkeypatch.setattr(tracker, "under_replicated_count", slow)
    monkeypatch.setattr(metrics_module, "REFRESH_WAIT_S", 0.05)
    for holder in ("q", "r"):
        await api.post("/v1/content/available", json={"cid": "c", "peer_id": holder})
    scrapes = [(await api.get("/metrics")).text for _ in range(3)]
    assert all("tracker_under_replicated_contents 1.0" in text for text in scrapes)  # the last figure
    assert len(reads) == 1  # one read, shared
    gate.set()
    await asyncio.sleep(0.05)
    fresh = (await api.get("/metrics")).text
    assert "tracker_under_replicated_contents 0.0" in fresh and "tracker_peers 3.0" in fresh
    await api.aclose()


async def test_a_schema_downgraded_under_the_service_is_said_not_retry_later(
    tracker: AvailabilityTracker, api: httpx.AsyncClient
) -> None:
    """A database downgraded under running processes answered every write that needs what it dropped
    with 503 "the database is unavailable; retry later", which no retry could change (QA round 47).
    The answer says what is wrong and what to run."""
    async with tracker.engine.begin() as conn:  # what `tracker db downgrade 0014` drops
        await conn.exec_driver_sql("DROP INDEX IF EXISTS ix_content_peers_tombstones")
        await conn.exec_driver_sql("ALTER TABLE content_peers DROP COLUMN removed_at")
    answer = await api.post("/v1/content/unavailable", json={"cid": "c", "peer_id": "p"})
    assert answer.status_code == 503
    error = answer.json()["error"]
    assert error["code"] == "storage_unavailable" and "retry later" not in error["message"]
    assert "tracker db check" in error["message"]

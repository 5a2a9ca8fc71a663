"""Hostile input through the API, on each engine: each request gets a clear 4xx (never a 500), nothing
changes, and the service keeps answering. Valid-but-nasty ids are stored and returned exactly."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tracker import AvailabilityTracker
from tracker.service import ServiceSettings
from tracker.service.app import create_app

NASTY_BUT_VALID = [
    "x'; DROP TABLE peers; --",
    'quote"double\\backslash',
    "пир-🙂-中文-é-\u200b-\U0001d518",
    "%s %d {0} ${x} $(rm -rf /)",
    "a" * 256,
    "../../etc/passwd",
]

MEGABYTE = "x" * (1 << 20)


def _nested(depth: int) -> str:
    return '{"peer_id": "p", "x": ' + "[" * depth + "]" * depth + "}"


HOSTILE: list[tuple[str, str, Any]] = [
    ("/v1/peers/online", "json", {"peer_id": "a\x00b"}),
    ("/v1/peers/online", "json", {"peer_id": "line\nbreak"}),
    ("/v1/peers/online", "json", {"peer_id": "\x1b[31mred"}),
    ("/v1/peers/online", "json", {"peer_id": MEGABYTE}),
    ("/v1/peers/online", "json", {"peer_id": "a" * 257}),
    ("/v1/peers/online", "json", {"peer_id": ""}),
    ("/v1/peers/online", "json", {"peer_id": 12345}),
    ("/v1/peers/online", "json", {"peer_id": ["list"]}),
    ("/v1/peers/online", "json", {"peer_id": None}),
    ("/v1/peers/online", "json", {"peer_id": "ok", "at": -1}),
    ("/v1/peers/online", "json", {"peer_id": "ok", "at": 10**30}),
    ("/v1/peers/online", "json", {"peer_id": "ok", "unexpected": 1}),
    ("/v1/peers/speed", "json", {"peer_id": "ok", "bytes_per_sec": -5}),
    ("/v1/peers/speed", "json", {"peer_id": "ok", "bytes_per_sec": 10**40}),
    ("/v1/peers/speed", "json", {"peer_id": "ok", "bytes_per_sec": "fast"}),
    ("/v1/peers/speed", "raw", '{"peer_id": "ok", "bytes_per_sec": NaN}'),
    ("/v1/peers/speed", "raw", '{"peer_id": "ok", "bytes_per_sec": Infinity}'),
    ("/v1/peers/speed", "raw", '{"peer_id": "ok", "bytes_per_sec": 1e309}'),
    ("/v1/peers/outcomes", "json", {"peer_id": "ok", "success": "yes"}),
    ("/v1/peers/outcomes", "json", {"peer_id": "ok", "success": True, "bytes": -1}),
    ("/v1/content/available", "json", {"cid": "c\x07", "peer_id": "ok"}),
    ("/v1/peers/online", "raw", "{not json"),
    ("/v1/peers/online", "raw", "[]"),
    ("/v1/peers/online", "raw", '"just a string"'),
    ("/v1/peers/online", "raw", ""),
    ("/v1/peers/online", "raw", _nested(100_000)),
    ("/v1/events", "json", {"events": [{"type": "peer_online", "peer_id": "ok"}] * 50_001}),
    ("/v1/events", "json", {"events": [{"type": "peer_online", "peer_id": "ok"}, {"type": "peer_online"}]}),
    ("/v1/events", "json", {"events": "all of them"}),
    ("/v1/events", "raw", "x" * (9 << 20)),
]


@pytest.fixture
async def api(tracker: AvailabilityTracker) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(tracker, ServiceSettings(rate_limit_per_s=0))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        yield client


async def test_nasty_but_valid_ids_are_stored_and_returned_exactly(api: httpx.AsyncClient) -> None:
    for peer in NASTY_BUT_VALID:
        assert (await api.post("/v1/peers/online", json={"peer_id": peer})).status_code == 200
        assert (
            await api.post("/v1/content/available", json={"cid": peer, "peer_id": peer})
        ).status_code == 200
    for peer in NASTY_BUT_VALID:
        shown = await api.get(f"/v1/peers/{quote(peer, safe='')}")
        assert shown.status_code == 200, (peer, shown.text)
        assert shown.json()["peer_id"] == peer
    stats = (await api.get("/v1/stats")).json()
    assert stats["peers_total"] == len(NASTY_BUT_VALID)


@pytest.mark.parametrize("path, kind, body", HOSTILE, ids=[f"{i:02d}" for i in range(len(HOSTILE))])
async def test_hostile_requests_get_a_clear_4xx_and_change_nothing(
    api: httpx.AsyncClient, path: str, kind: str, body: Any
) -> None:
    await api.post("/v1/peers/online", json={"peer_id": "existing"})
    before = (await api.get("/v1/stats")).json()
    if kind == "json":
        response = await api.post(
            path, content=json.dumps(body), headers={"content-type": "application/json"}
        )
    else:
        response = await api.post(path, content=body.encode(), headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    error = response.json()["error"]
    assert error["code"] and error["message"]
    after = (await api.get("/v1/stats")).json()
    assert {k: after[k] for k in ("peers_total", "contents_total", "mappings_available")} == {
        k: before[k] for k in ("peers_total", "contents_total", "mappings_available")
    }
    assert (await api.get("/healthz")).status_code == 200

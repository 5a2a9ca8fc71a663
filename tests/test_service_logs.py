"""Service logs: one line per request carrying its request id; JSON lines parse and keep extra fields."""

from __future__ import annotations

import json
import logging
import shlex

import httpx
import pytest
from gossip_helpers import KEY

from tracker import AvailabilityTracker, TrackerConfig
from tracker.gossip.agent import GOSSIP_PATH, GossipAgent
from tracker.gossip.config import GossipConfig
from tracker.service import create_app
from tracker.service.logs import JsonFormatter, TextFormatter, configure_logging
from tracker.service.settings import ServiceSettings


def _record(**extra: object) -> logging.LogRecord:
    record = logging.LogRecord(
        "tracker.access", logging.INFO, __file__, 1, "GET %s %d", ("/healthz", 200), None
    )
    record.__dict__.update(extra)
    return record


def test_json_lines_carry_the_message_and_every_extra_field() -> None:
    line = json.loads(JsonFormatter().format(_record(request_id="abc", duration_ms=1.5)))
    assert line["message"] == "GET /healthz 200"
    assert (line["level"], line["logger"]) == ("info", "tracker.access")
    assert (line["request_id"], line["duration_ms"]) == ("abc", 1.5)


def test_text_lines_append_extra_fields_as_key_value_pairs() -> None:
    line = TextFormatter().format(_record(request_id="abc"))
    assert line.endswith("GET /healthz 200 request_id=abc")


def test_uvicorns_coloured_copy_of_the_message_is_left_out() -> None:
    coloured = "Started server process [\x1b[36m%d\x1b[0m]"
    for formatter in (TextFormatter(), JsonFormatter()):
        line = formatter.format(_record(request_id="abc", color_message=coloured))
        assert "\x1b" not in line and "color_message" not in line and "request_id" in line


async def test_each_request_logs_one_access_line_with_its_request_id(
    tracker: AvailabilityTracker, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(tracker)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as api:
        with caplog.at_level(logging.INFO, logger="tracker.access"):
            response = await api.post(
                "/v1/peers/online", json={"peer_id": ""}, headers={"X-Request-ID": "req-7"}
            )
    assert response.status_code == 422
    lines = [r for r in caplog.records if r.name == "tracker.access"]
    assert len(lines) == 1
    assert (lines[0].request_id, lines[0].status, lines[0].path) == ("req-7", 422, "/v1/peers/online")


async def test_a_path_cannot_write_fields_of_its_choosing_into_the_access_line(
    tracker: AvailabilityTracker, caplog: pytest.LogCaptureFixture
) -> None:
    """``/v1/peers/x%20status=200%20client=10.9.9.9`` wrote ``status=200 client=10.9.9.9`` into the
    text line as fields (QA round 68): the message shows the path as sent, a field with blanks is
    quoted."""
    app = create_app(tracker)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as api:
        with caplog.at_level(logging.INFO, logger="tracker.access"):
            await api.get("/v1/peers/x%20status=200%20client=10.9.9.9%20request_id=forged")
    record = next(r for r in caplog.records if r.name == "tracker.access")
    line = TextFormatter().format(record)
    assert "GET /v1/peers/x%20status=200%20client=10.9.9.9%20request_id=forged 404" in line, line
    assert ' path="/v1/peers/x status=200 client=10.9.9.9 request_id=forged" status=404' in line, line
    fields = dict(word.split("=", 1) for word in shlex.split(line) if "=" in word and "%" not in word)
    assert (fields["status"], fields["client"]) == ("404", "127.0.0.1:123"), fields
    assert fields["request_id"] != "forged" and fields["path"].endswith("request_id=forged"), fields
    quoted = TextFormatter().format(_record(note='say "hi" \\ bye', empty=""))
    assert quoted.endswith('note="say \\"hi\\" \\\\ bye" empty=""'), quoted


async def test_probes_and_scrapes_that_succeed_are_logged_at_debug_and_their_failures_at_info(
    tracker: AvailabilityTracker, caplog: pytest.LogCaptureFixture
) -> None:
    """Orchestrators probe every few seconds and Prometheus scrapes: at INFO they made most of the
    access log (QA round 16: ~28 lines/s per process)."""
    app = create_app(tracker)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as api:
        with caplog.at_level(logging.DEBUG, logger="tracker.access"):
            for path in ("/healthz", "/readyz", "/metrics", "/v1/stats"):
                await api.get(path)
            await api.post("/healthz")
    levels = {(r.path, r.status): r.levelno for r in caplog.records if r.name == "tracker.access"}
    assert levels == {
        ("/healthz", 200): logging.DEBUG,
        ("/readyz", 200): logging.DEBUG,
        ("/metrics", 200): logging.DEBUG,
        ("/v1/stats", 200): logging.INFO,
        ("/healthz", 405): logging.INFO,
    }


async def test_gossip_exchanges_that_succeed_are_logged_at_debug_and_refusals_at_info(
    tracker: AvailabilityTracker, other_db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Every neighbour's exchange made an INFO access line: with a mesh gossiping every few seconds,
    a third of the log (QA round 24: ~2,100 lines/min per process). The agent counts exchanges in
    /metrics and logs its own failures and refusals."""
    config = GossipConfig(keys=(KEY,))
    app = create_app(tracker, gossip=GossipAgent(tracker, config))
    async with (
        AvailabilityTracker(TrackerConfig(database_url=other_db_url, clock=tracker.config.clock)) as other,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as api,
    ):

        async def send(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
            answer = await api.post(url, content=body, headers=headers)
            return answer.status_code, answer.content, dict(answer.headers)

        neighbour = GossipAgent(other, config, transport=send)
        await other.record_peer_online("p")
        with caplog.at_level(logging.DEBUG, logger="tracker.access"):
            await neighbour.exchange("http://t")
            await api.post(GOSSIP_PATH, content=b"not a message", headers={"Authorization": "x"})
    levels = {(r.path, r.status, r.levelno) for r in caplog.records if r.name == "tracker.access"}
    assert (GOSSIP_PATH, 200, logging.DEBUG) in levels
    assert not [entry for entry in levels if entry[1] == 200 and entry[2] != logging.DEBUG]
    assert [entry for entry in levels if entry[1] >= 400] == [(GOSSIP_PATH, 401, logging.INFO)]


def test_alembic_context_lines_are_dropped_and_its_migration_lines_kept(
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        configure_logging(json_lines=False, level="info")
        migration = logging.getLogger("alembic.runtime.migration")
        migration.info("Context impl %s.", "SQLiteImpl")
        migration.info("Will assume non-transactional DDL.")
        migration.info("Running upgrade %s -> %s", "0007", "0008")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    err = capsys.readouterr().err
    assert "Running upgrade 0007 -> 0008" in err
    assert "Context impl" not in err and "Will assume" not in err


def test_httpxs_line_per_gossip_request_is_left_out(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    httpx_level = logging.getLogger("httpx").level
    try:
        configure_logging(json_lines=False, level="info")
        logging.getLogger("httpx").info(
            'HTTP Request: POST http://127.0.0.1:8751/v1/gossip "HTTP/1.1 200 OK"'
        )
        logging.getLogger("httpx").warning("a warning still shows")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.getLogger("httpx").setLevel(httpx_level)
    err = capsys.readouterr().err
    assert "HTTP Request" not in err and "a warning still shows" in err


async def test_a_control_character_in_a_path_cannot_forge_a_text_log_line(
    tracker: AvailabilityTracker, caplog: pytest.LogCaptureFixture
) -> None:
    """A refused path with a percent-encoded newline wrote a line of the attacker's choosing (QA
    round 6); escaped, the request is one line whatever its path."""
    app = create_app(tracker)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as api:
        with caplog.at_level(logging.INFO, logger="tracker.access"):
            response = await api.get("/v1/peers/a%0aINFO tracker.access GET /admin 200%1b[2J")
    assert response.status_code == 422
    (record,) = [r for r in caplog.records if r.name == "tracker.access"]
    line = TextFormatter().format(record)
    assert "\n" not in line and "\x1b" not in line
    # The message shows the path as sent; the path field, escaped, then quoted (QA round 68).
    assert "GET /v1/peers/a%0aINFO%20tracker.access%20GET%20/admin%20200%1b[2J 422" in line, line
    fields = dict(word.split("=", 1) for word in shlex.split(line) if word.startswith("path="))
    assert fields["path"] == "/v1/peers/a\\nINFO tracker.access GET /admin 200\\x1b[2J", fields


async def test_with_the_access_log_off_successes_go_to_debug_and_refusals_stay(
    tracker: AvailabilityTracker, caplog: pytest.LogCaptureFixture
) -> None:
    """A line of ~220 bytes per heartbeat made ~630 MB a day per 1,000 peers, and the only way down
    was log_level=warning, which hid the sweeper's lines too (QA round 73)."""
    app = create_app(tracker, ServiceSettings(access_log=False))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as api:
        with caplog.at_level(logging.DEBUG, logger="tracker.access"):
            assert (await api.post("/v1/peers/online", json={"peer_id": "p"})).status_code == 200
            assert (await api.post("/v1/peers/online", json={"peer_id": ""})).status_code == 422
    lines = [(r.levelno, r.status) for r in caplog.records if r.name == "tracker.access"]
    assert lines == [(logging.DEBUG, 200), (logging.INFO, 422)]
    assert ServiceSettings.from_env({"TRACKER_ACCESS_LOG": "off"}).access_log is False
    assert ServiceSettings().access_log is True

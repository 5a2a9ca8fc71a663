"""``tracker serve`` as a real process on a loopback port: start, requests, SIGTERM, clean exit, data kept.

Also the API fuzzed from its own OpenAPI schema (schemathesis) against that real server: whatever a
client sends, the answer is never a 500 and always matches the documented schema.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy.engine import make_url

from tracker import AvailabilityTracker, TrackerConfig
from tracker.service import ServiceSettings
from tracker.service.server import _bind

pytestmark = pytest.mark.slow
TOKEN = "fuzz-token-0123456789abcdef"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Server:
    """A ``tracker serve`` child process; its combined output goes to a file, read on failure."""

    def __init__(self, db_url: str, log: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [
            sys.executable,
            "-m",
            "tracker",
            "serve",
            "--database-url",
            db_url,
            "--port",
            str(self.port),
        ]
        with log.open("wb") as sink:
            self.process = subprocess.Popen(
                [*command, *extra], stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"tracker serve exited with {self.process.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.base_url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.05)
        pytest.fail(f"tracker serve was not ready within {timeout_s} s:\n{self.output()}")

    def exit_code_within(self, timeout_s: float, after: str) -> int:
        """Wait for the process to exit; fail, naming what it should have exited ``after``, if it does not."""
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"tracker serve still running {timeout_s:g} s after {after}:\n{self.output()}")

    def kill(self) -> None:
        """End the process if it is still running (the clean-up of a test that failed)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            pytest.fail(f"tracker serve ignored {sig.name} for 30 s:\n{self.output()}")


@pytest.fixture
def server(db_url: str, tmp_path: Path) -> Iterator[Server]:
    running = Server(db_url, tmp_path / "serve.log", env={"TRACKER_API_TOKEN": TOKEN})
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


def test_the_listening_address_is_logged_whatever_the_log_level(db_url: str, tmp_path: Path) -> None:
    """With ``--port 0`` it is the only way to learn the port; a warning level hid it (QA round 11)."""
    server = Server(db_url, tmp_path / "serve.log", env={"TRACKER_LOG_LEVEL": "warning"})
    try:
        server.wait_ready()
    finally:
        assert server.stop() == 0
    assert f"listening on http://127.0.0.1:{server.port}" in server.output()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_answers_then_exits_cleanly_on_a_signal_and_keeps_what_it_acknowledged(
    db_url: str, tmp_path: Path, sig: signal.Signals
) -> None:
    server = Server(db_url, tmp_path / "serve.log")
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.base_url, timeout=10) as client:
            events = [
                {"type": "peer_online", "peer_id": "peer-1"},
                {"type": "content_available", "cid": "cid-1", "peer_id": "peer-1"},
                {"type": "speed_sample", "peer_id": "peer-1", "bytes_per_sec": 3_000_000},
            ]
            assert client.post("/v1/events", json={"events": events}).json() == {"applied": 3}
            best = client.get("/v1/content/cid-1/best", params={"n": 3}).json()
            assert [peer["peer_id"] for peer in best["peers"]] == ["peer-1"]
            assert "tracker_events_ingested_total" in client.get("/metrics").text
    finally:
        code = server.stop(sig)
    output = server.output()
    assert code == 0, output
    assert "listening on http://127.0.0.1:" in output and "stopped" in output
    assert "Traceback" not in output

    async def reopened() -> tuple[int, bool]:
        async with AvailabilityTracker(TrackerConfig(database_url=db_url)) as tracker:
            metrics = await tracker.get_peer_metrics("peer-1")
            assert metrics is not None
            return metrics.download_speed, "peer-1" in await tracker.get_available_peers("cid-1")

    assert asyncio.run(reopened()) == (3_000_000, True)


@pytest.mark.parametrize(
    ("exists", "says"),
    [(True, "the database schema is at revision none"), (False, "no database at ")],
)
def test_serve_refuses_a_database_behind_its_schema_with_no_migrate(
    tmp_path: Path, exists: bool, says: str
) -> None:
    """An empty file is a database with no schema; a path with no file (a typo) is left without one."""
    database = tmp_path / "empty.db"
    if exists:
        database.touch()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tracker",
            "serve",
            "--no-migrate",
            "--port",
            "0",
            "--database-url",
            f"sqlite+aiosqlite:///{database}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {says}"), result.stderr
    assert "Traceback" not in result.stderr
    assert database.exists() == exists


def test_serve_without_a_token_answers_only_requests_addressed_to_this_machine(
    db_url: str, tmp_path: Path
) -> None:
    """Without a token the service is open to this machine only; a web page whose name its attacker
    re-points at 127.0.0.1 (DNS rebinding) reached it as this machine: it read, wrote and took
    leases (QA round 68). Its ``Host`` names the page: 421. With a token, any name is answered."""
    open_server = Server(db_url, tmp_path / "open.log")
    try:
        open_server.wait_ready()
        url, body = f"{open_server.base_url}/v1/peers/online", {"peer_id": "p1"}
        refused = httpx.post(url, json=body, headers={"Host": "rebind.attacker.example"}, timeout=10)
        assert refused.status_code == 421 and refused.json()["error"]["code"] == "misdirected_request"
        assert "rebind.attacker.example" in refused.json()["error"]["message"]
        assert (
            httpx.get(f"{open_server.base_url}/v1/peers/p1", timeout=10).status_code == 404
        )  # nothing written
        for host in (
            f"localhost:{open_server.port}",
            "127.0.0.1",
            f"[::1]:{open_server.port}",
            "a.localhost",
        ):
            answer = httpx.post(url, json=body, headers={"Host": host}, timeout=10)
            assert answer.status_code == 200, (host, answer.text)
    finally:
        assert open_server.stop() == 0
    guarded = Server(db_url, tmp_path / "guarded.log", env={"TRACKER_API_TOKEN": TOKEN})
    try:
        guarded.wait_ready()
        answer = httpx.get(f"{guarded.base_url}/v1/stats", headers={"Host": "tracker.example"}, timeout=10)
        assert answer.status_code == 200
    finally:
        assert guarded.stop() == 0


def test_serve_refuses_a_public_address_without_a_token(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tracker",
            "serve",
            "--host",
            "0.0.0.0",
            "--database-url",
            f"sqlite+aiosqlite:///{tmp_path / 't.db'}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "TRACKER_API_TOKEN"},
    )
    assert result.returncode == 1
    assert "api_token" in result.stderr and "Traceback" not in result.stderr


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
def test_fuzzed_requests_never_get_a_500_or_an_undocumented_answer(
    server: Server, mode: schemathesis.GenerationMode
) -> None:
    schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")
    checks = [*CHECKS, negative_data_rejection] if mode is schemathesis.GenerationMode.NEGATIVE else CHECKS

    @settings(
        max_examples=150,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=schema.as_strategy(mode))
    def fuzz(case: schemathesis.Case) -> None:
        case.call_and_validate(
            base_url=server.base_url, headers={"Authorization": f"Bearer {TOKEN}"}, checks=checks
        )

    fuzz()
    assert server.process.poll() is None, "the server died under fuzzing"


class _WriteBlocker:
    """Holds the database's write lock from outside the tracker (Postgres: an exclusive lock on
    ``peers``; SQLite: ``BEGIN IMMEDIATE``), so the tracker's writes wait in the database."""

    def __init__(self, db_url: str, table: str = "peers") -> None:
        self._db_url = db_url
        self._table = table
        self._release = threading.Event()
        self._locked = threading.Event()
        self._thread = threading.Thread(target=self._hold, daemon=True)

    def __enter__(self) -> _WriteBlocker:
        self._thread.start()
        assert self._locked.wait(10), "could not take the write lock"
        return self

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        self._thread.join(10)

    def _hold(self) -> None:
        url = make_url(self._db_url)
        if url.get_backend_name() == "sqlite":
            conn = sqlite3.connect(str(url.database), isolation_level=None)
            try:
                conn.execute("BEGIN IMMEDIATE")
                self._locked.set()
                self._release.wait(60)
                conn.execute("ROLLBACK")
            finally:
                conn.close()
            return

        async def hold() -> None:
            dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
            conn = await asyncpg.connect(dsn)
            try:
                async with conn.transaction():
                    await conn.execute(f"LOCK TABLE {self._table} IN ACCESS EXCLUSIVE MODE")
                    self._locked.set()
                    await asyncio.to_thread(self._release.wait, 60)
            finally:
                await conn.close()

        asyncio.run(hold())


def test_a_second_sigint_exits_promptly_while_a_write_waits_in_the_database(
    db_url: str, tmp_path: Path
) -> None:
    """Ctrl-C twice: the first starts the graceful shutdown (which waits for the blocked write), the
    second abandons it. The process exits within seconds, with 130 and a line saying so, no traceback.

    Postgres waits for a lock up to ``pg_lock_timeout_s`` (30 s) a try, and retries; SQLite's wait
    (its busy handler, in a lane thread, which nothing interrupts) up to ``sqlite_busy_timeout_s``
    (30 s): the process outlived it, and then committed the write it had answered 503 for (QA round
    16). It exits without waiting for that thread, and the write is never stored.
    """
    env = {"TRACKER_SHUTDOWN_GRACE_S": "60"}
    server = Server(db_url, tmp_path / "serve.log", env=env)
    try:
        server.wait_ready()
        with _WriteBlocker(db_url):
            writer, outcome = _post_in_background(server)
            time.sleep(0.5)  # the write is in the database, waiting for the lock
            assert not outcome, outcome
            server.process.send_signal(signal.SIGINT)
            time.sleep(0.5)
            assert server.process.poll() is None, "the first SIGINT did not wait for the blocked write"
            started = time.monotonic()
            server.process.send_signal(signal.SIGINT)
            code = server.exit_code_within(10, "a second SIGINT")
            elapsed = time.monotonic() - started
            writer.join(10)
    finally:
        server.kill()
    output = server.output()
    assert code == 130, output
    assert elapsed < 5, output
    assert "forced shutdown" in output and "Traceback" not in output, output
    # The abandoned write was never acknowledged, nor stored once the lock was free.
    assert outcome and getattr(outcome[0], "status_code", None) != 200, outcome
    assert _peer_keys(db_url) == set()


def _peer_keys(db_url: str) -> set[str]:
    url = make_url(db_url)
    if url.get_backend_name() == "sqlite":
        conn = sqlite3.connect(str(url.database))
        try:
            return {key for (key,) in conn.execute("SELECT peer_key FROM peers")}
        finally:
            conn.close()

    async def read() -> set[str]:
        conn = await asyncpg.connect(url.set(drivername="postgresql").render_as_string(hide_password=False))
        try:
            return {row[0] for row in await conn.fetch("SELECT peer_key FROM peers")}
        finally:
            await conn.close()

    return asyncio.run(read())


def test_a_signal_after_the_service_stopped_does_not_turn_a_clean_exit_into_a_death_by_signal(
    db_url: str, tmp_path: Path
) -> None:
    """The earlier handlers came back once the tracker was closed, ~0.5 s before the process ended:
    a second SIGTERM then killed it, exit 143 after a clean stop (QA round 16)."""
    server = Server(db_url, tmp_path / "serve.log")
    try:
        server.wait_ready()
        server.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while "action=stopped" not in server.output():
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.005)
        server.process.send_signal(signal.SIGTERM)
        code = server.exit_code_within(30, "two SIGTERMs")
    finally:
        server.kill()
    assert code == 0, server.output()


def _post_in_background(
    server: Server,
) -> tuple[threading.Thread, list[httpx.Response | httpx.TransportError]]:
    """One event POSTed from a thread, so that the test can signal the server while it waits; the
    answer (or the failure to get one) lands in the list."""
    outcome: list[httpx.Response | httpx.TransportError] = []

    def post() -> None:
        try:
            event = {"type": "peer_online", "peer_id": "peer-1"}
            outcome.append(httpx.post(f"{server.base_url}/v1/events", json={"events": [event]}, timeout=60))
        except httpx.TransportError as error:
            outcome.append(error)

    writer = threading.Thread(target=post, daemon=True)
    writer.start()
    return writer, outcome


def _wait_until_a_session_waits_for_a_lock(db_url: str, timeout_s: float = 10.0) -> None:
    async def poll() -> None:
        conn = await asyncpg.connect(make_url(db_url).set(drivername="postgresql").render_as_string(False))
        try:
            waiting = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            while not await conn.fetchval(f"{waiting} AND wait_event_type = 'Lock'"):
                await asyncio.sleep(0.02)
        finally:
            await conn.close()

    asyncio.run(asyncio.wait_for(poll(), timeout_s))


@pytest.mark.parametrize("engine_name", ["postgresql"], indirect=True)
def test_one_sigint_is_enough_while_a_postgres_lock_blocks_a_write(db_url: str, tmp_path: Path) -> None:
    """Postgres waited for a lock without end, and so did the graceful shutdown of the first Ctrl-C.
    Now the write gives up after its lock timeouts (503 storage_busy) while the lock is still held, and
    the shutdown ends cleanly."""
    env = {"TRACKER_PG_LOCK_TIMEOUT_S": "2", "TRACKER_WRITE_RETRIES": "1", "TRACKER_SHUTDOWN_GRACE_S": "60"}
    server = Server(db_url, tmp_path / "serve.log", env=env)
    try:
        server.wait_ready()
        with _WriteBlocker(db_url):
            writer, outcome = _post_in_background(server)
            _wait_until_a_session_waits_for_a_lock(db_url)
            server.process.send_signal(signal.SIGINT)
            code = server.exit_code_within(30, "SIGINT, behind a lock")  # two lock timeouts: ~5 s
            writer.join(10)
    finally:
        server.kill()
    output = server.output()
    assert code == 0 and "Traceback" not in output, output
    assert len(outcome) == 1 and isinstance(outcome[0], httpx.Response), outcome
    assert outcome[0].status_code == 503 and outcome[0].json()["error"]["code"] == "storage_busy"


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_the_service_socket_answers_without_waiting_for_the_clients_ack(host: str) -> None:
    """Bound with proto 0, asyncio left Nagle on for every accepted connection: each answer on a
    kept-alive connection waited ~40 ms for the client's delayed ACK (QA round 20)."""
    sock = _bind(host, 0)
    nodelay: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nodelay.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(accepted, sock=sock)  # as uvicorn serves it
    try:
        _, writer = await asyncio.open_connection(host, sock.getsockname()[1])
        assert await asyncio.wait_for(nodelay, 5) != 0
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


def _http_answer(conn: socket.socket) -> bytes:
    """One whole HTTP/1.1 answer with a Content-Length (headers and body may come in two segments)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head)[1])  # type: ignore[index]
    while len(body) < length:
        body += conn.recv(4096)
    return data if len(body) == length else head + b"\r\n\r\n" + body


@pytest.mark.parametrize("engine_name", ["sqlite"], indirect=True)
def test_an_idle_connection_is_kept_for_keep_alive_s(db_url: str, tmp_path: Path) -> None:
    """uvicorn's own 5 s was shorter than clients keep theirs (httpx: 5 s), so a client could send on
    a connection the server was closing and get no answer (QA round 24). The setting reaches uvicorn:
    at 1 s an idle connection is closed about then; by default the server outlasts common clients."""
    assert ServiceSettings().keep_alive_s > 15  # aiohttp keeps 15 s, httpx 5 s
    running = Server(db_url, tmp_path / "serve.log", env={"TRACKER_KEEP_ALIVE_S": "1"})
    try:
        running.wait_ready()
        with socket.create_connection(("127.0.0.1", running.port), timeout=15) as conn:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = _http_answer(conn)
            assert answer.startswith(b"HTTP/1.1 200")
            idle = time.monotonic()
            assert conn.recv(4096) == b""  # closed by the server
            assert time.monotonic() - idle < 4  # uvicorn's default would be 5 s
    finally:
        running.stop()


@pytest.mark.parametrize("engine_name", ["sqlite"], indirect=True)
def test_connections_without_their_headers_are_closed_and_their_number_is_capped(
    db_url: str, tmp_path: Path
) -> None:
    """uvicorn kept a connection that sent nothing, or its headers a byte at a time, for good: 300 of
    them under a 256-file limit starved /healthz (QA round 68). Headers now have header_timeout_s
    (from the connection's opening, or a kept-alive connection's next byte), and connections past
    max_connections are closed as they open."""
    env = {"TRACKER_HEADER_TIMEOUT_S": "1", "TRACKER_MAX_CONNECTIONS": "4", "TRACKER_KEEP_ALIVE_S": "30"}
    running = Server(db_url, tmp_path / "serve.log", env=env)
    try:
        running.wait_ready()
        address = ("127.0.0.1", running.port)
        with (
            socket.create_connection(address, timeout=10) as silent,
            socket.create_connection(address, timeout=10) as trickle,
            socket.create_connection(address, timeout=10) as kept,
        ):
            trickle.sendall(b"GET /healthz HTTP/1.1\r\n")  # and never the rest
            kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert _http_answer(kept).startswith(b"HTTP/1.1 200")
            kept.sendall(b"GET /healthz HTTP/1.1\r\n")  # the next request's headers, cut
            started = time.monotonic()
            assert silent.recv(4096) == b"" and trickle.recv(4096) == b"" and kept.recv(4096) == b""
            assert time.monotonic() - started < 5  # not keep_alive_s (30 s), nor never
    finally:
        running.stop()
    # Four open (three idle and the one that asks): a fifth is closed as it opens.
    env["TRACKER_HEADER_TIMEOUT_S"] = "60"
    running = Server(db_url, tmp_path / "serve2.log", env=env)
    try:
        running.wait_ready()
        time.sleep(0.3)  # the readiness probe's connection is gone on the server's side too
        address = ("127.0.0.1", running.port)
        idle = [socket.create_connection(address, timeout=10) for _ in range(3)]
        try:
            with socket.create_connection(address, timeout=10) as asking:
                asking.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                assert _http_answer(asking).startswith(b"HTTP/1.1 200")
                with socket.create_connection(address, timeout=10) as fifth:
                    fifth.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                    with contextlib.suppress(ConnectionResetError):
                        assert fifth.recv(4096) == b""
        finally:
            for conn in idle:
                conn.close()
        assert httpx.get(f"{running.base_url}/healthz", timeout=5).status_code == 200
        assert "are open, max_connections" in running.output()
    finally:
        running.stop()


@pytest.mark.parametrize("engine_name", ["postgresql"], indirect=True)
@pytest.mark.parametrize("second", [False, True])
def test_a_signal_while_the_tracker_opens_stops_it_before_it_serves(
    db_url: str, tmp_path: Path, second: bool
) -> None:
    """A signal while the tracker opened (here behind a lock; migrations can take as long) killed the
    process: 143 for SIGTERM where a clean stop exits 0 (QA round 40). Now one stops it once open,
    without serving, exit 0; a second abandons the opening, exit 130. Postgres, where a test can see
    the opening wait for the lock."""
    server = Server(db_url, tmp_path / "serve.log")
    try:
        with _WriteBlocker(db_url, table="tracker_nodes"):
            _wait_until_a_session_waits_for_a_lock(db_url, timeout_s=30)
            server.process.send_signal(signal.SIGTERM)
            if second:
                time.sleep(0.2)
                server.process.send_signal(signal.SIGTERM)
                code = server.exit_code_within(10, "two SIGTERMs while opening")
            else:
                time.sleep(0.5)
                assert server.process.poll() is None, server.output()
        if not second:
            code = server.exit_code_within(30, "a SIGTERM while opening")
    finally:
        server.kill()
    output = server.output()
    assert "Traceback" not in output and "listening on" not in output, output
    if second:
        assert code == 130 and "a second signal abandoned the tracker's opening" in output, output
    else:
        assert code == 0 and "closing it without serving" in output, output

"""``serve``: open the tracker, run the HTTP API with uvicorn, shut down cleanly on SIGINT/SIGTERM.

Order of shutdown, each step finishing before the next: stop accepting connections, let in-flight
requests finish (up to ``shutdown_grace_s``), stop gossip and the sweeper, let queued writes commit, close the
database. A signal-initiated shutdown is a normal exit (code 0), not a death by signal.

A second signal while shutting down forces it: uvicorn stops waiting for requests, and whatever still
waits on the database (a write blocked on a lock, say: Postgres has no timeout for that) is
cancelled; ``serve`` then raises ``ForcedShutdown``. The signals are ours from before the tracker
opens until it is closed (and, for the process's owner, ``owns_process``, until it exits): one that
comes while it opens stops it once open, before it serves, and a second abandons the opening.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import signal
import socket
import threading
from collections.abc import Iterator
from types import FrameType

import uvicorn

from ..config import TrackerConfig
from ..core import AvailabilityTracker
from ..errors import ConfigError
from ..gossip.agent import GossipAgent
from ..gossip.config import GossipConfig
from .app import create_app
from .guard import default_max_connections, guarded_protocol
from .settings import ServiceSettings

log = logging.getLogger("tracker.service")
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class ForcedShutdown(Exception):
    """A second signal cut the shutdown short: in-flight requests and unwritten events were abandoned."""


#: How long a forced shutdown waits for cancelled work, and then for the database to close.
_FORCE_GRACE_S = 2.0
#: How long requests whose writes were abandoned get to answer 503 before they are cancelled.
_ANSWER_S = 0.2


class _Server(uvicorn.Server):
    """uvicorn's server, minus its signal handling: ``_Signals`` handles them for the whole shutdown.

    uvicorn restores the previous handlers when it stops and re-raises the signal, so that the default
    handler kills the process; we still have a database to close after the server stops (a second
    Ctrl-C must still reach us then), and want exit code 0 for a requested shutdown.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class _Signals:
    """SIGINT and SIGTERM from the tracker's opening until it is closed: the first asks the server for
    a graceful shutdown, any later one forces it (``forced``)."""

    def __init__(self, *, owns_process: bool = False) -> None:
        self._loop = asyncio.get_running_loop()
        self._server: uvicorn.Server | None = None
        self._requested = False
        self._owns_process = owns_process
        self.forced = asyncio.Event()

    @property
    def requested(self) -> bool:
        """Whether a signal has asked the service to stop."""
        return self._requested

    async def open_unless_forced(self, config: TrackerConfig) -> AvailabilityTracker:
        """The tracker, opened, unless a second signal comes first: then the opening is cancelled
        (given ``_FORCE_GRACE_S`` to unwind; a tracker it opened meanwhile is aborted) and
        ``ForcedShutdown`` raised."""
        work = asyncio.ensure_future(AvailabilityTracker.open(config))
        forcing = asyncio.create_task(self.forced.wait(), name="tracker-force")
        try:
            await asyncio.wait({work, forcing}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            work.cancel()
            raise
        finally:
            forcing.cancel()
        if not work.done():
            work.cancel()
            await asyncio.wait({work}, timeout=_FORCE_GRACE_S)
            if work.done() and not work.cancelled() and work.exception() is None:
                opened = work.result()
                opened.abort()
                await asyncio.wait({asyncio.ensure_future(opened.close())}, timeout=_FORCE_GRACE_S)
            raise ForcedShutdown("forced shutdown: a second signal abandoned the tracker's opening")
        return work.result()

    def attach(self, server: uvicorn.Server) -> None:
        self._server = server
        server.should_exit = self._requested

    @contextlib.contextmanager
    def captured(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        originals = {sig: signal.signal(sig, self._handle) for sig in _SIGNALS}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                # Once a signal has stopped the service, the process is on its way out: a later one
                # (in the ~0.5 s it takes to exit) would kill a clean stop with 143 (QA round 16).
                late = self._owns_process and self._requested
                signal.signal(sig, signal.SIG_IGN if late else handler)

    def _handle(self, sig: int, frame: FrameType | None) -> None:
        # Runs between two bytecodes of the loop's thread: only flags, and a thread-safe wake-up.
        server = self._server
        if not self._requested:
            self._requested = True
            if server is not None:
                server.should_exit = True
            return
        if server is not None:
            server.force_exit = True  # uvicorn stops waiting for connections and requests
        self._loop.call_soon_threadsafe(self.forced.set)


class _CancelledRequests(logging.Filter):
    """Drops uvicorn's "Exception in ASGI application" traceback for a request a forced shutdown
    cancelled (one line says so instead)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, asyncio.CancelledError)


async def _announce(server: uvicorn.Server) -> None:
    """Log the bound address once listening (with port 0 the OS picks it; scripts read this line)."""
    while not server.started:
        if server.should_exit:
            return
        await asyncio.sleep(0.05)
    for listener in server.servers:
        for sock in listener.sockets:
            host, port = sock.getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            # At WARNING when that is the configured level: with --port 0 this line is the only way
            # to learn the port, and TRACKER_LOG_LEVEL=warning hid it (QA round 11). Not as an error:
            # alerts on errors would fire at every start (QA round 14).
            level = min(max(logging.INFO, log.getEffectiveLevel()), logging.WARNING)
            log.log(
                level, "listening on http://%s:%d", shown, port, extra={"action": "listening", "port": port}
            )


def _bind(host: str, port: int) -> socket.socket:
    """Bind the service's socket before the tracker opens, so the port is ours from the start.

    Bound as uvicorn binds (``SO_REUSEADDR``, so a port in TIME_WAIT is free; IPv6 when the host has a
    colon) but not listening yet: until the tracker is open, connections are refused rather than
    queued. Raises ``OSError`` naming the address.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not left 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets whose
    # proto says TCP, and with it on, every answer on a kept-alive connection waited ~40 ms for the
    # client's delayed ACK (QA round 20: /healthz p50 44 ms against 2 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise _address_error(host, port, error) from error
    return sock


def _address_error(host: str, port: int, error: OSError) -> OSError:
    return OSError(f"cannot listen on {host}:{port}: {error.strerror or error}")


async def serve(
    config: TrackerConfig,
    settings: ServiceSettings,
    gossip: GossipConfig | None = None,
    *,
    owns_process: bool = False,
) -> None:
    """Run the service until a signal asks it to stop; raises if the tracker cannot open.

    ``owns_process``: the caller exits once this returns (``tracker serve``), so after a signal has
    stopped the service, later signals are ignored rather than given back to their earlier handlers.

    The tracker opens (and migrates, unless ``config.auto_migrate`` is off) before the socket listens,
    so a database problem is one clear error instead of a server that answers 503 forever. Before
    either, the socket is bound and later handed to uvicorn: a taken port fails here, before the
    database is created for nothing, and while the tracker opens only a process that also sets
    ``SO_REUSEADDR`` could bind the port (listening first, it makes this fail with the same error).
    """
    if gossip is not None and gossip.enabled and gossip.max_bytes > settings.max_body_bytes:
        # The service refuses a body over max_body_bytes before gossip reads it, without the
        # X-Gossip-Max-Bytes header that makes senders send smaller: such a tracker took no gossip at
        # all from trackers that sent within its stated gossip limit (QA round 14).
        raise ConfigError(
            f"gossip max_bytes ({gossip.max_bytes}) is above the service's max_body_bytes "
            f"({settings.max_body_bytes}), which refuses bigger requests first: lower "
            "TRACKER_GOSSIP_MAX_BYTES or raise TRACKER_MAX_BODY_BYTES"
        )
    sock = _bind(settings.host, settings.port)
    try:
        await _serve_on(sock, config, settings, gossip, owns_process)
    finally:
        sock.close()


async def _serve_on(
    sock: socket.socket,
    config: TrackerConfig,
    settings: ServiceSettings,
    gossip: GossipConfig | None,
    owns_process: bool,
) -> None:
    signals = _Signals(owns_process=owns_process)
    # The signals are ours while the tracker opens too (migrations can take a while): the first one
    # then stops it once open, before it serves; a second abandons the opening. They killed the
    # process before, exit 130 or 143 where a clean stop exits 0 (QA round 40).
    with signals.captured():
        tracker = await signals.open_unless_forced(config)
        if signals.requested:
            log.info(
                "a signal came while the tracker opened: closing it without serving",
                extra={"action": "stopping"},
            )
            await _close(tracker, None, None, signals)
        else:
            await _serve_open(tracker, sock, config, settings, gossip, signals)
    log.info("stopped", extra={"action": "stopped"})


async def _serve_open(
    tracker: AvailabilityTracker,
    sock: socket.socket,
    config: TrackerConfig,
    settings: ServiceSettings,
    gossip: GossipConfig | None,
    signals: _Signals,
) -> None:
    """Serve the open tracker until a signal stops the server, then close it (``_close``)."""
    agent = GossipAgent(tracker, gossip) if gossip is not None and gossip.enabled else None
    gossiping: asyncio.Task[None] | None = None
    server: uvicorn.Server | None = None
    try:
        app = create_app(tracker, settings, agent, loopback_hosts_only=settings.api_token is None)
        # What start-up built (modules, the schema, compiled statements) lives as long as the
        # process: frozen, the collector's full passes no longer walk it. Those ran ~20 times in
        # one gossip exchange of 20,000 peers, each holding the event loop for up to 86 ms;
        # with the start-up heap frozen, 38 ms at most (measured).
        gc.collect()
        gc.freeze()
        server = _Server(
            uvicorn.Config(
                app,
                host=settings.host,
                port=settings.port,
                lifespan="off",
                log_config=None,
                access_log=False,  # our middleware logs one line per request, with its request id
                server_header=False,
                timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s),
                timeout_keep_alive=math.ceil(settings.keep_alive_s),
                http=guarded_protocol(
                    settings.header_timeout_s,
                    settings.max_connections or default_max_connections(),
                ),
            )
        )
        signals.attach(server)
        if not config.run_sweeper:
            log.info("sweeper disabled: stale peers expire only on reads", extra={"action": "sweeper_off"})
        announcer = asyncio.create_task(_announce(server), name="tracker-announce")
        if agent is not None:
            gossiping = asyncio.create_task(agent.run(), name="tracker-gossip")
            log.info(
                "gossip on: %d neighbour(s), every %.0f s",
                len(agent.neighbors),
                agent.interval,
                extra={"action": "gossip_on"},
            )
        try:
            await server.serve(sockets=[sock])
        except OSError as error:
            if server.started:
                raise
            # Another process listening first on a port bound with SO_REUSEADDR by both.
            raise _address_error(settings.host, settings.port, error) from error
        finally:
            for task in (announcer, gossiping):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        log.info("server stopped; closing the tracker", extra={"action": "stopping"})
    finally:
        gc.unfreeze()  # for a caller that goes on in this process
        await _close(tracker, agent, server, signals)


async def _close(
    tracker: AvailabilityTracker, agent: GossipAgent | None, server: uvicorn.Server | None, signals: _Signals
) -> None:
    """Close gossip and the tracker (letting queued writes commit), unless a second signal forces it."""

    async def close() -> None:
        if agent is not None:
            await agent.aclose()
        await tracker.close()

    closing = asyncio.create_task(close(), name="tracker-close")
    forcing = asyncio.create_task(signals.forced.wait(), name="tracker-force")
    try:
        await asyncio.wait({closing, forcing}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # serve() itself cancelled: so is closing, as when it was awaited directly
        closing.cancel()
        raise
    finally:
        forcing.cancel()
    if closing.done():
        closing.result()
        return
    # Forced: uvicorn has stopped waiting for requests; what still waits (on the database, likely)
    # is abandoned. The writes not yet committed first: requests waiting for them answer 503, and
    # close() goes on to release the connections; requests still running then are cancelled.
    tasks = server.server_state.tasks if server is not None else set()
    requests = [task for task in tasks if not task.done()]
    log.warning(
        "forced shutdown: abandoning %d request(s) and the writes still waiting to commit",
        len(requests),
        extra={"action": "forced_shutdown", "requests": len(requests)},
    )
    quiet = _CancelledRequests()
    uvicorn_log = logging.getLogger("uvicorn.error")
    uvicorn_log.addFilter(quiet)
    try:
        tracker.abort()  # close() stops waiting for writes; their requests answer 503
        if requests:
            _, running = await asyncio.wait(requests, timeout=_ANSWER_S)
            for task in running:
                task.cancel()
            if running:
                await asyncio.wait(running, timeout=_FORCE_GRACE_S)
        _, unfinished = await asyncio.wait({closing}, timeout=_FORCE_GRACE_S)
        if unfinished:
            log.warning(
                "forced shutdown: the database did not close in time", extra={"action": "forced_shutdown"}
            )
            closing.cancel()
        else:
            closing.result()
    finally:
        uvicorn_log.removeFilter(quiet)
    raise ForcedShutdown("forced shutdown: a second signal abandoned in-flight requests and unwritten events")

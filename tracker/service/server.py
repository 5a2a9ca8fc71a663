"""``serve``: open the tracker, run the HTTP API with uvicorn, shut down cleanly on SIGINT/SIGTERM.

Order of shutdown, each step finishing before the next: stop accepting connections, let in-flight
requests finish (up to ``shutdown_grace_s``), stop gossip and the sweeper, let queued writes commit, close the
database. A signal-initiated shutdown is a normal exit (code 0), not a death by signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import socket
import threading
from collections.abc import Iterator

import uvicorn

from ..config import TrackerConfig
from ..core import AvailabilityTracker
from ..gossip.agent import GossipAgent
from ..gossip.config import GossipConfig
from .app import create_app
from .settings import ServiceSettings

log = logging.getLogger("tracker.service")
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _Server(uvicorn.Server):
    """uvicorn's server, minus its habit of re-raising the shutdown signal once it has stopped.

    uvicorn re-raises so that the default handler kills the process; we still have a database to close
    after the server stops, and want exit code 0 for a requested shutdown.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in _SIGNALS}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)


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
            log.info("listening on http://%s:%d", shown, port, extra={"action": "listening", "port": port})


def _bind(host: str, port: int) -> socket.socket:
    """Bind the service's socket before the tracker opens, so the port is ours from the start.

    Bound as uvicorn binds (``SO_REUSEADDR``, so a port in TIME_WAIT is free; IPv6 when the host has a
    colon) but not listening yet: until the tracker is open, connections are refused rather than
    queued. Raises ``OSError`` naming the address.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise _address_error(host, port, error) from error
    return sock


def _address_error(host: str, port: int, error: OSError) -> OSError:
    return OSError(f"cannot listen on {host}:{port}: {error.strerror or error}")


async def serve(config: TrackerConfig, settings: ServiceSettings, gossip: GossipConfig | None = None) -> None:
    """Run the service until a signal asks it to stop; raises if the tracker cannot open.

    The tracker opens (and migrates, unless ``config.auto_migrate`` is off) before the socket listens,
    so a database problem is one clear error instead of a server that answers 503 forever. Before
    either, the socket is bound and later handed to uvicorn: a taken port fails here, before the
    database is created for nothing, and while the tracker opens only a process that also sets
    ``SO_REUSEADDR`` could bind the port (listening first, it makes this fail with the same error).
    """
    sock = _bind(settings.host, settings.port)
    try:
        await _serve_on(sock, config, settings, gossip)
    finally:
        sock.close()


async def _serve_on(
    sock: socket.socket, config: TrackerConfig, settings: ServiceSettings, gossip: GossipConfig | None
) -> None:
    tracker = await AvailabilityTracker.open(config)
    agent = GossipAgent(tracker, gossip) if gossip is not None and gossip.enabled else None
    gossiping: asyncio.Task[None] | None = None
    try:
        app = create_app(tracker, settings, agent)
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
            )
        )
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
        if agent is not None:
            await agent.aclose()
        await tracker.close()
    log.info("stopped", extra={"action": "stopped"})

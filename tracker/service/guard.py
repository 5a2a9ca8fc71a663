"""Connection guards for ``tracker serve``: a deadline for each request's headers, and a cap on open
connections.

uvicorn has neither. A client that opened connections and sent nothing, or sent its headers a byte
at a time, held each for as long as it liked: 300 such connections under a 256-file limit left no
file for a new connection or for the database (QA round 68), and /healthz went unanswered. The
request body has its own deadline (``body_timeout_s``, in the app); an idle kept-alive connection
has uvicorn's (``keep_alive_s``). Built on uvicorn's h11 protocol, the one it runs without
``httptools``.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("tracker.service")

#: At most one warning this often about refused connections: a flood would otherwise flood the log.
_WARN_EVERY_S = 60.0


def default_max_connections() -> int:
    """Three quarters of this process's open-file limit: the rest stays for the database's
    connections and files, the snapshots and the logs."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return 10_000
    return max(16, soft * 3 // 4)


def guarded_protocol(header_timeout_s: float, max_connections: int) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol that closes a connection whose request headers have not all come
    ``header_timeout_s`` after it opened (or, kept alive, after the next request's first byte), and
    closes at once a connection above ``max_connections`` open."""
    refused = {"count": 0, "warned": 0.0}

    class Guarded(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _waiting = True  # for a request's headers
        _last_cycle: Any = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                refused["count"] += 1
                if time.monotonic() - refused["warned"] >= _WARN_EVERY_S:
                    refused["warned"] = time.monotonic()
                    log.warning(
                        "%d connection(s) closed at once: %d are open, max_connections",
                        refused["count"],
                        len(self.connections) - 1,
                        extra={"action": "connections_refused", "refused": refused["count"]},
                    )
                transport.close()
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._waiting and self._header_timer is None:
                self._arm()  # the first byte of the next request on a kept-alive connection
            super().data_received(data)
            if self.cycle is not None and self.cycle is not self._last_cycle:  # its headers came
                self._last_cycle = self.cycle
                self._waiting = False
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.cycle is self._last_cycle:  # no pipelined request began: the next one is timed
                self._waiting = True  # from its first byte; until then keep_alive_s applies
                if self.conn.trailing_data[0]:  # part of it came already
                    self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if self._waiting and not self.transport.is_closing():
                log.debug(
                    "closed a connection whose request headers did not come within %g s",
                    header_timeout_s,
                    extra={"action": "header_timeout"},
                )
                self.transport.close()

    return Guarded

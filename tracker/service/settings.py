"""``ServiceSettings``: what the HTTP service needs beyond ``TrackerConfig`` (address, token, limits).

Kept apart from ``TrackerConfig`` because an embedded tracker has no socket: these settings only exist
when the tracker runs as ``tracker serve``.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config import env_value, parse_bool
from ..core import MAX_PAGE
from ..errors import ConfigError

DEFAULT_PORT = 8750
LOOPBACK_NAMES = ("localhost", "ip6-localhost")


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the service reachable from this machine only."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


@dataclass(frozen=True, kw_only=True)
class ServiceSettings:
    """Settings of ``tracker serve``; env vars are ``TRACKER_<FIELD>`` in upper case.

    A write token is mandatory on a non-loopback address: an open write API on a network would let
    anyone rewrite every peer's reputation.

    >>> ServiceSettings(host="0.0.0.0")
    Traceback (most recent call last):
    ...
    tracker.errors.ConfigError: binding 0.0.0.0 exposes the API beyond this machine: set an api_token ...
    """

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    #: Bearer token required by every write endpoint and by selections (they grant leases); ``None``
    #: leaves them open. (Gossip is signed with its own key instead.)
    api_token: str | None = field(default=None, repr=False)  # a secret: not in reprs (QA round 68)
    #: Largest request body accepted; larger ones get 413 before they are read.
    max_body_bytes: int = 8 * 1024 * 1024
    #: Largest ``n`` a best-peers request may ask for.
    max_best_n: int = 100
    #: Largest page of ``GET /v1/peers``.
    max_page_size: int = 1000
    #: One JSON object per log line instead of plain text.
    log_json: bool = False
    log_level: str = "info"
    #: One INFO line per request; off, successes go to DEBUG and only refusals and errors (status
    #: 400 and up) stay at INFO: ~220 bytes a heartbeat made ~630 MB of log a day per 1,000 peers
    #: beating every 30 s (QA round 73), and ``log_level=warning`` hid the sweeper's lines too.
    access_log: bool = True
    #: Seconds in-flight requests get to finish after SIGTERM before they are cut.
    shutdown_grace_s: float = 10.0
    #: Seconds an idle kept-alive connection stays open. Longer than clients keep theirs (httpx 5 s,
    #: aiohttp 15 s, a load balancer's 60 s), so that the client closes first: closed by the server
    #: as a client sent on it, a request got no answer (QA round 24, uvicorn's 5 s against httpx's).
    keep_alive_s: float = 75.0
    #: Seconds a request's body may go without a byte before it is answered 408 and its connection
    #: closed: a stalled upload held its buffered body (up to max_body_bytes) for as long as its
    #: sender kept the connection open (QA round 68).
    body_timeout_s: float = 30.0
    #: Seconds a request's headers may take to arrive, from the connection's opening (or a kept-alive
    #: connection's next byte), before the connection is closed (``tracker serve``; QA round 68:
    #: connections that sent nothing were kept for good).
    header_timeout_s: float = 10.0
    #: Connections ``tracker serve`` keeps open at once; one more is closed as it opens. ``None``:
    #: three quarters of the process's open-file limit (``ulimit -n``), so that idle connections
    #: cannot take the files the database needs.
    max_connections: int | None = None
    #: Requests per second one connection may make (token bucket); 0 turns the limit off.
    rate_limit_per_s: float = 1000.0
    #: Requests one connection may make in a burst above that rate.
    rate_limit_burst: int = 2000

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError(f"host must be an address or host name, got {self.host!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be within 0..65535 (0 picks a free port), got {self.port!r}")
        if self.api_token is not None and (not isinstance(self.api_token, str) or len(self.api_token) < 16):
            raise ConfigError("api_token must be a string of at least 16 characters")
        if self.api_token is not None and not (
            self.api_token.isascii()
            and self.api_token.isprintable()
            and self.api_token.strip() == self.api_token
        ):
            # HTTP headers arrive as latin-1 and offered tokens are stripped: any other token never
            # matched the header clients send (QA round 6).
            raise ConfigError("api_token must be printable ASCII, without spaces at either end")
        if self.api_token is None and not is_loopback(self.host):
            raise ConfigError(
                f"binding {self.host} exposes the API beyond this machine: set an api_token "
                "(TRACKER_API_TOKEN) of at least 16 characters, or bind 127.0.0.1"
            )
        for name, low in (("max_body_bytes", 1024), ("max_best_n", 1), ("max_page_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.max_page_size > MAX_PAGE:
            # The listing would advertise it and then refuse it (QA round 11).
            raise ConfigError(
                f"max_page_size must be at most {MAX_PAGE} (the most list_peers returns), "
                f"got {self.max_page_size}"
            )
        if self.log_level.lower() not in ("critical", "error", "warning", "info", "debug"):
            raise ConfigError(
                f"log_level must be critical, error, warning, info or debug, got {self.log_level!r}"
            )
        if isinstance(self.shutdown_grace_s, bool) or not isinstance(self.shutdown_grace_s, int | float):
            raise ConfigError(f"shutdown_grace_s must be seconds, got {self.shutdown_grace_s!r}")
        if not 0 < self.shutdown_grace_s < float("inf"):  # NaN too: it failed only at shutdown
            raise ConfigError(f"shutdown_grace_s must be positive and finite, got {self.shutdown_grace_s!r}")
        for name in ("keep_alive_s", "body_timeout_s", "header_timeout_s"):
            seconds = getattr(self, name)
            if (
                isinstance(seconds, bool)
                or not isinstance(seconds, int | float)
                or not 0 < seconds < float("inf")
            ):
                raise ConfigError(f"{name} must be positive and finite seconds, got {seconds!r}")
        most = self.max_connections
        if most is not None and (isinstance(most, bool) or not isinstance(most, int) or most < 1):
            raise ConfigError(f"max_connections must be an integer >= 1, got {most!r}")
        rate = self.rate_limit_per_s
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not (0 <= rate < float("inf")):
            raise ConfigError(f"rate_limit_per_s must be a number >= 0 (0: off), got {rate!r}")
        burst = self.rate_limit_burst
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ConfigError(f"rate_limit_burst must be an integer >= 1, got {burst!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ServiceSettings:
        """Settings from ``TRACKER_HOST``, ``TRACKER_PORT``, ``TRACKER_API_TOKEN``, ...; overrides win."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, parse in _PARSERS.items():
            raw = env_value(env, f"TRACKER_{name.upper()}")
            if raw is None or overrides.get(name) is not None:
                continue  # unset, or a command-line option wins (even over a variable that is invalid)
            try:
                values[name] = parse(raw)
            except ValueError:
                raise ConfigError(f"TRACKER_{name.upper()}={raw!r} is not valid") from None
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**values)

    @classmethod
    def env_names(cls) -> frozenset[str]:
        """Every ``TRACKER_*`` variable ``from_env`` reads."""
        return frozenset(f"TRACKER_{name.upper()}" for name in _PARSERS)


_PARSERS: dict[str, Any] = {
    "host": str,
    "port": int,
    "api_token": str,
    "max_body_bytes": int,
    "max_best_n": int,
    "max_page_size": int,
    "log_json": parse_bool,
    "log_level": str,
    "access_log": parse_bool,
    "shutdown_grace_s": float,
    "keep_alive_s": float,
    "body_timeout_s": float,
    "header_timeout_s": float,
    "max_connections": int,
    "rate_limit_per_s": float,
    "rate_limit_burst": int,
}

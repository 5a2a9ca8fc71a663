"""Gossip settings, apart from ``TrackerConfig``: only trackers that gossip need them."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ..config import env_value, parse_bool
from ..errors import ConfigError
from .limits import MIN_BYTES

#: ``GossipConfig.max_skew_s``'s default; a snapshot import allows rows as far ahead (importer.py).
DEFAULT_MAX_SKEW_S = 120.0


@dataclass(frozen=True, kw_only=True)
class GossipConfig:
    """How a tracker gossips. Every field has a ``TRACKER_GOSSIP_<NAME>`` variable (lists comma-separated)."""

    #: Shared secrets (>= 16 characters); the first signs, all verify, so keys rotate one at a time.
    keys: tuple[str, ...] = field(default=(), repr=False)  # secrets: not in reprs (QA round 68)
    #: Base URLs of neighbour trackers (``http://127.0.0.1:8081``); gossip goes to ``<url>/v1/gossip``.
    neighbors: tuple[str, ...] = ()
    #: Neighbours contacted per round.
    fanout: int = 3
    #: Seconds between rounds; ``None`` uses the tracker's ``update_interval`` (30 s).
    interval_s: float | None = None
    #: Each round waits the interval +- this fraction, so trackers do not gossip in lockstep.
    jitter: float = 0.2
    #: Also gossip with neighbours that other trackers mention (their ``url`` and ``neighbors``).
    learn_neighbors: bool = False
    #: This tracker's own gossip URL, told to neighbours (needed for them to learn it).
    advertise_url: str | None = None
    #: Rows (peer states plus mappings) per message; more state goes in the next exchange.
    max_rows: int = 5_000
    #: Largest compressed message accepted or sent, bytes.
    max_bytes: int = 4 * 1024 * 1024
    #: Messages older or further in the future than this are refused; nonces are kept this long.
    max_skew_s: float = DEFAULT_MAX_SKEW_S
    #: Rows per version when local changes are stamped; must be below ``max_rows``.
    stamp_chunk: int = 500
    #: Per-request timeout, seconds.
    timeout_s: float = 10.0
    #: A failing neighbour is retried after 2^failures intervals, at most this many seconds.
    backoff_max_s: float = 300.0
    #: Messages per second one neighbour (by node key) may send; more get 429.
    max_messages_per_s: float = 5.0
    #: Messages one neighbour may send in a burst above that rate.
    message_burst: int = 30

    def __post_init__(self) -> None:
        if not isinstance(self.keys, tuple) or not all(
            isinstance(k, str) and len(k) >= 16 for k in self.keys
        ):
            raise ConfigError(
                "every gossip key must be at least 16 characters (TRACKER_GOSSIP_KEYS: comma-separated keys)"
            )
        if not isinstance(self.neighbors, tuple):
            raise ConfigError("gossip neighbors must be a tuple of URLs")
        if self.neighbors and not self.keys:
            # Without a key gossip is off: neighbours set alone meant a tracker that silently never gossiped.
            raise ConfigError(
                "gossip neighbors are set but no gossip key: set TRACKER_GOSSIP_KEYS "
                "(a shared secret of at least 16 characters, the same on every tracker)"
            )
        for url in self.neighbors + ((self.advertise_url,) if self.advertise_url else ()):
            check_url(url)
        for name, low in (
            ("fanout", 1),
            ("max_rows", 2),
            ("max_bytes", MIN_BYTES),
            ("stamp_chunk", 1),
            ("message_burst", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"gossip {name} must be an integer >= {low}, got {value!r}")
        if self.stamp_chunk >= self.max_rows:
            raise ConfigError(
                "gossip stamp_chunk must be below max_rows, so every message completes a version"
            )
        for name in ("max_skew_s", "timeout_s", "backoff_max_s") + (
            ("interval_s",) if self.interval_s else ()
        ):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not (math.isfinite(value) and value > 0)
            ):
                raise ConfigError(f"gossip {name} must be a positive number of seconds, got {value!r}")
        if (
            isinstance(self.jitter, bool)
            or not isinstance(self.jitter, int | float)
            or not 0 <= self.jitter < 1
        ):
            raise ConfigError(f"gossip jitter must be within [0, 1), got {self.jitter!r}")

    @property
    def enabled(self) -> bool:
        """Gossip runs when a key is configured; without one no message could be trusted."""
        return bool(self.keys)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> GossipConfig:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name in _ENV_FIELDS:
            raw = env_value(env, f"TRACKER_GOSSIP_{name.upper()}")
            if raw is None or name in overrides:  # an override wins, even over a bad value
                continue
            try:
                if name in _LISTS:
                    values[name] = tuple(part.strip() for part in raw.split(",") if part.strip())
                elif name in _INTS:
                    values[name] = int(raw)
                elif name in _FLOATS:
                    values[name] = float(raw)
                elif name == "learn_neighbors":
                    values[name] = parse_bool(raw)
                else:
                    values[name] = raw.strip()
            except ValueError:
                raise ConfigError(f"TRACKER_GOSSIP_{name.upper()}={raw!r} is not valid") from None
        values.update(overrides)
        return cls(**values)

    @classmethod
    def env_names(cls) -> frozenset[str]:
        """Every ``TRACKER_GOSSIP_*`` variable ``from_env`` reads."""
        return frozenset(f"TRACKER_GOSSIP_{name.upper()}" for name in _ENV_FIELDS)


_LISTS = ("keys", "neighbors")
_INTS = ("fanout", "max_rows", "max_bytes", "stamp_chunk", "message_burst")
_FLOATS = ("interval_s", "jitter", "max_skew_s", "timeout_s", "backoff_max_s", "max_messages_per_s")
_ENV_FIELDS = (*_LISTS, *_INTS, *_FLOATS, "learn_neighbors", "advertise_url")


def check_url(url: object) -> str:
    """A neighbour's base URL: http(s) with a host, no query or fragment."""
    if not isinstance(url, str):
        raise ConfigError(f"a gossip URL must be a string, got {url!r}")
    try:
        parts = urlsplit(url)
        # Read here, not at the first round: a port past 65535 raised there, inside the round's task
        # group, and every round logged "unhandled errors in a TaskGroup" (QA round 74).
        parts.port  # noqa: B018
    except ValueError as error:
        raise ConfigError(f"a gossip URL looks like http://127.0.0.1:8081, got {url!r} ({error})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ConfigError(f"a gossip URL looks like http://127.0.0.1:8081, got {url!r}")
    if parts.path.rstrip("/").endswith("/v1/gossip"):
        # The endpoint is appended to the base URL: this one would post to .../v1/gossip/v1/gossip (404).
        raise ConfigError(f"a gossip URL is the tracker's base URL, without /v1/gossip: got {url!r}")
    return url.rstrip("/")

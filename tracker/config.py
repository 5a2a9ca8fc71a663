"""``TrackerConfig``: every setting, its default, its validation and its environment variable.

All durations are seconds (floats); a ``timedelta`` is accepted too and converted on construction.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy.engine import make_url

from .errors import ConfigError
from .reputation import ReputationParams

Clock = Callable[[], float]

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///tracker.db"
_DURATIONS = (
    "update_interval",
    "peer_timeout",
    "sqlite_busy_timeout_s",
    "max_clock_skew_s",
    "sample_retention_s",
    "outcome_retention_s",
    "offline_mapping_retention_s",
    "peer_retention_s",
    "tombstone_ttl_s",
    "lease_ttl_s",
    "slow_start_s",
    "pg_connect_timeout_s",
)
#: Durations where 0 means "off" (every heartbeat travels; a snapshot every pass; no lock timeout;
#: migrations wait without end).
_OPTIONAL_DURATIONS = (
    "heartbeat_resolution_s",
    "snapshot_interval_s",
    "pg_lock_timeout_s",
    "migration_timeout_s",
)
STRATEGIES = ("best", "weighted")
#: The shortest ``peer_retention_s``. A gossiped row whose origin wrote it more than this after the
#: version a tracker holds may be one its origin forgot and started again, so it replaces the
#: stored counters instead of taking their maximum (queries/gossip/merge.py): every tracker must
#: forget no sooner than this.
MIN_PEER_RETENTION_S = 3_600.0


#: A URL's scheme and user (group 1) and password (group 2): everything between the user's ":" and
#: the last "@" before the path, so a password holding an unencoded "@" is taken whole (SQLAlchemy's
#: own masking stopped at the first one; QA round 23).
_PASSWORD = re.compile(r"^((?:[A-Za-z0-9+.-]+://)?[^/:@]*:)([^/]*)@")


def masked_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, for messages and reprs."""
    return _PASSWORD.sub(r"\1***@", url)


def _without_password(text: str, url: str) -> str:
    """``text`` (an error about ``url``) with the URL, and any piece of its password, masked."""
    text = text.replace(url, masked_url(url))
    secret = _PASSWORD.match(url)
    if secret:
        for piece in sorted({secret[2], *re.split("[@:]", secret[2])}, key=len, reverse=True):
            if len(piece) >= 3:
                text = text.replace(piece, "***")
    return text


#: What a postgresql+asyncpg:// URL may carry after "?": asyncpg's connection options that a URL can
#: spell (the rest are the tracker's settings). Others reached asyncpg and failed as a bare TypeError.
_PG_URL_OPTIONS = frozenset(
    {
        "ssl",
        "direct_tls",
        "passfile",
        "target_session_attrs",
        "host",
        "port",
        "krbsrvname",
        "gsslib",
        "prepared_statement_cache_size",  # SQLAlchemy's asyncpg dialect reads it from the URL
    }
)
_PG_URL_HINTS = {
    "sslmode": "asyncpg spells it ssl (?ssl=require, verify-full, ...)",
    "connect_timeout": "set pg_connect_timeout_s (TRACKER_PG_CONNECT_TIMEOUT_S) instead",
    "application_name": "set it on the role (ALTER ROLE ... SET application_name = ...)",
    "options": "set server settings on the role (ALTER ROLE ... SET ...)",
}


def _check_url_options(url: str) -> None:
    """Refuse what the tracker cannot open: an in-memory SQLite database (it needs WAL, which needs a
    file: it failed only at open, as a StorageError callers may retry), or a Postgres option asyncpg
    does not take."""
    try:
        parsed = make_url(url)
    except Exception as error:  # e.g. a port that is not a number: the URL is what is wrong
        reason = _without_password(str(error), url)
        raise ConfigError(f"the database URL is not valid: {reason}") from error
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database in ("", ":memory:") or parsed.query.get("mode") == "memory":
            raise ConfigError(
                "database_url names an in-memory SQLite database, which the tracker cannot use (it "
                "needs WAL, and WAL needs a file): give a file path, a temporary one for tests"
            )
        if "?" in url.split("://", 1)[1]:
            # SQLAlchemy warned and ignored an unknown option (`?mode=ro` opened the file read-write),
            # and cut a path at a `?` without a word (QA round 56).
            raise ConfigError(
                "a sqlite+aiosqlite:// database_url takes no options (a `?` and what follows): the "
                "tracker sets the file's own (sqlite_busy_timeout_s, ...); a `?` in the file's name "
                "is written %3F"
            )
        return
    if not parsed.database:
        # asyncpg then connects to the database named after the user (often `postgres`), and the
        # tracker created its tables there (QA round 56).
        raise ConfigError(
            f"database_url names no database: {masked_url(url)!r}; name it after the host, "
            "postgresql+asyncpg://USER@HOST/DATABASE"
        )
    for option in sorted(set(parsed.query) - _PG_URL_OPTIONS):
        hint = _PG_URL_HINTS.get(option, f"the URL may carry {', '.join(sorted(_PG_URL_OPTIONS))}")
        raise ConfigError(f"database_url option {option!r} is not one asyncpg takes: {hint}")


def _seconds(name: str, value: Any, zero_allowed: bool) -> float:
    """Durations are stored as float seconds so SQL and arithmetic never meet a ``timedelta``; a bool
    is refused because ``True`` would silently mean one second."""
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise ConfigError(f"{name} must be seconds (number or timedelta), got {value!r}")
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not zero_allowed):
        bound = "seconds >= 0" if zero_allowed else "a positive number of seconds"
        raise ConfigError(f"{name} must be {bound}, got {value!r}")
    return float(seconds)


@dataclass(frozen=True, kw_only=True)
class TrackerConfig:
    """Settings of one tracker. Frozen: build a new one with ``dataclasses.replace``.

    >>> TrackerConfig(database_url="sqlite+aiosqlite:///edge.db", peer_timeout=120).peer_timeout
    120.0
    """

    database_url: str = DEFAULT_DATABASE_URL
    #: Seconds between sweeps and gossip rounds.
    update_interval: float = 30.0
    #: A peer unseen for more than this many seconds is offline, whether or not a sweep has run.
    peer_timeout: float = 300.0
    #: Proven peers scoring below this are never selected.
    min_reputation: float = 0.3
    #: ``PeerMetrics.is_reliable()`` means a score above this.
    reliable_threshold: float = 0.8
    #: How many of a peer's latest bandwidth samples its download speed averages.
    bandwidth_window: int = 10
    reputation: ReputationParams = field(default_factory=ReputationParams)
    #: Bring the database schema to the latest migration when the tracker opens.
    auto_migrate: bool = True
    #: Events dated further than this into the future are rejected (they would pin a peer online).
    max_clock_skew_s: float = 60.0
    #: Events dated further than this into the past are rejected (``None``: ``outcome_retention_s``).
    #: Older than what retention keeps, an event is a wrong clock or a replayed log far more often
    #: than news: an ``at`` of 0 made a new peer look fifty years old, past its slow start, and its
    #: outcome was counted, then pruned by the next sweep. A client gets a clear error instead;
    #: raise it to backfill history.
    max_event_age_s: float | None = None
    #: Largest number of events ``record_batch`` accepts in one call.
    max_batch_events: int = 50_000
    #: Largest number of events of one peer in one call, and in one shared transaction: a peer's
    #: events are applied one after another, so they, not the batch, bound how long a transaction
    #: holds every other write (``events.check_events_per_peer``).
    max_events_per_peer: int = 1_000
    #: How often a transaction that hit a deadlock or a busy database is retried before failing.
    write_retries: int = 8
    #: How long an SQLite writer waits for the file lock held by another connection or process.
    sqlite_busy_timeout_s: float = 30.0
    #: How long a statement of the tracker's own Postgres sessions waits for a lock (Postgres'
    #: ``lock_timeout``) before it fails as a transient error, retried like a deadlock; 0 sets none,
    #: leaving the server's (none unless configured). Postgres otherwise waits for a lock without end:
    #: one ``LOCK TABLE peers`` left open in psql would stall every write, and a graceful shutdown with
    #: them. Migrations are exempt (``migrations.migrate``).
    pg_lock_timeout_s: float = 30.0
    #: How long a migration (``auto_migrate`` on open, ``tracker db upgrade``) may wait for its locks
    #: in all, on Postgres: the migration lock another process holds, and the tables it changes,
    #: tried again and again (``migrations.migrate``). Then it fails, naming who holds them; 0 waits
    #: without end. Not ``pg_lock_timeout_s``: queued behind another process's migration of a large
    #: table, a tracker must wait minutes, not seconds. Before, a lock never released (a session
    #: left holding it) kept ``open()`` waiting forever (QA round 23).
    migration_timeout_s: float = 600.0
    #: How long connecting to Postgres may take before it fails, naming the server. asyncpg's own
    #: limit is 60 s, and its error an empty ``TimeoutError``: a port that accepts and never answers
    #: (a firewall, a stopped VM, a wrong service) held ``tracker serve`` for a minute and then
    #: printed "error: TimeoutError".
    pg_connect_timeout_s: float = 10.0
    #: The tracker reaches Postgres through a pooler in transaction mode (PgBouncer's
    #: ``pool_mode = transaction``), which may hand each transaction another server connection: no
    #: prepared statement is kept for a later transaction, and the session's settings are set in
    #: every transaction instead of once per connection. Each statement is then parsed each time it
    #: runs (docs/operations.md, "Behind a connection pooler"). Not needed for a direct connection
    #: or a pooler in session mode.
    pg_transaction_pooling: bool = False
    #: SQLite reads the file through a shared memory map of up to this many MiB (0: plain reads). The
    #: map is the OS page cache, shared by every connection and process, where SQLite's own page cache
    #: (2 MiB) is private to each connection; ranking a hot content probes thousands of random rows.
    #: Address space, not memory: a 1M-peer file is ~1.5 GB, and the part beyond the map is read with
    #: a system call per page (common SQLite builds cap the map at 2 GiB).
    sqlite_mmap_mib: int = 2048
    #: How ``select_best_peers`` picks by default: ``"best"`` (deterministic) or ``"weighted"`` (random).
    selection_strategy: str = "best"
    #: A peer handed out by selection carries a lease this long, unless an outcome for it closes it first.
    lease_ttl_s: float = 60.0
    #: Open leases at which a peer is not handed out any more.
    max_load_per_peer: int = 8
    #: Weight of an unproven peer relative to a proven one with the same score (exploration).
    exploration_share: float = 0.5
    #: An unproven peer's lease cap grows from 1 to ``max_load_per_peer`` over this long after first seen.
    slow_start_s: float = 60.0
    #: Seed of the "weighted" strategy's random draws (``None``: unpredictable); for tests and simulations.
    random_seed: int | None = None
    #: Gossip carries a peer's heartbeat only when it moves ``last_seen`` into a new window of this
    #: many seconds (0: every heartbeat). A heartbeat that only extends a session within the window
    #: leaves the row's gossip version as it is, so neighbours see ``last_seen`` up to this much behind
    #: (and count the peer offline up to this much sooner) in return for fewer rows per round; every
    #: other change travels at once. At most half of ``peer_timeout`` (docs/gossip.md, "Heartbeats at a
    #: resolution").
    heartbeat_resolution_s: float = 0.0
    #: Start the sweeper when the tracker opens (``async with`` / ``open()``); stop it on close.
    run_sweeper: bool = False
    #: Each sweep waits ``update_interval`` +- this fraction, so many trackers do not sweep in lockstep.
    sweep_jitter: float = 0.1
    #: Rows deleted per transaction by retention, so no sweep holds a long lock or a huge transaction.
    sweep_batch_size: int = 5_000
    #: Bandwidth samples beyond a peer's rolling window are kept this long (for analytics), then pruned.
    sample_retention_s: float = 86_400.0
    #: Raw upload outcomes are kept this long; the counters and weights they fed keep their effect.
    outcome_retention_s: float = 7 * 86_400.0
    #: Content mappings of a peer unseen this long are dropped (it re-announces when it returns).
    offline_mapping_retention_s: float = 86_400.0
    #: An origin's row of a peer (``peer_stats``, with its samples) that its origin has not written for
    #: this long is forgotten on every tracker, and a peer or content left with nothing is deleted
    #: (never sooner than the peer's mappings go: ``forget_after_s``; docs/sweeper.md). Without it,
    #: churning peer ids grew the tables for good (QA round 24).
    peer_retention_s: float = 14 * 86_400.0
    #: Removed mappings (tombstones) are kept this long so gossip can spread the removal first.
    tombstone_ttl_s: float = 86_400.0
    #: Directory for gossip state snapshots written by each sweep; ``None`` writes none.
    snapshot_dir: str | None = None
    #: How many snapshots to keep in ``snapshot_dir``.
    snapshot_keep: int = 5
    #: A sweep writes a snapshot only when this node's newest one in ``snapshot_dir`` is at least this
    #: old (0: every pass). A snapshot is a full export, half a minute to a minute of a process's CPU
    #: at 100k peers and 1M mappings: every 30-s pass would make it the sweeper's whole job.
    snapshot_interval_s: float = 300.0
    #: Contents with fewer online holders than this are "under-replicated" (view and /metrics).
    replication_target: int = 3
    #: Connections kept open per process (Postgres); SQLite uses a small pool of its own.
    pool_size: int = 5
    #: Selections of this process running at once on Postgres (``None``: half of ``pool_size``, at
    #: least 1); the rest wait their turn. A hot content's ranking is milliseconds of server CPU, and
    #: unbounded they crowd out ingest: heartbeats beside 32 selectors fell to ~2.7k/s, below what
    #: 100k peers send (docs/load-balancing.md). SQLite's lanes bound them already.
    max_concurrent_selections: int | None = None
    echo_sql: bool = False
    #: Zero-argument callable returning Unix time in seconds; tests inject a controllable one.
    clock: Clock = field(default=time.time, compare=False, repr=False)
    #: Elapsed seconds from a clock no one can set, paired with ``clock``: the sweeper compares the
    #: two to notice ``clock`` leaping forward (tracker/clockleap.py). ``None``: the system's
    #: (CLOCK_BOOTTIME) when ``clock`` is the system clock; with another clock, no leap detection.
    monotonic: Clock | None = field(default=None, compare=False, repr=False)
    #: Names the span ``monotonic`` counts within (one boot of the host): trackers store their
    #: clock's state in ``tracker_clocks`` under it, so a process opened later in the same boot
    #: notices a leap made while none ran. ``None``: the kernel's boot id with the system's elapsed
    #: clock; with an injected ``monotonic``, nothing is stored unless a boot id is given too.
    boot_id: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in (*_DURATIONS, *_OPTIONAL_DURATIONS):
            object.__setattr__(self, name, _seconds(name, getattr(self, name), name in _OPTIONAL_DURATIONS))
        if self.peer_retention_s < MIN_PEER_RETENTION_S:
            raise ConfigError(
                f"peer_retention_s must be at least {MIN_PEER_RETENTION_S:.0f} seconds, "
                f"got {self.peer_retention_s!r}"
            )
        if self.max_event_age_s is not None:
            object.__setattr__(
                self, "max_event_age_s", _seconds("max_event_age_s", self.max_event_age_s, False)
            )
        if not isinstance(self.database_url, str) or "://" not in self.database_url:
            shown = masked_url(self.database_url) if isinstance(self.database_url, str) else self.database_url
            raise ConfigError(f"database_url must be an SQLAlchemy URL, got {shown!r}")
        if not self.database_url.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ConfigError(
                "database_url must use sqlite+aiosqlite:// or postgresql+asyncpg://, "
                f"got {masked_url(self.database_url)!r}"
            )
        _check_url_options(self.database_url)
        for name in ("auto_migrate", "pg_transaction_pooling", "run_sweeper", "echo_sql"):
            if not isinstance(getattr(self, name), bool):
                # "no" and "false" are true to Python: run_sweeper="no" started the sweeper (QA round 22).
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("min_reputation", "reliable_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be within [0, 1], got {value!r}")
        for name, low in (
            ("bandwidth_window", 1),
            ("max_batch_events", 1),
            ("max_events_per_peer", 1),
            ("write_retries", 0),
            ("sqlite_mmap_mib", 0),
            ("pool_size", 1),
            ("sweep_batch_size", 1),
            ("snapshot_keep", 1),
            ("max_load_per_peer", 1),
            ("replication_target", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.heartbeat_resolution_s > self.peer_timeout / 2:
            raise ConfigError(
                "heartbeat_resolution_s must be seconds within [0, peer_timeout / 2] "
                f"(0 to {self.peer_timeout / 2:g}), got {self.heartbeat_resolution_s!r}"
            )
        if self.pg_transaction_pooling and self.dialect != "postgresql":
            raise ConfigError("pg_transaction_pooling is for a postgresql+asyncpg:// database_url")
        slots = self.max_concurrent_selections
        if slots is not None and (isinstance(slots, bool) or not isinstance(slots, int) or slots < 1):
            raise ConfigError(f"max_concurrent_selections must be an integer >= 1 or None, got {slots!r}")
        if (
            isinstance(self.sweep_jitter, bool)
            or not isinstance(self.sweep_jitter, int | float)
            or not (0.0 <= self.sweep_jitter < 1.0)
        ):
            raise ConfigError(f"sweep_jitter must be within [0, 1), got {self.sweep_jitter!r}")
        if self.snapshot_dir is not None and not (isinstance(self.snapshot_dir, str) and self.snapshot_dir):
            raise ConfigError(f"snapshot_dir must be a directory path or None, got {self.snapshot_dir!r}")
        if self.selection_strategy not in STRATEGIES:
            raise ConfigError(
                f"selection_strategy must be one of {', '.join(STRATEGIES)}, got {self.selection_strategy!r}"
            )
        if (
            isinstance(self.exploration_share, bool)
            or not isinstance(self.exploration_share, int | float)
            or not (0.0 < self.exploration_share <= 1.0)
        ):
            raise ConfigError(f"exploration_share must be within (0, 1], got {self.exploration_share!r}")
        if self.random_seed is not None and (
            isinstance(self.random_seed, bool) or not isinstance(self.random_seed, int)
        ):
            raise ConfigError(f"random_seed must be an integer or None, got {self.random_seed!r}")
        if not isinstance(self.reputation, ReputationParams):
            raise ConfigError(f"reputation must be a ReputationParams, got {self.reputation!r}")
        if not callable(self.clock):
            raise ConfigError(f"clock must be a zero-argument callable, got {self.clock!r}")
        if self.monotonic is not None and not callable(self.monotonic):
            raise ConfigError(f"monotonic must be a zero-argument callable or None, got {self.monotonic!r}")
        if self.boot_id is not None and (
            not isinstance(self.boot_id, str) or not 0 < len(self.boot_id) <= 64
        ):
            raise ConfigError(f"boot_id must be a string of 1 to 64 characters or None, got {self.boot_id!r}")

    def __repr__(self) -> str:
        """The generated one, but with the database password masked: it printed it (QA round 22)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.repr}
        values["database_url"] = masked_url(self.database_url)
        shown = (f"{name}={value!r}" for name, value in values.items())
        return f"{type(self).__name__}({', '.join(shown)})"

    @property
    def selection_slots(self) -> int:
        """How many selections may run at once (``max_concurrent_selections`` resolved)."""
        if self.max_concurrent_selections is not None:
            return self.max_concurrent_selections
        return max(1, self.pool_size // 2)

    @property
    def event_age_limit(self) -> float:
        """How old an event may be (``max_event_age_s`` resolved)."""
        return self.outcome_retention_s if self.max_event_age_s is None else self.max_event_age_s

    @property
    def tombstone_keep_s(self) -> float:
        """How long the sweeper keeps a removed mapping after this node took the removal
        (``content_peers.removed_at``): ``tombstone_ttl_s``, but no less than
        ``event_age_limit``, so that no announcement old enough to predate a removal is still
        accepted once the removal is forgotten (it would bring the mapping back; QA round 12: with
        the defaults, 1 day against 7, announcements 1 to 7 days late did)."""
        return max(self.tombstone_ttl_s, self.event_age_limit)

    @property
    def forget_after_s(self) -> float:
        """How long a peer's row outlives its origin's last write: ``peer_retention_s``, but no less than
        the departed peer's mappings take to go (``offline_mapping_retention_s`` and then
        ``tombstone_keep_s``, dated by those rows' sightings, which may run ``max_clock_skew_s``
        ahead of the writes, and ``heartbeat_resolution_s`` ahead of a quiet write's time): a mapping
        left without its peer's rows has nothing to date its departure by, and would stay for good."""
        return max(
            self.peer_retention_s,
            self.offline_mapping_retention_s
            + self.tombstone_keep_s
            + self.max_clock_skew_s
            + self.heartbeat_resolution_s,
        )

    @property
    def dialect(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self.database_url.split("+", 1)[0]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> TrackerConfig:
        """Build a config from ``TRACKER_*`` variables; keyword overrides win.

        ``TRACKER_DATABASE_URL``, ``TRACKER_PEER_TIMEOUT`` ... name each top-level field in upper case;
        reputation parameters are ``TRACKER_REPUTATION_<FIELD>`` (e.g. ``TRACKER_REPUTATION_MIN_OUTCOMES``).
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in _NOT_FROM_ENV:
                continue
            raw = env_value(env, f"TRACKER_{f.name.upper()}")
            if raw is not None and f.name not in overrides:  # an override wins, even over a bad value
                values[f.name] = _parse(f.name, raw, _field_type(cls, f.name))
        reputation: dict[str, Any] = {}
        for f in dataclasses.fields(ReputationParams):
            raw = env_value(env, f"TRACKER_REPUTATION_{f.name.upper()}")
            if raw is not None:
                reputation[f.name] = _parse(f"reputation.{f.name}", raw, float)
        if reputation:
            values["reputation"] = ReputationParams(**reputation)
        values.update(overrides)
        return cls(**values)

    @classmethod
    def env_names(cls) -> frozenset[str]:
        """Every ``TRACKER_*`` variable ``from_env`` reads."""
        top = {f"TRACKER_{f.name.upper()}" for f in dataclasses.fields(cls) if f.name not in _NOT_FROM_ENV}
        return frozenset(
            top | {f"TRACKER_REPUTATION_{f.name.upper()}" for f in dataclasses.fields(ReputationParams)}
        )


#: Fields no variable sets: the reputation parameters have their own (TRACKER_REPUTATION_*), the
#: clocks and the boot id are code's to inject.
_NOT_FROM_ENV = frozenset({"reputation", "clock", "monotonic", "boot_id"})


def _field_type(cls: type, name: str) -> type:
    """The scalar type an environment value parses to, from the field's annotation (``int | None`` -> int)."""
    annotation = str(next(f for f in dataclasses.fields(cls) if f.name == name).type)
    for kind in (bool, int, float):
        if annotation.split(" | ")[0] == kind.__name__:
            return kind
    return str


def env_value(env: Mapping[str, str], name: str) -> str | None:
    """A variable's value, or ``None`` when it is unset or empty (blanks only): deployments write
    ``TRACKER_X=${X:-}``, and an empty value was read unevenly, refused as "not a valid bool" by one
    setting, taken as no by another, as unset by a third (QA round 58 D3). Empty is unset everywhere."""
    raw = env.get(name)
    return raw if raw is not None and raw.strip() else None


def parse_bool(raw: str) -> bool:
    """An environment variable's yes or no; anything else is refused (``ValueError``): read as no,
    a typo (``TRACKER_GOSSIP_LEARN_NEIGHBORS=ture``) turned a setting off without a word (QA round 56)."""
    lowered = raw.strip().lower()
    if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
        raise ValueError(raw)
    return lowered in ("1", "true", "yes", "on")


def _parse(name: str, raw: str, kind: type) -> Any:
    """Parse one environment value as the field's type, naming the variable when it is wrong."""
    try:
        if kind is bool:
            return parse_bool(raw)
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        return raw
    except ValueError:
        raise ConfigError(
            f"TRACKER_{name.upper().replace('.', '_')}={raw!r} is not a valid {kind.__name__}"
        ) from None

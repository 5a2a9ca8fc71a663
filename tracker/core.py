"""``AvailabilityTracker``: the async API, thin over events, the database and the named queries."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self, TypeVar, overload

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from . import db, migrations, pg_checks, queries
from .aheadtimes import AheadTimes
from .clockleap import ClockState, SteadyClock, system_boot_id, system_elapsed
from .config import STRATEGIES, TrackerConfig
from .errors import (
    ConfigError,
    InvalidInput,
    SchemaOutOfDate,
    TrackerClosed,
    WrongEventLoop,
    translate,
)
from .events import (
    ContentAvailable,
    ContentUnavailable,
    Event,
    PeerOffline,
    PeerOnline,
    SpeedSample,
    UploadOutcome,
    check_batch,
    check_events_per_peer,
    validate_id,
    validate_time,
)
from .heavy import HeavyContents, RankingLoad, RankingSlots
from .ingest import GroupCommitter, GroupStats
from .keylocks import KeyedLocks
from .leaseclock import LeaseClock, Shift
from .models import ContentAvailability, PeerInfo, PeerMetrics, TrackerStats, from_unix
from .offload import off_loop
from .sqlite_lane import READ_THREADS, SqliteLane, SqliteLanes, lane_path
from .sweeper import SweeperTask, SweepReport, SweepState, sweep_once

R = TypeVar("R")

#: Larger counts of rows asked for mean "all of them": past int32 (a selection ranks 2n), Postgres
#: refused the LIMIT (a StorageError, which callers may retry) and SQLite overflowed (QA round 6).
_MOST_ROWS = 2**30 - 1
#: How long ``close()`` waits for ``sweep()`` calls, then for transactions whose callers were
#: cancelled (``db.to_completion``), before it releases the engine.
_SETTLE_S = 5.0
_WRONG_LOOP = (
    "this tracker was opened in another event loop, whose connections and locks it uses: open a "
    "tracker in each loop (each asyncio.run()) that uses one"
)
#: The most peers one ``list_peers`` page holds.
MAX_PAGE = 10_000
#: How many times a selection that came back short ranks again (docs/load-balancing.md, "The cap").
_TOP_UPS = 3
#: How many more candidates a top-up ranks than a first pass.
_TOP_UP_WIDTH = 32
T = TypeVar("T")


def _usable_snapshot_dir(directory: Path) -> None:
    """Create ``snapshot_dir`` if missing and refuse one that cannot be written: found out by the
    sweeper, every pass failed with a bare OSError, and the passes backed off, expiry with them
    (QA round 22)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"snapshot_dir {directory} cannot be created: {error.strerror or error}") from error
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(f"snapshot_dir {directory} is not writable by this process")


async def _release(lanes: SqliteLanes | None, engine: AsyncEngine | None, *, orphaned: bool) -> None:
    """Close the lanes, let the transactions running end (callers cancelled or not), dispose of the
    engine.

    ``orphaned``: the loop that opened the tracker is closed. asyncpg's connections cannot be closed
    from another loop (each attempt logged a traceback), and that loop's end already dropped them:
    the pool just forgets them. aiosqlite's run in threads, which any loop can close.
    """
    if lanes is not None:
        await lanes.close()
    if engine is not None:
        db.retire(engine)
        await db.settle(engine, _SETTLE_S)  # calls in flight end first, their connections returned
        await engine.dispose(close=not (orphaned and engine.dialect.name == "postgresql"))


_NOT_OPEN = "the tracker is not open: use `async with tracker:` or `await tracker.open()`"
_Tracker = TypeVar("_Tracker", bound="AvailabilityTracker")
_Opened = TypeVar("_Opened", bound="AvailabilityTracker", covariant=True)


class _OpenNew(Protocol[_Opened]):
    def __call__(
        self, config: TrackerConfig | None = None, *, publish_settings: bool = True
    ) -> Coroutine[Any, Any, _Opened]: ...


class _Opener:
    """``open``: ``AvailabilityTracker.open(config)`` opens a new tracker, ``tracker.open()`` opens that
    one, with its own config. A classmethod alone, ``await tracker.open()`` on an instance built with a
    Postgres config opened another tracker on ``./tracker.db`` with the defaults and returned it, and
    the writes went there without a word (QA round 56)."""

    @overload
    def __get__(self, obj: None, owner: type[_Tracker]) -> _OpenNew[_Tracker]: ...

    @overload
    def __get__(
        self, obj: _Tracker, owner: type[_Tracker] | None = None
    ) -> Callable[[], Coroutine[Any, Any, _Tracker]]: ...

    def __get__(
        self, obj: _Tracker | None, owner: type[_Tracker] | None = None
    ) -> _OpenNew[_Tracker] | Callable[[], Coroutine[Any, Any, _Tracker]]:
        if obj is None:
            assert owner is not None

            async def open_new(
                config: TrackerConfig | None = None, *, publish_settings: bool = True
            ) -> _Tracker:
                """Connect, migrate when ``auto_migrate`` is set, and register this node; the caller
                closes it."""
                tracker = owner(config, publish_settings=publish_settings)
                await tracker._start()
                return tracker

            return open_new

        async def open_this() -> _Tracker:
            """Open this tracker unless it is open (as ``async with`` does); the caller closes it."""
            obj._not_open_elsewhere()
            async with obj._opening:
                if obj._engine is None:
                    await obj._start()
            return obj

        return open_this


class AvailabilityTracker:
    """Tracks peers, their quality and their content, and picks the best peers for a download.

    >>> async def main() -> None:
    ...     async with AvailabilityTracker(TrackerConfig(database_url="sqlite+aiosqlite:///t.db")) as t:
    ...         await t.record_peer_online("peer-a")
    ...         await t.record_content_available("cid-1", "peer-a")
    ...         print([p.peer_id for p in await t.select_best_peers("cid-1", 3)])

    A write either applies completely or not at all, and returns once it is committed; concurrent
    writes share transactions (group commit), so many coroutines can ingest at once cheaply.
    """

    def __init__(self, config: TrackerConfig | None = None, *, publish_settings: bool = True) -> None:
        """``publish_settings=False`` leaves ``tracker_settings`` (what the analytics views compute with)
        as the trackers serving the database wrote it: for tools that only look, like the CLI."""
        if config is not None and not isinstance(config, TrackerConfig):
            # A URL or a dict failed later with "'str' object has no attribute 'monotonic'" (QA round 56).
            raise TypeError(
                "config must be a TrackerConfig, e.g. TrackerConfig(database_url=...), "
                f"not {type(config).__name__}"
            )
        self.config = config or TrackerConfig()
        self._publish_settings = publish_settings
        self._engine: AsyncEngine | None = None
        #: The event loop that opened the tracker: its connections, locks and tasks belong to it.
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Set while ``close()`` runs: writers that kept submitting would otherwise keep its drain going.
        self._closing = False
        #: ``async with`` blocks open on the tracker: the last to exit closes it.
        self._entered = 0
        self._lanes: SqliteLanes | None = None
        #: The release of the lanes and the engine, once ``close()`` has begun it, and what it releases.
        self._release: asyncio.Future[None] | None = None
        self._released: tuple[SqliteLanes | None, AsyncEngine | None] = (None, None)
        self._node_id: int | None = None
        self._node_key: str | None = None
        self._sweep_state = SweepState()
        self._opened_at = 0.0  # the tracker's time when it opened (the sweeper's first repair uses it)
        elapsed, boot_id = self.config.monotonic, self.config.boot_id
        if elapsed is None and self.config.clock is time.time:
            elapsed, boot_id = system_elapsed, boot_id or system_boot_id()
        #: Under which boot the clock's state is stored (``tracker_clocks``); ``None``: not stored.
        self._boot_id = boot_id if elapsed is not None else None
        #: The tracker's "now", which every time it stores or compares comes from: ``config.clock``,
        #: except while that has leapt ahead of elapsed time (tracker/clockleap.py).
        self.now = SteadyClock(
            self.config.clock,
            elapsed,
            tolerance_s=self.config.max_clock_skew_s,
            accept_after_s=self.config.peer_timeout,
        )
        self._elapsed = elapsed or time.monotonic
        self._random = random.Random(self.config.random_seed)
        #: Dates the events without ``at`` after what their peer dated ahead (tracker/aheadtimes.py).
        self._ahead_times = AheadTimes(self.config.max_clock_skew_s)
        #: Where a Postgres top-up starts probing: never seeded, so processes sharing a random_seed
        #: spread over the candidates, and a seeded tracker's weighted draws do not shift with
        #: contention (QA round 45). The system's source: an instance would be copied by a fork.
        self._probe_start = random.SystemRandom()
        self._committer = self._group_committer(GroupStats())
        #: Readings for the work on leases, kept on one side of the move of held leases.
        self._leases = LeaseClock(self.now, self._store_clock)
        #: Contents whose rankings were slow (tracker/heavy.py): on SQLite they rank on the read lane,
        #: and a freed ranking slot goes to a light content's ranking first.
        self._heavy = HeavyContents()
        self._new_loop_state()

    def _group_committer(self, stats: GroupStats) -> GroupCommitter:
        """A committer of this loop's (made again with it), counting on from ``stats``."""
        committer = GroupCommitter(
            self._apply,
            self.config.max_batch_events,
            max_rounds=self.config.max_events_per_peer,
            clock=self._elapsed,
            row_locks=self.config.dialect == "postgresql",
            isolate_at_once=self.config.pool_size,
        )
        committer.stats = stats
        return committer

    def _new_loop_state(self) -> None:
        """The tracker's locks, events and tasks, which belong to the loop that first uses them: made
        again when the tracker is opened again in another loop (a FastAPI lifespan per test, or an
        ``asyncio.run()`` per job), where those of the first loop made the sweeper die without a word
        and Postgres selections and ``close()`` raise RuntimeError (QA round 22)."""
        #: ``sweep()`` calls running, which ``close()`` lets end before it releases the engine: their
        #: next step opened connections on the engine close() had just disposed (QA round 18).
        self._sweeps = 0
        self._no_sweeps = asyncio.Event()
        self._no_sweeps.set()
        self._leases.rebind()  # its locks; what it moved stays moved
        self._sweeper: SweeperTask | None = None
        self._committer = self._group_committer(self._committer.stats)  # counted over the tracker's life
        #: Where rankings of a content's holders run at once: Postgres, ``selection_slots`` pooled
        #: connections; SQLite, the read lane's threads (its write transaction ranks one at a time).
        places = self.config.selection_slots if self.config.dialect == "postgresql" else READ_THREADS
        self._ranking_slots = RankingSlots(places)
        #: Held by a selection from its ranking to its commit, per content (``_select``).
        self._selecting = KeyedLocks()
        #: Held while ``async with`` opens the tracker: two blocks entered at once each opened an
        #: engine of their own, and one was never released (QA round 25).
        self._opening = asyncio.Lock()

    # -- lifecycle ------------------------------------------------------------------------------

    #: ``await AvailabilityTracker.open(config)``, or ``await tracker.open()``: connect, migrate when
    #: ``auto_migrate`` is set, and register this node; the caller closes it.
    open = _Opener()

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not None and loop is not self._loop:
            self._new_loop_state()
            if self._release is not None and self._release.get_loop() is not loop:
                # A release cut short in a loop that has ended: finished here, as well as it can be.
                await _release(*self._released, orphaned=True)
                self._release = None
        self._loop = loop
        if not self.config.auto_migrate and (path := db.missing_sqlite_file(self.config)):
            # Connecting would create the file, and leave it empty behind the error below.
            raise SchemaOutOfDate(
                f"no database at {path}, and this tracker may not create one (auto_migrate is off): "
                "check the path, or create it with `tracker db upgrade` (`tracker serve` without "
                "--no-migrate)"
            )
        if self.config.snapshot_dir is not None and self.config.run_sweeper:
            # Only where snapshots will be written: `tracker stats` run with the service's
            # environment must not need (or create) its directory.
            _usable_snapshot_dir(Path(self.config.snapshot_dir))
        db.require_creatable(self.config)
        engine = db.create_engine(self.config)
        try:
            await db.ensure_wal(engine)
            if self.config.auto_migrate:
                await migrations.migrate(engine, timeout_s=self.config.migration_timeout_s)
            else:
                current, head = await migrations.current_revision(engine), migrations.head_revision()
                if problem := migrations.unknown_revision_problem(current):
                    raise SchemaOutOfDate(problem)
                if current != head:
                    raise SchemaOutOfDate(
                        f"the database schema is at revision {current or 'none (empty database)'} but this "
                        f"tracker needs {head}: run `tracker db upgrade` (or `alembic upgrade head`), "
                        "or let it migrate when it opens (auto_migrate=True; for `tracker serve`, "
                        "TRACKER_AUTO_MIGRATE=true and no --no-migrate)"
                    )
            if self.config.dialect == "postgresql" and self._publish_settings:  # not the CLI's looks
                await pg_checks.warn_without_vacuum(engine)
                await pg_checks.warn_without_utf8(engine)
            if self._boot_id is not None:
                async with engine.connect() as conn:
                    state = await queries.load_clock_state(conn, self._boot_id)
                if state is not None:
                    self.now.resume(state)
            now = self._opened_at = self.now()
            clock = self.now
            gap = self._leases.gap()  # a leap this first reading accepted (resumed from a state)
            state, shift = clock.state(), (now, gap) if gap else None

            async def register(conn: AsyncConnection) -> tuple[int, str]:
                if self._publish_settings:
                    await queries.write_settings(conn, self.config)
                node_id, node_key = await queries.ensure_local_node(conn, self.config.dialect, now)
                await self._write_clock(conn, node_id, now, state, shift)
                return node_id, node_key

            self._node_id, self._node_key = await db.run_write(engine, register, self.config.write_retries)
            self._leases.moved()
            path = lane_path(self.config)
            if path is not None:
                config = self.config
                self._lanes = SqliteLanes(
                    path,
                    lambda raw: db.configure_sqlite(raw, config),
                    busy_timeout_s=config.sqlite_busy_timeout_s,
                    echo=config.echo_sql,
                )
        except BaseException as error:
            try:
                # An open cancelled while its first write waited (Ctrl-C behind another process's
                # lock) left that write running on the disposed engine: its connection was never
                # closed, and the CLI waited 5 s for the driver thread at exit (QA round 64).
                await db.settle(engine, _SETTLE_S)
            finally:
                await engine.dispose()
            if db.is_driver_error(error):  # e.g. a refused connection: asyncpg's bare OSError
                raise translate(error) from error
            raise
        self._engine = engine
        if self.config.run_sweeper:
            self.start_sweeper()

    async def _write_clock(
        self,
        conn: AsyncConnection,
        node_id: int,
        now: float,
        state: ClockState | None,
        shift: Shift | None,
    ) -> None:
        """Store the clock's state as of the reading ``now`` for later processes of this boot, in
        the caller's transaction, after moving the leases held before an accepted leap (``shift``):
        a stored acceptance always comes with its leases moved, so a process resuming it leaves
        them (QA: accepted by a sweep or by `tracker stats`, the acceptance was stored and the
        leases never moved, and a peer went past its cap)."""
        if shift is not None:
            await queries.shift_held_leases(conn, node_id, *shift, self.config.max_clock_skew_s)
        if self._boot_id is not None and state is not None:
            await queries.save_clock_state(conn, self.config.dialect, self._boot_id, state, now)

    async def _store_clock(self, now: float, state: ClockState | None, shift: Shift | None) -> None:
        """``_write_clock`` in a write transaction of its own (``LeaseClock`` calls it)."""
        node_id = self.node_id

        async def work(conn: AsyncConnection) -> None:
            await self._write_clock(conn, node_id, now, state, shift)

        # A move is not retried here: every operation waits while it runs, and a failed one is tried
        # again after a back-off while they go on by the held clock (``LeaseClock.shift``).
        await db.run_write(self.engine, work, 0 if shift else self.config.write_retries)

    async def _persist_clock(self) -> None:
        """Store the clock's state (each sweep), the held leases moved first after an acceptance."""
        await self._leases.save()

    async def close(self) -> None:
        """Stop the sweeper, let queued writes commit, then release every connection. Safe to call twice.

        Writes submitted once closing has begun raise ``TrackerClosed``: only what was queued before
        is committed, so ``close()`` returns even while other tasks keep writing, and ``abort()`` makes
        it stop waiting for them.
        """
        if (opener := self._foreign_loop()) is not None and not opener.is_closed():
            # Its connections are that loop's to close; once it is closed, what is left is released
            # here as well as it can be (an application that opened in one asyncio.run()).
            raise WrongEventLoop(f"{_WRONG_LOOP}; close it there")
        orphaned = opener is not None
        self._closing = True
        try:
            await self.stop_sweeper()
            await self._committer.drain()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._no_sweeps.wait(), _SETTLE_S)
            # Handed over at once, so that new calls find the tracker closed, to a release of its
            # own that a close() cut short (a caller's deadline) leaves running and the next one
            # awaits: cut short inside, it left them unreleased for good (QA round 18).
            if self._release is not None and self._release.get_loop() is not asyncio.get_running_loop():
                # Begun in a loop that has ended (a close() cut short there): released again here.
                self._release = asyncio.ensure_future(_release(*self._released, orphaned=True))
            if self._release is None and (self._engine is not None or self._lanes is not None):
                self._released = (self._lanes, self._engine)
                self._release = asyncio.ensure_future(_release(self._lanes, self._engine, orphaned=orphaned))
                self._engine = self._lanes = None
            if (release := self._release) is not None:
                try:
                    await asyncio.shield(release)
                finally:  # a close() running beside this one may have let go of it already
                    if release.done() and self._release is release:
                        self._release = None
        finally:
            self._closing = False

    def abort(self) -> None:
        """Abandon the writes not yet committed, so that a running (or the next) ``close()`` need not
        wait for them: a transaction waiting on the database (a lock, say) is cancelled and its callers
        get ``CommitOutcomeUnknown`` (it may have committed), queued ones ``TrackerClosed``. For a
        forced shutdown; ``close()`` still releases the connections. A tracker that is not open has no
        writes to abandon: there this does nothing (it left the tracker refusing every write once
        opened, QA round 22)."""
        if self._engine is None:
            return
        self._closing = True
        self._committer.abandon()
        if self._lanes is not None:
            # A selection's grant waiting for another process's lock gives up too: closing the lanes
            # waited for it, up to the whole busy timeout a try (QA round 64).
            self._lanes.write.abandon_waiting()

    async def __aenter__(self) -> Self:
        """Open the tracker unless it is open; nested (or concurrent) ``async with`` blocks share it,
        and the last to exit closes it: the first to exit closed it under the others (QA round 22)."""
        self._not_open_elsewhere()
        async with self._opening:
            if self._engine is None:
                await self._start()
            self._entered += 1
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        async with self._opening:  # a block entered meanwhile waits, then opens it again
            self._entered = max(0, self._entered - 1)
            if not self._entered:
                await self.close()

    @property
    def engine(self) -> AsyncEngine:
        """The SQLAlchemy engine, for the sweeper, the service and ad-hoc queries."""
        if self._engine is None:
            raise TrackerClosed(_NOT_OPEN)
        self._own_loop()
        return self._engine

    def _own_loop(self) -> None:
        """Raise ``WrongEventLoop`` for a call from another loop, before anything of this one is
        touched (the lease clock's move, the sweep counters)."""
        if self._foreign_loop() is not None:
            raise WrongEventLoop(_WRONG_LOOP)

    def _not_open_elsewhere(self) -> None:
        """Raise ``WrongEventLoop`` for entering a tracker open in another loop: taken as open, the
        block counted itself in, the owner's exit left the tracker open, and this block's exit
        failed to close it (QA round 70)."""
        if self._engine is not None and self._foreign_loop() is not None:
            raise WrongEventLoop(f"{_WRONG_LOOP}; close it first (there, or here once that loop has ended)")

    def _foreign_loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop that opened the tracker, when the caller runs in another one (checked where a call
        first needs the engine: every public call does, before it touches anything)."""
        running = asyncio._get_running_loop()
        if self._loop is None or running is None or running is self._loop:
            return None
        return self._loop

    @property
    def sqlite_lanes(self) -> SqliteLanes | None:
        """The SQLite lanes that run ingest, selection and the API's reads (see ``tracker.sqlite_lane``);
        ``None`` on Postgres. Their ``observers`` see their SQL."""
        return self._lanes

    def _write_lane(self) -> SqliteLane | None:
        return None if self._lanes is None else self._lanes.write

    def _read_lane(self) -> SqliteLane | None:
        return None if self._lanes is None else self._lanes.read

    @property
    def node_id(self) -> int:
        """This database's surrogate id for the local node (the origin of our own observations)."""
        if self._node_id is None:
            raise TrackerClosed(_NOT_OPEN)
        return self._node_id

    @property
    def node_key(self) -> str:
        """This tracker's stable node id, stored in its database; gossip names origins by it."""
        if self._node_key is None:
            raise TrackerClosed(_NOT_OPEN)
        return self._node_key

    # -- sweeper --------------------------------------------------------------------------------

    async def sweep(self, now: float | None = None) -> SweepReport:
        """Run one sweeper pass now, or as of ``now`` (Unix seconds; see ``tracker.sweeper``); returns
        what it did. ``now`` is checked like an event's time: NaN or infinity swept differently on
        the two engines (and stored NaN on Postgres), and a ``now`` further ahead of the clock than
        ``max_clock_skew_s`` would time out every peer and delete their mappings.

        A ``now`` ahead of the tracker's clock, within that limit (a scheduler's clock a little
        ahead), sweeps as of the tracker's: a pass ahead deleted leases still running, and the next
        selection handed their peers out past ``max_load_per_peer``, and it took peers seen within
        ``peer_timeout`` offline (QA round 72). A ``now`` behind it sweeps as of that time."""
        self._own_loop()
        at = validate_time(now, "now")
        if at is not None and at > (clock := self.now()):
            if at > clock + self.config.max_clock_skew_s:
                raise InvalidInput(
                    f"now is {at - clock:.6g} s ahead of the tracker's clock; the limit is "
                    f"{self.config.max_clock_skew_s:g} s (max_clock_skew_s)"
                )
            at = clock
        if self._closing:
            raise TrackerClosed("the tracker is closing")
        self._sweeps += 1
        self._no_sweeps.clear()
        try:
            return await sweep_once(self, at)
        finally:
            self._sweeps -= 1
            if not self._sweeps:
                self._no_sweeps.set()

    def start_sweeper(self) -> None:
        """Sweep every ``update_interval`` in a background task until ``stop_sweeper()`` or ``close()``."""
        self.engine  # noqa: B018 - raises TrackerClosed when not open
        if self._sweeper is None:
            self._sweeper = SweeperTask(self)
        self._sweeper.start()

    async def stop_sweeper(self) -> None:
        """Stop the background sweeper (a running pass is given a moment, then cancelled)."""
        if self._sweeper is not None:
            await self._sweeper.stop()

    @property
    def sweeper_running(self) -> bool:
        """Whether this process's background sweeper runs (``run_sweeper``, ``start_sweeper()``)."""
        return self._sweeper is not None and self._sweeper.running

    @property
    def sweeper_state(self) -> SweepState:
        """Counters of the background sweeper: passes, skipped passes, failures, the last report."""
        return self._sweep_state

    # -- writes ---------------------------------------------------------------------------------

    async def record_batch(self, events: Iterable[Event]) -> int:
        """Apply many events in one transaction, all or nothing; returns how many were applied.

        One bad event rejects the whole batch with ``InvalidInput`` naming its index and the reason.
        Concurrent calls share transactions (group commit, see ``tracker.ingest``); each returns once
        the transaction holding its events has committed.
        """
        self._own_loop()  # before the lease clock's lock, which is the loop's too
        self.engine  # noqa: B018 - closed or never opened: TrackerClosed, an empty batch too
        config, ahead = self.config, self._ahead_times
        if isinstance(events, Sequence):
            batch: Sequence[Event] = events
        else:
            try:
                batch = list(events)
            except TypeError:  # None, a number: a bare TypeError from deep inside (QA round 70)
                raise InvalidInput(f"events must be an iterable of events, got {events!r:.100}") from None

        def stamped(now: float) -> tuple[list[queries.Timed], int]:
            checked = check_batch(
                batch,
                limit=config.max_batch_events,
                now=now,
                max_skew_s=config.max_clock_skew_s,
                max_age_s=config.event_age_limit,
            )
            rounds = check_events_per_peer(checked, config.max_events_per_peer)
            return [queries.Timed(event, at) for event, at in ahead.dated(checked, now)], rounds

        # The reading stamps the events and is held until they commit: a move of held leases
        # between it and the transaction would put the outcomes' times and their leases' on two
        # different clocks, and the outcomes would close nothing.
        async with self._leases.reading() as now:
            timed, rounds = await off_loop(len(batch), stamped, now)
            if not timed:
                return 0
            self.engine  # noqa: B018 - raises TrackerClosed before anything is queued
            if self._closing:
                raise TrackerClosed("the tracker is closing: writes are no longer accepted")
            await self._committer.submit(timed, rounds)
        return len(timed)

    async def _apply(self, timed: Sequence[queries.Timed]) -> None:
        """Apply events in one write transaction (the group committer's unit of work)."""
        engine, node_id, config = self.engine, self.node_id, self.config
        async with self._leases.on_behalf() as now:  # of writers holding readings until this commits

            async def work(conn: db.DriverSQL) -> None:
                await queries.apply_events(conn, config.dialect, node_id, timed, config, now)

            await db.run_write_unit(engine, self._write_lane(), work, config.write_retries)

    @property
    def ingest_stats(self) -> GroupStats:
        """How many requests and events were committed in how many transactions (group commit)."""
        return self._committer.stats

    def ranking_load(self) -> RankingLoad:
        """Contents remembered as heavy and the rankings waiting for a slot now, light and heavy
        (``tracker_heavy_contents``, ``tracker_rankings_waiting``; tracker/heavy.py)."""
        slots = self._ranking_slots
        return RankingLoad(len(self._heavy), slots.waiting(False), slots.waiting(True))

    def ingest_oldest_wait_s(self) -> float:
        """Seconds the oldest write not yet committed has waited (0: none waiting): a write stuck
        behind a lock holds up every write queued after it (``tracker_ingest_oldest_wait_seconds``)."""
        return self._committer.oldest_wait_s()

    async def record(self, event: Event) -> None:
        """Apply one event (the single-event methods below are this with the event built for you)."""
        await self.record_batch((event,))

    async def record_peer_online(self, peer_id: str, *, at: float | None = None) -> None:
        """The peer announced itself or sent a heartbeat."""
        await self.record(PeerOnline(peer_id, at=at))

    async def record_peer_offline(self, peer_id: str, *, at: float | None = None) -> None:
        """The peer left; its session's uptime is added up to ``at``."""
        await self.record(PeerOffline(peer_id, at=at))

    async def record_download_speed(
        self, peer_id: str, bytes_per_sec: int, *, at: float | None = None
    ) -> None:
        """A download from the peer ran at ``bytes_per_sec``."""
        await self.record(SpeedSample(peer_id, bytes_per_sec, at=at))

    async def record_upload_success(
        self, peer_id: str, *, cid: str | None = None, bytes: int | None = None, at: float | None = None
    ) -> None:
        """The peer served a chunk."""
        await self.record(UploadOutcome(peer_id, True, at=at, cid=cid, bytes=bytes))

    async def record_upload_failure(
        self, peer_id: str, *, cid: str | None = None, bytes: int | None = None, at: float | None = None
    ) -> None:
        """The peer failed to serve a chunk."""
        await self.record(UploadOutcome(peer_id, False, at=at, cid=cid, bytes=bytes))

    async def record_content_available(self, cid: str, peer_id: str, *, at: float | None = None) -> None:
        """The peer holds ``cid``."""
        await self.record(ContentAvailable(cid, peer_id, at=at))

    async def record_content_unavailable(self, cid: str, peer_id: str, *, at: float | None = None) -> None:
        """The peer dropped ``cid``."""
        await self.record(ContentUnavailable(cid, peer_id, at=at))

    # -- reads ----------------------------------------------------------------------------------

    async def get_peer_metrics(self, peer_id: str) -> PeerMetrics | None:
        """Everything known about one peer, merged over origins; ``None`` for a peer never seen."""
        validate_id(peer_id)
        now, config, lag = self.now(), self.config, self.now.lag()

        async def work(conn: db.DriverSQL) -> queries.PeerRow | None:
            return await queries.peer_row(conn, peer_id, now, config, lag=lag)

        row = await db.run_read_unit(self.engine, self._read_lane(), work)
        return None if row is None else self._metrics(row)

    def _metrics(self, row: queries.PeerRow) -> PeerMetrics:
        config = self.config
        return PeerMetrics(
            peer_id=row.peer_key,
            uptime=timedelta(seconds=max(0.0, row.uptime_s)),  # an event dated ahead of our clock
            last_seen=from_unix(row.last_seen or None),  # 0: never sighted
            first_seen=from_unix(row.first_seen),
            online_since=from_unix(row.online_since),
            download_speed=0 if row.speed_bps is None else round(row.speed_bps),
            chunks_served=row.served,
            chunks_failed=row.failed,
            online=row.online,
            success_weight=row.success_weight,
            failure_weight=row.failure_weight,
            reputation_score=row.reputation,
            reliable_threshold=config.reliable_threshold,
            params=config.reputation,
        )

    async def get_available_peers(self, cid: str) -> list[str]:
        """Ids of the online holders of ``cid`` (peers past ``peer_timeout`` are never included)."""
        validate_id(cid, "cid")
        config = self.config
        # Before the slot: another loop's call waited there for good, and held a place (QA round 60).
        self._own_loop()
        async with self._ranking_slot(cid):  # the time read once it has one
            now, lag = self.now(), self.now.lag()

            async def work(conn: db.DriverSQL) -> list[str]:
                with self._heavy.timing(cid):
                    return await queries.available_peer_keys(conn, cid, now, config, lag=lag)

            return await db.run_read_unit(self.engine, self._read_lane(), work)

    async def select_best_peers(
        self, cid: str, n: int, *, strategy: str | None = None, seed: int | None = None
    ) -> list[PeerInfo]:
        """The best ``n`` online holders of ``cid`` to download from now, each handed a lease.

        ``strategy`` (default ``config.selection_strategy``): ``"best"`` ranks by reputation discounted
        by current load, in fixed steps of 0.02, then the least recently leased, then speed, then id
        (docs/load-balancing.md); ``"weighted"`` draws without replacement with probability
        proportional to that quality (``seed`` makes the draw repeatable). Proven unreliable peers and
        peers at their lease cap never appear; each returned peer carries one more lease until an
        outcome for it is recorded or ``lease_ttl_s`` passes. ``n <= 0`` or an unknown ``cid`` gives ``[]``.
        """
        validate_id(cid, "cid")
        if isinstance(n, bool) or not isinstance(n, int):
            raise InvalidInput(f"n must be an integer, got {n!r}")
        strategy = self.config.selection_strategy if strategy is None else strategy
        if strategy not in STRATEGIES:
            raise InvalidInput(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            # random.Random took a list or a dict as a bare TypeError, a str as a seed (QA round 70).
            raise InvalidInput(f"seed must be an integer or None, got {seed!r:.100}")
        self._own_loop()
        self.engine  # noqa: B018 - closed or never opened: TrackerClosed, for n <= 0 too
        if n <= 0:
            return []
        n = min(n, _MOST_ROWS)
        if self.config.dialect != "postgresql":
            return await self._select(cid, n, strategy, seed)
        async with self._ranking_slot(cid):  # see TrackerConfig.max_concurrent_selections
            return await self._select(cid, n, strategy, seed)

    async def _select(self, cid: str, n: int, strategy: str, seed: int | None) -> list[PeerInfo]:
        config, node_id, engine = self.config, self.node_id, self.engine
        draw = (self._random if seed is None else random.Random(seed)).getrandbits(31)

        async def rank(conn: db.DriverSQL, now: float, lag: float, limit: int) -> list[queries.RankedRow]:
            with self._heavy.timing(cid):
                return await queries.ranked_holders(
                    conn, cid, now, config, limit=limit, mode=strategy, seed=draw, lag=lag
                )

        async def grant(
            conn: db.DriverSQL,
            ranked: list[queries.RankedRow],
            now: float,
            want: int,
            *,
            ranked_here: bool,
            top_up: bool = False,
        ) -> tuple[list[queries.RankedRow], set[str]]:
            """The rows granted, and the peers passed over because other transactions held them."""
            held: set[str] = set()
            if ranked_here and config.dialect == "sqlite":
                # Ranked inside this exclusive transaction: the loads it read are still current.
                loads = {row.peer_key: row.load for row in ranked}
            elif top_up:
                # Postgres, a top-up: one peer at a time (queries.probe_loads), from a random place
                # among the candidates: concurrent top-ups of other processes rank alike too, and
                # probing from the top they queued on the same few (QA round 44).
                assert isinstance(conn, AsyncConnection)  # the lanes are SQLite's
                start = self._probe_start.randrange(len(ranked)) if ranked else 0
                order = ranked[start:] + ranked[:start]
                loads, held = await queries.probe_loads(
                    conn, [(row.peer_key, row.capacity) for row in order], want, now
                )
            else:
                # Counted again in the granting transaction: the cap holds whatever ran since the ranking.
                keys = [row.peer_key for row in ranked]
                loads = await queries.current_loads(conn, config.dialect, keys, now)
            chosen = [row for row in ranked if loads.get(row.peer_key, row.capacity) < row.capacity][:want]
            await queries.grant_leases(
                conn, config.dialect, node_id, cid, [row.peer_key for row in chosen], now, config.lease_ttl_s
            )
            return [replace(row, load=loads[row.peer_key]) for row in chosen], held

        async def rank_and_grant(
            skip: set[str], want: int, *, top_up: bool = False
        ) -> tuple[list[queries.RankedRow], bool, set[str]]:
            """Rank the holders but ``skip`` and grant ``want`` of them in one write transaction; and
            whether the ranking was cut off by its limit (holders may be left beyond it), and the
            peers it looked at."""
            # A few spares: a concurrent selector may fill a peer's last slot. A top-up looks wider: it
            # comes when others took the spares, and probes from a random place among these.
            limit = 2 * want + len(skip) + (_TOP_UP_WIDTH if top_up else 0)
            # One reading for the ranking and the grant (QA: a second reading that accepted a leap
            # counted the leases of the hold as lapsed, and a peer at cap 1 was handed out twice).
            async with self._leases.reading() as now:
                lag = self.now.lag()

                async def work(conn: db.DriverSQL) -> tuple[list[queries.RankedRow], bool, set[str]]:
                    ranked = await rank(conn, now, lag, limit)
                    fresh = [row for row in ranked if row.peer_key not in skip]
                    granted, held = await grant(conn, fresh, now, want, ranked_here=True, top_up=top_up)
                    # Peers another transaction held are looked at again by the next top-up: put
                    # aside, a selection gave up on free peers that a first pass had only locked
                    # for a moment (QA round 44).
                    more = len(ranked) >= limit or bool(held)
                    return granted, more, {row.peer_key for row in fresh} - held

                return await db.run_write_unit(
                    engine, self._write_lane(), work, config.write_retries, repeatable=True
                )

        # SQLite: one selection of a content at a time in this process, from its ranking to its commit.
        # Ranked beside each other (the read lane), concurrent selections all saw the same loads, took
        # the same top peers to their cap while the others idled, and once the spares of that one
        # ranking were full, answered with no peer at all (QA round 41: 52 of 128 selections from 32
        # callers empty, with two thirds of the slots free). Selections of other contents run beside
        # it. On Postgres each ranks in its granting transaction, at most max_concurrent_selections at
        # once: the spares absorb what the others grant meanwhile, and the top-up below the rest.
        one_at_a_time = self._selecting.hold(cid) if config.dialect == "sqlite" else contextlib.nullcontext()
        async with one_at_a_time:
            read_lane = self._read_lane()
            heavy = self._heavy.is_heavy(cid)

            async def rank_beside(
                skip: set[str], want: int, limit: int
            ) -> tuple[list[queries.RankedRow], bool, set[str]]:
                """SQLite: rank on the read lane, beside the writer (WAL), and queue for the write
                lock only to re-count and grant, as ``rank_and_grant`` does in one transaction."""
                assert read_lane is not None
                async with self._ranking_slots.hold(heavy):
                    # Read once it has its slot: taken before, leases that lapsed while it waited
                    # still counted, and the answer could be empty (QA round 60).
                    # By the clock leases are dated by: while a move of held leases is pending, the
                    # new clock's time counted them as lapsed, and every peer at its cap took a place
                    # among the candidates that the grant then refused (QA round 14).
                    at, lag = self._leases.peek(), self.now.lag()

                    async def rank_only(conn: db.DriverSQL) -> list[queries.RankedRow]:
                        return await rank(conn, at, lag, limit)

                    ranked = await db.run_read_unit(engine, read_lane, rank_only)
                fresh = [row for row in ranked if row.peer_key not in skip]
                more = len(ranked) >= limit
                if not fresh:
                    return [], more, set()
                # The loads are counted again with the grant's reading: this one need not be kept on
                # either side of a move of held leases.
                async with self._leases.reading() as now:

                    async def grant_ranked(conn: db.DriverSQL) -> list[queries.RankedRow]:
                        return (await grant(conn, fresh, now, want, ranked_here=False))[0]

                    rows = await db.run_write_unit(
                        engine, self._write_lane(), grant_ranked, config.write_retries, repeatable=True
                    )
                return rows, more, {row.peer_key for row in fresh}

            if read_lane is not None and (heavy or db.sqlite_writer_busy(engine)):
                # SQLite with the writer busy (ingest, other selections), or a heavy content
                # (tracker/heavy.py): rank beside the writer. Ranking a hot content takes
                # milliseconds that would otherwise hold up every write queued behind it
                # (docs/load-balancing.md), a heavy one a tenth of a second or more. With the writer
                # idle, rank and grant in one write transaction: the write lane's page cache stays
                # warm across its own commits, while a reader's is dropped whenever the file
                # changed, which costs a hot ranking ~20% (docs/benchmarks.md).
                rows, more, seen = await rank_beside(set(), n, 2 * n)
            else:
                rows, more, seen = await rank_and_grant(set(), n)
            # Short, with holders left beyond the ranking's spares: selections of other processes (or,
            # on Postgres, of this one) took the spares' slots since it ranked. Rank the holders not
            # looked at yet in a granting transaction, which sees those leases: exact on SQLite (its
            # write transaction is exclusive), on Postgres as of their commits, passing over the peers
            # that transactions still granting hold. Until 2026-12-07 such a call returned what was
            # left of the spares, often nothing, while most holders had free slots (QA round 41).
            # A heavy content's top-up on SQLite ranks beside the writer too (its ranking held the
            # writer for a tenth of a second or more, up to _TOP_UPS times; QA round 60): the grant
            # still counts the loads again, so the cap holds, at the price of the exactness above.
            for _ in range(_TOP_UPS):
                if len(rows) >= n or not more:
                    break
                want = n - len(rows)
                # Read again: the first pass may have taught that the content is heavy (QA round 61).
                heavy = self._heavy.is_heavy(cid)
                if read_lane is not None and heavy:
                    extra, more, looked_at = await rank_beside(
                        seen, want, 2 * want + len(seen) + _TOP_UP_WIDTH
                    )
                else:
                    extra, more, looked_at = await rank_and_grant(seen, want, top_up=True)
                rows += extra
                seen |= looked_at
        # repeatable=True above: a grant whose COMMIT went unanswered runs again rather than failing the
        # selection. If the first did commit, its leases were handed to nobody and lapse after
        # lease_ttl_s, like a cancelled selection's; the cap still holds, since the second grant
        # counts the loads again, the first's leases included.
        return [_peer_info(replace(row, rank=rank)) for rank, row in enumerate(rows, start=1)]

    def _ranking_slot(self, cid: str) -> contextlib.AbstractAsyncContextManager[None]:
        """A ranking of every holder of a content takes a ranking slot, as a selection does: on
        Postgres 24 clients reading a content of 100,000 holders (0.5 s each, no token needed) held
        every pooled connection, and heartbeats waited seconds for one (QA round 57); on SQLite they
        held both read threads, and a light content's selection waited seconds behind them. A freed
        slot goes to a light content first (tracker/heavy.py)."""
        return self._ranking_slots.hold(self._heavy.is_heavy(cid))

    async def get_content_availability(
        self, cid: str, *, limit: int | None = None
    ) -> ContentAvailability | None:
        """Online holders of ``cid`` ranked (reliable or not; the best ``limit`` of them, all when
        ``None``); ``replication_factor`` counts them all. ``None`` for an unknown cid."""
        validate_id(cid, "cid")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise InvalidInput(f"limit must be an integer >= 1 or None, got {limit!r}")
        if limit is not None:
            limit = min(limit, _MOST_ROWS)
        config = self.config
        self._own_loop()
        async with self._ranking_slot(cid), self._leases.reading() as now:  # loads count leases
            lag = self.now.lag()

            async def work(conn: db.DriverSQL) -> tuple[bool, float | None, list[queries.RankedRow], int]:
                known, last_updated = await queries.content_last_updated(conn, config.dialect, cid)
                if not known:
                    return False, None, [], 0
                with self._heavy.timing(cid):
                    if limit is None:
                        rows = await queries.ranked_holders(
                            conn, cid, now, config, limit=None, mode="all", lag=lag
                        )
                        return True, last_updated, rows, len(rows)
                    rows, holders = await queries.best_holders(conn, cid, now, config, limit=limit, lag=lag)
                    return True, last_updated, rows, holders

            known, last_updated, rows, holders = await db.run_read_unit(self.engine, self._read_lane(), work)
        if not known:
            return None
        return ContentAvailability(
            cid=cid,
            peers=tuple(await _converted(rows, _peer_info)),
            replication_factor=holders,
            last_updated=from_unix(last_updated),
        )

    async def list_peers(
        self, *, online_only: bool = False, limit: int = 100, after: str | None = None
    ) -> list[PeerMetrics]:
        """A page of peers in id order, ids after ``after`` (keyset pagination: pass the last id seen).

        >>> async def every_peer(tracker: AvailabilityTracker) -> list[str]:
        ...     ids, page = [], await tracker.list_peers(limit=500)
        ...     while page:
        ...         ids += [p.peer_id for p in page]
        ...         page = await tracker.list_peers(limit=500, after=ids[-1])
        ...     return ids
        """
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
            raise InvalidInput(f"limit must be an integer within 1..{MAX_PAGE}, got {limit!r}")
        if not isinstance(online_only, bool):
            raise InvalidInput(f"online_only must be True or False, got {online_only!r}")
        if after is not None:
            validate_id(after, "after")
        now, config, lag = self.now(), self.config, self.now.lag()

        async def work(conn: db.DriverSQL) -> list[queries.PeerRow]:
            return await queries.peer_page(
                conn, now, config, online_only=online_only, limit=limit, after=after, lag=lag
            )

        rows = await db.run_read_unit(self.engine, self._read_lane(), work)
        return await _converted(rows, self._metrics)

    async def stats(self) -> TrackerStats:
        """Counts of peers (total, online), contents, available mappings and open leases, as of now."""
        self._own_loop()
        config = self.config
        async with self._leases.reading() as now:  # open_leases
            lag = self.now.lag()

            async def work(conn: db.DriverSQL) -> queries.Counts:
                return await queries.counts(conn, now, config, lag=lag)

            counts = await db.run_read_unit(self.engine, self._read_lane(), work)
        return TrackerStats(
            node_key=self.node_key,
            peers_total=counts.peers_total,
            peers_online=counts.peers_online,
            contents_total=counts.contents_total,
            mappings_available=counts.mappings_available,
            open_leases=counts.open_leases,
        )

    async def under_replicated_count(self) -> int:
        """Contents with fewer online holders than ``replication_target`` (the analytics view's count)."""

        async def work(conn: AsyncConnection) -> int:
            return await queries.under_replicated_count(conn)

        return await db.run_read(self.engine, work)


#: Rows converted between two yields to the event loop (~3.4 us a row: a few milliseconds a slice).
_CONVERT_SLICE = 1_000


async def _converted(rows: Sequence[R], convert: Callable[[R], T]) -> list[T]:
    """``convert`` every row, yielding to the event loop between slices: a content with 100,000
    holders took ~0.35 s of conversion in one piece, and every other task of the process waited."""
    out: list[T] = []
    for start in range(0, len(rows), _CONVERT_SLICE):
        if start:
            await asyncio.sleep(0)
        out += map(convert, rows[start : start + _CONVERT_SLICE])
    return out


def _peer_info(row: queries.RankedRow) -> PeerInfo:
    return PeerInfo(
        peer_id=row.peer_key,
        reputation=row.reputation,
        download_speed=round(row.speed_bps),
        rank=row.rank,
        success_rate=row.success_rate,
        uptime_factor=row.uptime_factor,
        evidence=row.evidence,
        proven=row.proven,
        last_seen=from_unix(row.last_seen or None),  # 0: never sighted
        load=row.load,
        capacity=row.capacity,
    )

"""The sweeper: one idempotent pass (``sweep_once``) and the background task that repeats it.

A pass closes sessions that timed out, prunes what retention allows in bounded batches, and writes a
gossip state snapshot when a directory is configured. On a shared Postgres only the tracker holding
the sweep advisory lock runs a pass; the others skip it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from . import db
from .errors import StorageError, describe, translate
from .queries import forget, prune_expired_leases
from .queries import sweep as q
from .queries.clocks import database_time
from .sqlite_wal import truncate_grown_wal
from .state_export import snapshot_if_due

if TYPE_CHECKING:
    from .core import AvailabilityTracker

log = logging.getLogger(__name__)

# Any fixed number serves, as long as every tracker process uses the same one (and it differs from
# the migration lock in db.py).
SWEEP_LOCK_KEY = 0x5EE9_7AC3


@dataclass(frozen=True, kw_only=True)
class SweepReport:
    """What one pass did."""

    #: The tracker clock's time the pass ran for.
    now: float
    #: False when another tracker on the same Postgres held the sweep lock, so this one skipped.
    ran: bool
    peers_marked_offline: int = 0
    #: This node's mappings of peers no origin has seen within ``offline_mapping_retention_s``,
    #: turned into its removals (gossiped; deleted with the other tombstones after ``tombstone_keep_s``).
    departed_mappings_removed: int = 0
    #: Rows deleted per table.
    pruned: dict[str, int] = field(default_factory=dict)
    snapshot_path: Path | None = None
    #: Wall-clock seconds the pass took.
    duration_s: float = 0.0
    #: Set when the host's clock had leapt this many seconds ahead and the pass ran on elapsed time
    #: instead (tracker/clockleap.py).
    clock_leap_s: float | None = None
    #: Rows of this node dated beyond now + max_clock_skew_s brought back to now (first pass of a
    #: process and after the clock stepped back; ``queries.sweep.clamp_future``).
    future_rows_clamped: int = 0
    #: Postgres: how far the database server's clock is ahead of the tracker's time (negative:
    #: behind); ``None`` on SQLite, which has no clock of its own.
    database_clock_offset_s: float | None = None
    #: Why a snapshot that was due could not be written (a full disk, a directory made unwritable);
    #: the rest of the pass stands, and a pass tries again after ``snapshot_interval_s``.
    snapshot_error: str | None = None


async def sweep_once(tracker: AvailabilityTracker, now: float | None = None) -> SweepReport:
    """Run one pass for ``now`` (default: the tracker's, ``tracker.now()``). Safe to run again at any
    time."""
    config, engine = tracker.config, tracker.engine
    started = time.perf_counter()
    leap, own_time = None, now is None
    if now is None:
        now = tracker.now.for_sweep()
        leap = tracker.now.leap_s or None
    pending = tracker.now.stepped_back_to  # after the reading above, which may be what saw the step
    offset = await _database_clock_offset(tracker)
    async with _sweep_lock(engine) as acquired:
        if not acquired:
            await _save_clock(tracker)
            return SweepReport(
                now=now,
                ran=False,
                duration_s=time.perf_counter() - started,
                clock_leap_s=leap,
                database_clock_offset_s=offset,
            )
        node_id = tracker.node_id
        state = tracker._sweep_state
        clamped = 0
        # Stepped back, or a first pass; not while the clock is held: "now" is then behind the wall
        # clock on purpose, and on a shared Postgres other hosts' rows, correctly dated by a clock
        # that was right, would look ahead of it (QA: a hold resumed by a restart moved every
        # host's heartbeats back and their peers went offline). The repair waits for the hold to end.
        if own_time and leap is None and (pending is not None or not state.repaired_once):
            limits: list[float] = []

            async def clamp(conn: AsyncConnection) -> int:
                # Beyond the tracker's time (not the sweep's, which may lag behind an accepted leap),
                # brought back to when the clock was set right, or else when this process opened:
                # a removal made elsewhere since then, correctly dated, still wins.
                current = tracker.now()
                to = pending
                if not state.repaired_once:  # rows of earlier processes too
                    to = tracker._opened_at if to is None else min(to, tracker._opened_at)
                to = min(current, current if to is None else to)
                limit = current + config.max_clock_skew_s
                limits.append(limit)
                return await q.clamp_future(
                    conn, config.dialect, node_id, to, limit, config.lease_ttl_s, config.bandwidth_window
                )

            clamped = await db.run_write(engine, clamp, config.write_retries)
            # Committed: undated events no longer follow what the peers dated beyond it (aheadtimes).
            tracker._ahead_times.rows_clamped_beyond(limits[-1])
            state.repaired_once = True
            if tracker.now.stepped_back_to == pending:  # unless the clock stepped further back meanwhile
                tracker.now.stepped_back_to = None

        batch, retries = config.sweep_batch_size, config.write_retries
        offline = await _expire(engine, retries, batch, node_id, now, config.peer_timeout)
        # This node's departed peers' mappings become removals before any mapping is deleted as
        # stale: back from a downtime longer than the retention and tombstone_keep_s, the deletion
        # took this node's own first, and the removal that gossip carries was never made; the other
        # trackers kept them for good (QA round 36).
        retention = config.offline_mapping_retention_s
        removed = await _drain(
            engine,
            retries,
            batch,
            lambda conn: q.remove_departed_mappings(conn, node_id, now - retention, now, batch),
        )
        pruned = {
            "bandwidth_samples": await _prune_samples(tracker, now),
            "upload_outcomes": await _drain(
                engine,
                retries,
                batch,
                lambda conn: q.prune_outcomes(conn, now - config.outcome_retention_s, batch),
            ),
            "content_peers": await _drain(
                engine,
                retries,
                batch,
                lambda conn: q.prune_tombstones(conn, now, now - config.tombstone_keep_s, batch),
            )
            + await _prune_departed(tracker, now),
            "peer_leases": await _drain(
                engine, retries, batch, lambda conn: prune_expired_leases(conn, now, batch)
            ),
        }
        for table, forgotten in (await _forget(tracker, now)).items():
            pruned[table] = pruned.get(table, 0) + forgotten
        path, snapshot_error = await snapshot_if_due(tracker, now)
        await truncate_grown_wal(config)
        state.last_pass_at = tracker.now()
    await _save_clock(tracker)
    report = SweepReport(
        now=now,
        ran=True,
        peers_marked_offline=offline,
        departed_mappings_removed=removed,
        pruned=pruned,
        snapshot_path=path,
        duration_s=time.perf_counter() - started,
        clock_leap_s=leap,
        future_rows_clamped=clamped,
        database_clock_offset_s=offset,
        snapshot_error=snapshot_error,
    )
    log.info(
        "sweep done",
        extra={
            "action": "sweep",
            "offline": offline,
            "departed_mappings_removed": removed,
            "pruned": pruned,
            "snapshot": str(path) if path else None,
            "duration_s": report.duration_s,
            "clock_leap_s": leap,
            "future_rows_clamped": clamped,
            "database_clock_offset_s": offset,
        },
    )
    return report


async def _save_clock(tracker: AvailabilityTracker) -> None:
    """Store the clock's state for the next process of this boot, after the pass's own work: a
    failure here is logged, and must not cost the pass (QA: it did, before the pass began)."""
    try:
        await tracker._persist_clock()
    except StorageError as error:
        log.warning(
            "could not store the clock's state: %s",
            describe(error),
            extra={"action": "clock_state_not_saved"},
        )


async def _database_clock_offset(tracker: AvailabilityTracker) -> float | None:
    """Postgres: the server's clock less the tracker's time, read between two readings of ours.

    Trackers on several hosts share one database, and each stamps events by its own host's clock:
    one host far off (a leap across a reboot, which the stored clock state cannot see, or a host
    without NTP) pins peers online or times them out early for all of them. The server's clock is
    the one clock they share, so the offset from it is what tells that host apart (gauge
    ``tracker_database_clock_offset_seconds``); beyond ``max_clock_skew_s`` it is logged, once.
    """
    if tracker.config.dialect != "postgresql":
        return None

    async def read(conn: AsyncConnection) -> float:
        before = tracker.now()
        server = await database_time(conn)
        return server - (before + tracker.now()) / 2

    offset = await db.run_read(tracker.engine, read)
    state, limit = tracker._sweep_state, tracker.config.max_clock_skew_s
    if abs(offset) > limit and (
        state.database_clock_offset_s is None or abs(state.database_clock_offset_s) <= limit
    ):
        log.warning(
            "the database server's clock is %.1f s %s this tracker's time (more than max_clock_skew_s, "
            "%g s): check NTP on this host and on the server",
            abs(offset),
            "ahead of" if offset > 0 else "behind",
            limit,
            extra={"action": "database_clock_offset", "offset_s": offset},
        )
    state.database_clock_offset_s = offset
    return offset


class _LockHolder:
    """Holds Postgres's sweep lock for the length of a pass, in a transaction left open on a
    connection of its own, so that it ends with the transaction however the pass ends.

    A transaction's lock, not a session's: a pooler in transaction mode (PgBouncer) hands a client a
    server connection per transaction, and a session lock taken in one would stay with that server
    connection when it served the next client, and its unlock would run on another.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._conn: AsyncConnection | None = None

    async def __aenter__(self) -> bool:
        if self._engine.dialect.name != "postgresql":
            return True  # one SQLite file: the write lock serializes passes; overlapping ones are idempotent
        try:
            self._conn = await self._engine.connect()
            # The lock's transaction idles for the whole pass: a database's or role's
            # idle_in_transaction_session_timeout ended its session mid-pass, and the lock with it,
            # so that a second process could sweep beside this one (QA round 76). Off for this
            # transaction alone (SET LOCAL: a transaction pooler's next client does not inherit it).
            acquired = bool(
                await self._conn.scalar(
                    text(
                        "SELECT set_config('idle_in_transaction_session_timeout', '0', true) IS NOT NULL"
                        f" AND pg_try_advisory_xact_lock({SWEEP_LOCK_KEY})"
                    )
                )
            )
        except BaseException as error:
            await self._release()
            # As every other statement of the pass: a lost or refused connection passed as the
            # driver's or SQLAlchemy's own error, or a bare ConnectionError (QA round 53).
            if isinstance(error, Exception) and db.is_driver_error(error):
                raise translate(error) from error
            raise
        if not acquired:
            await self._release()
        return acquired

    async def __aexit__(self, *exc: object) -> None:
        await self._release()

    async def _release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            await conn.rollback()  # ends the transaction, and the lock with it
        except Exception as error:
            # The lock's session ended under the pass (idle_in_transaction_session_timeout, a server
            # restart), and the lock with it; the pass's own steps committed on connections of their
            # own, so it stands. Its connection is dropped, not pooled.
            log.warning(
                "the sweep lock's connection was lost during the pass: %s",
                error,
                extra={"action": "sweep_lock_lost"},
            )
            await conn.invalidate()
        except BaseException:
            # Cancelled: drop the server connection itself, which ends the transaction, rather than
            # return a lock-holding connection to the pool.
            await conn.invalidate()
            raise
        finally:
            await conn.close()


def _sweep_lock(engine: AsyncEngine) -> _LockHolder:
    return _LockHolder(engine)


async def _expire(
    engine: AsyncEngine, retries: int, batch: int, node_id: int, now: float, peer_timeout: float
) -> int:
    """Close stale sessions ``batch`` peers at a time: each slice found by a read, then closed in a
    short transaction of its own (``queries.sweep.stale_sessions``)."""
    total, after, cutoff = 0, 0, now - peer_timeout
    while True:

        async def find(conn: AsyncConnection, after: int = after) -> list[int]:
            return await q.stale_sessions(conn, node_id, cutoff, after, batch)

        ids = await db.run_read(engine, find)
        if ids:

            async def close(conn: AsyncConnection, after: int = after, upto: int = ids[-1]) -> int:
                return await q.mark_stale_offline(
                    conn, node_id, now, peer_timeout, after_peer_id=after, upto_peer_id=upto
                )

            total += await db.run_write(engine, close, retries)
        if len(ids) < batch:
            return total
        after = ids[-1]
        await asyncio.sleep(0)  # let request handlers in between slices


async def _drain(
    engine: AsyncEngine, retries: int, batch: int, step: Callable[[AsyncConnection], Awaitable[int]]
) -> int:
    """Repeat a bounded delete, one short transaction each, until a batch comes back short."""
    total = 0
    while True:
        deleted = await db.run_write(engine, step, retries)
        total += deleted
        if deleted < batch:
            return total
        await asyncio.sleep(0)  # let request handlers in between batches


#: Samples are pruned at most this often (or every ``sample_retention_s``, if shorter), and at a
#: process's first pass.
SAMPLE_PRUNE_EVERY_S = 3_600.0


async def _prune_samples(tracker: AvailabilityTracker, now: float) -> int:
    """Prune samples beyond each peer's window and older than retention, examining only peers written
    since the previous pruning minus the retention (only they can hold such samples), a slice at a
    time; when due only (``SAMPLE_PRUNE_EVERY_S``).

    With a day of retention, the peers written since the previous pruning minus the retention are
    every active peer: pruned at every pass, a quiet swarm of 100,000 peers cost 0.8-1.6 s per pass
    (so ~10 s at a million, every ``update_interval``, in a write transaction per 500 peers, and on
    a shared Postgres once per process). Samples outside the window only take room; an hour more of
    them costs less than examining every peer twice a minute."""
    config, engine = tracker.config, tracker.engine
    cutoff = now - config.sample_retention_s
    since = tracker._sweep_state.samples_pruned_at
    if since is not None and 0 <= now - since < min(SAMPLE_PRUNE_EVERY_S, config.sample_retention_s):
        return 0  # (a clock set back since: pruned now, and counted from now)
    touched_since = -1.0 if since is None else since - config.sample_retention_s
    slice_size = max(1, config.sweep_batch_size // max(1, config.bandwidth_window))
    chunk = max(1, min(config.sweep_batch_size, _MOST_IDS))
    total, after = 0, -1
    while True:
        # Read, so the ranking of a slice (2 s for a peer's million samples on SQLite) holds no write
        # lock; then deleted by id, a chunk per short write (QA rounds 57 and 58).
        async def doomed(conn: AsyncConnection, after: int = after) -> tuple[list[int], list[int]]:
            ids = await q.sample_prune_candidates(conn, touched_since, after, slice_size)
            return ids, (await q.doomed_samples(conn, ids, config.bandwidth_window, cutoff) if ids else [])

        ids, gone = await db.run_read(engine, doomed)
        if not ids:
            break
        for start in range(0, len(gone), chunk):

            async def delete(conn: AsyncConnection, part: list[int] = gone[start : start + chunk]) -> int:
                return await q.delete_samples(conn, part)

            total += await db.run_write(engine, delete, config.write_retries)
            await asyncio.sleep(0)  # let request handlers in between chunks
        after = ids[-1]
    tracker._sweep_state.samples_pruned_at = now
    return total


#: Ids one ``DELETE ... IN`` names at most: far below both drivers' limits on parameters (32,767).
_MOST_IDS = 5_000


#: Departed peers are forgotten at most this often, and at a process's first pass: each time walks
#: ``peer_stats``, ``peers`` and ``contents`` whole, and a row forgotten an hour late costs only room.
FORGET_EVERY_S = 3_600.0


async def _prune_departed(tracker: AvailabilityTracker, now: float) -> int:
    """Delete the mappings of departed peers that no tracker removed
    (``queries.sweep.prune_departed_mappings``), asking their origins for their rows again."""
    config, state = tracker.config, tracker._sweep_state
    batch = config.sweep_batch_size
    cutoff = now - config.offline_mapping_retention_s - config.tombstone_keep_s
    held = _held(state, now)
    asked: set[int] = set()

    async def step(conn: AsyncConnection) -> int:
        deleted = await q.prune_departed_mappings(conn, cutoff, batch, held)
        asked.update(await q.ask_again(conn, deleted))  # a retried attempt asked the same, or more
        return len(deleted)

    total = await _drain(tracker.engine, config.write_retries, batch, step)
    _hold(state, asked, now)
    return total


#: How long the sweeper leaves an origin's mappings alone after asking for its rows again
#: (``queries.sweep.ask_again``): long enough for a catch-up of a million rows at the gossip
#: interval, and the cost of a neighbour that never sweeps, which then resends, once an hour.
ASKED_HOLD_S = 3_600.0


def _held(state: SweepState, now: float) -> frozenset[int]:
    """The origins asked within ``ASKED_HOLD_S`` (by this process: a restart or another process may
    ask once more, which costs a resend, never a row)."""
    return frozenset(node for node, at in state.asked_at.items() if 0 <= now - at < ASKED_HOLD_S)


def _hold(state: SweepState, asked: set[int], now: float) -> None:
    state.asked_at.update(dict.fromkeys(asked, now))


async def _forget(tracker: AvailabilityTracker, now: float) -> dict[str, int]:
    """Forget, when due, the peer rows their origins stopped writing ``forget_after_s`` ago and then
    the peers and contents left with nothing (``queries.forget``); rows deleted per table.

    Mappings, outcomes and leases go first (earlier in the pass, by their own rules, which the
    retention waits for), then the rows, and last the ids nothing refers to any more, so one pass
    takes a departed peer all the way."""
    config, engine, state = tracker.config, tracker.engine, tracker._sweep_state
    since = state.forgotten_at
    if since is not None and 0 <= now - since < FORGET_EVERY_S:
        return {}
    batch, retries, dialect = config.sweep_batch_size, config.write_retries, config.dialect
    rows_cutoff = now - config.forget_after_s
    mappings_cutoff = now - config.offline_mapping_retention_s - config.tombstone_keep_s
    held = _held(state, now)
    asked: set[int] = set()

    async def rowless(conn: AsyncConnection, after: int) -> tuple[int, int | None]:
        deleted, upto = await forget.forget_rowless_mappings(conn, mappings_cutoff, after, batch, held)
        asked.update(await q.ask_again(conn, deleted))
        return len(deleted), upto

    steps: tuple[tuple[str, Callable[[AsyncConnection, int], Awaitable[tuple[int, int | None]]]], ...] = (
        ("content_peers", rowless),
        (
            "peer_stats",
            lambda conn, after: forget.forget_peer_rows(conn, rows_cutoff, mappings_cutoff, after, batch),
        ),
        ("peers", lambda conn, after: forget.forget_unused_peers(conn, dialect, after, batch)),
        ("contents", lambda conn, after: forget.forget_unused_contents(conn, dialect, after, batch)),
    )
    done = {table: await _walk(engine, retries, step) for table, step in steps}
    _hold(state, asked, now)
    state.forgotten_at = now
    return done


async def _walk(
    engine: AsyncEngine,
    retries: int,
    step: Callable[[AsyncConnection, int], Awaitable[tuple[int, int | None]]],
) -> int:
    """Run ``step`` over a table's key range, a slice per short transaction, until it says it is done."""
    total, after = 0, -1
    while True:

        async def one(conn: AsyncConnection, after: int = after) -> tuple[int, int | None]:
            return await step(conn, after)

        deleted, upto = await db.run_write(engine, one, retries)
        total += deleted
        if upto is None:
            return total
        after = upto
        await asyncio.sleep(0)  # let request handlers in between slices


# ---------------------------------------------------------------------------------------------
# The background task
# ---------------------------------------------------------------------------------------------


@dataclass
class SweepState:
    """What the sweeper remembers between passes (per process)."""

    samples_pruned_at: float | None = None
    #: When this process last forgot departed peers (``FORGET_EVERY_S``).
    forgotten_at: float | None = None
    #: The tracker's time at the end of this process's latest pass, however it was run.
    last_pass_at: float | None = None
    passes: int = 0
    skipped: int = 0
    failures: int = 0
    #: Passes whose due snapshot could not be written (the passes themselves count as done).
    snapshot_failures: int = 0
    #: After a failed snapshot, no pass tries again before this time of the tracker's clock.
    snapshot_retry_at: float | None = None
    last_report: SweepReport | None = None
    last_error: str | None = None
    #: Whether this process has brought this node's future-dated rows back yet (its first pass does).
    repaired_once: bool = False
    #: Postgres: the database server's clock less the tracker's time at the latest pass.
    database_clock_offset_s: float | None = None
    #: When this process last asked each other origin for its rows again (``ASKED_HOLD_S``).
    asked_at: dict[int, float] = field(default_factory=dict)


class SweeperTask:
    """Runs ``sweep_once`` every ``update_interval`` (jittered) until stopped.

    A failing pass is logged and counted, and the next one waits longer (doubling, capped at ten
    intervals) so a database outage is not hammered. ``stop()`` lets a running pass finish for a
    moment, then cancels it; a cancelled pass leaves no partial snapshot and its open transaction
    rolls back.
    """

    STOP_GRACE_S = 0.5

    def __init__(self, tracker: AvailabilityTracker) -> None:
        self._tracker = tracker
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._random = random.Random()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if self.running:
            return
        self._stop.clear()
        self._task = asyncio.create_task(self._run(), name="peer-tracker-sweeper")
        self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        """A sweeper that ended other than by ``stop()`` or a cancellation is logged and counted: one
        that died of an error outside a pass went unnoticed, and peers stopped expiring (QA round 22)."""
        if task.cancelled() or (error := task.exception()) is None:
            return
        state = self._tracker._sweep_state
        state.failures += 1
        state.last_error = f"{type(error).__name__}: {error}"
        log.error(
            "the sweeper stopped: %s",
            state.last_error,
            exc_info=error,
            extra={"action": "sweeper_died"},
        )

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        self._stop.set()
        # asyncio.wait, not wait_for: it raises nothing of the task's own, and an application that
        # cancelled every task at shutdown, this one among them, then got CancelledError out of
        # close(), which stopped before releasing the database (QA round 18).
        _, running = await asyncio.wait({task}, timeout=self.STOP_GRACE_S)
        if running:
            task.cancel()
            await asyncio.wait({task})

    def _delay(self, failures: int) -> float:
        interval = self._tracker.config.update_interval
        if failures:
            return float(min(interval * 2**failures, interval * 10))
        jitter = self._tracker.config.sweep_jitter
        return interval * (1.0 + self._random.uniform(-jitter, jitter))

    async def _run(self) -> None:
        state = self._tracker._sweep_state
        failures = 0
        while True:
            delay = self._delay(failures)
            try:
                await asyncio.wait_for(self._stop.wait(), delay)
                return
            except TimeoutError:
                pass
            try:
                report = await sweep_once(self._tracker)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                failures += 1
                state.failures += 1
                # Described: str() of a database error carries its statement and parameters (peer ids
                # in bulk), in every log line and in /readyz's and the CLI's report of the sweeper.
                state.last_error = describe(error)
                extra = {"action": "sweep_failed", "consecutive": failures}
                if isinstance(error, StorageError) or db.is_driver_error(error):
                    log.error("sweep failed: %s", state.last_error, extra=extra)
                    log.debug("sweep failed", exc_info=error, extra=extra)
                else:  # a defect: its traceback matters
                    log.exception("sweep failed", extra=extra)
            else:
                failures = 0
                state.last_report = report
                if report.ran:
                    state.passes += 1
                else:
                    state.skipped += 1

"""A writer queued behind another process's SQLite write lock gives up when its caller is cancelled,
instead of sitting out the whole busy timeout in a driver thread (QA round 59 #3).

SQLite-only: Postgres waits for a lock on the server, where asyncpg's cancellation reaches it.
The busy timeout is a minute in every test here, and the lock is held all along: a caller that
gave up and still waited would be tens of seconds late, not a fraction of one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tracker import AvailabilityTracker, TrackerConfig, db
from tracker.errors import CommitOutcomeUnknown, TrackerClosed, is_transient
from tracker.events import ContentAvailable, PeerOnline
from tracker.sqlite_begin import SLICE_S, Abandoned, Caller, begin_immediate, slice_ms, sliced
from tracker.testing import ManualClock

BUSY_TIMEOUT_S = 60.0
#: Far below the busy timeout, far above a slice: room for a slow, shared machine.
GAVE_UP_WITHIN_S = 10.0
#: A CLI command's exit after the signal: a few slices, and the interpreter's own shutdown. Waiting
#: for a leaked driver thread (5 s, QA round 64) does not fit.
CLI_EXIT_WITHIN_S = 3.0


@contextmanager
def _write_lock_held(path: Path) -> Iterator[sqlite3.Connection]:
    """Another process's writer: a connection holding the file's write lock until the block ends."""
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        yield other
        other.execute("ROLLBACK")
    finally:
        other.close()


def _config(path: Path) -> TrackerConfig:
    return TrackerConfig(
        database_url=f"sqlite+aiosqlite:///{path}",
        clock=ManualClock(1_800_000_000.0),
        sqlite_busy_timeout_s=BUSY_TIMEOUT_S,
    )


def _peers(path: Path) -> set[str]:
    with sqlite3.connect(path) as raw:
        return {row[0] for row in raw.execute("SELECT peer_key FROM peers")}


def _leases(path: Path) -> int:
    with sqlite3.connect(path) as raw:
        return int(raw.execute("SELECT count(*) FROM peer_leases").fetchone()[0])


def test_begin_immediate_waits_its_whole_timeout_in_slices_and_sliced_restores_the_busy_timeout(
    tmp_path: Path,
) -> None:
    path = tmp_path / "slices.db"
    sqlite3.connect(path).close()
    waiter = sqlite3.connect(path, isolation_level=None)
    tries: list[str] = []

    def execute(sql: str) -> object:
        tries.append(sql)
        return waiter.execute(sql)

    with _write_lock_held(path):
        started = time.monotonic()
        with pytest.raises(sqlite3.OperationalError, match="locked"), sliced(execute, 1.0):
            begin_immediate(execute, 1.0, None, is_transient)
        waited = time.monotonic() - started
    # The whole second, a slice a try (SQLite's busy handler sleeps in steps, so a try may end early).
    assert waited >= 1.0
    assert tries.count("BEGIN IMMEDIATE") >= 1.0 / SLICE_S
    assert (
        tries[0] == f"PRAGMA busy_timeout={int(SLICE_S * 1000)}" and tries[-1] == "PRAGMA busy_timeout=1000"
    )
    assert waiter.execute("PRAGMA busy_timeout").fetchone()[0] == 1000
    # Free, it begins at the first try.
    with sliced(waiter.execute, 1.0):
        begin_immediate(waiter.execute, 1.0, None, is_transient)
    assert waiter.execute("PRAGMA busy_timeout").fetchone()[0] == 1000
    assert waiter.in_transaction
    waiter.execute("ROLLBACK")
    waiter.close()


def test_begin_immediate_gives_up_within_a_slice_of_being_abandoned(tmp_path: Path) -> None:
    path = tmp_path / "abandon.db"
    sqlite3.connect(path).close()
    waiter = sqlite3.connect(path, isolation_level=None)
    waiter.execute(f"PRAGMA busy_timeout={slice_ms(BUSY_TIMEOUT_S)}")  # as the write lane keeps it
    caller = Caller()
    with _write_lock_held(path):
        threading.Timer(0.5, setattr, (caller, "gone", True)).start()
        started = time.monotonic()
        with pytest.raises(Abandoned):
            begin_immediate(waiter.execute, BUSY_TIMEOUT_S, caller, is_transient)
        assert time.monotonic() - started < GAVE_UP_WITHIN_S
    assert not waiter.in_transaction
    # Abandoned before the first try: never begins at all, even with the lock free.
    with pytest.raises(Abandoned):
        begin_immediate(waiter.execute, BUSY_TIMEOUT_S, caller, is_transient)
    assert not waiter.in_transaction
    waiter.close()


async def test_a_cancelled_selection_stops_waiting_for_the_lock_and_grants_no_lease(tmp_path: Path) -> None:
    """A selection's grant is a write on the lane (not group-committed): cancelled while it waits for
    another process's lock, it used to wait on, then hand out leases nobody would use."""
    path = tmp_path / "lane.db"
    async with AvailabilityTracker(_config(path)) as tracker:
        await tracker.record_batch([PeerOnline("peer-a"), ContentAvailable("cid-1", "peer-a")])
        with _write_lock_held(path):
            selecting = asyncio.create_task(tracker.select_best_peers("cid-1", 1))
            await asyncio.sleep(0.5)  # ranked; the grant waits for the lock in the lane's thread
            selecting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await selecting
            await asyncio.sleep(2 * SLICE_S)  # longer than its thread takes to notice
        # The lock is free: a grant still waiting would take it now. The next selection finds the
        # lane free and the peer unleased.
        chosen = await tracker.select_best_peers("cid-1", 1)
        assert [(p.peer_id, p.load) for p in chosen] == [("peer-a", 0)]
    assert _leases(path) == 1  # the second selection's


async def test_abort_lets_the_tracker_close_at_once_while_a_write_waits_for_the_lock(tmp_path: Path) -> None:
    """A forced shutdown (``abort()``, the service's second signal) cancels the group commit waiting
    for another process's lock; closing the lanes then waited for their thread to sit out the busy
    timeout, and the write went in once the lock was free."""
    path = tmp_path / "abort.db"
    tracker = AvailabilityTracker(_config(path))
    await tracker.open()
    try:
        with _write_lock_held(path):
            writing = asyncio.create_task(tracker.record_peer_online("peer-abandoned"))
            await asyncio.sleep(0.5)  # the group commit waits for the lock in the lane's thread
            tracker.abort()
            with pytest.raises(CommitOutcomeUnknown):
                await writing
            started = time.monotonic()
            await tracker.close()
            assert time.monotonic() - started < GAVE_UP_WITHIN_S
    finally:
        await tracker.close()
    assert _peers(path) == set()


async def test_abort_gives_up_a_selections_grant_waiting_for_the_lock(tmp_path: Path) -> None:
    """Its caller still waiting (not cancelled): ``abort()`` gave up the group commit only, and
    ``close()`` waited for the grant's whole busy timeout (QA round 64: 9.1 s of 10)."""
    path = tmp_path / "abort-select.db"
    tracker = AvailabilityTracker(_config(path))
    await tracker.open()
    try:
        await tracker.record_batch([PeerOnline("peer-a"), ContentAvailable("cid-1", "peer-a")])
        with _write_lock_held(path):
            selecting = asyncio.create_task(tracker.select_best_peers("cid-1", 1))
            await asyncio.sleep(0.5)  # ranked; the grant waits for the lock
            tracker.abort()
            started = time.monotonic()
            await tracker.close()
            assert time.monotonic() - started < GAVE_UP_WITHIN_S
            with pytest.raises(TrackerClosed, match="aborted before this write began"):
                await selecting
    finally:
        await tracker.close()
    assert _leases(path) == 0


async def test_an_open_cancelled_behind_the_lock_leaves_no_connection_behind(tmp_path: Path) -> None:
    """Its node registration waited for the lock; cancelled, it ran on against an engine already
    disposed, and its connection (with aiosqlite's thread) was never closed: a CLI command waited
    5 s for that thread at exit (QA round 64)."""
    path = tmp_path / "open.db"
    async with AvailabilityTracker(_config(path)):
        pass  # migrated
    before = _driver_threads()
    with _write_lock_held(path):
        # Without migrating (as the CLI's reading commands open): the wait is the registration's.
        config = dataclasses.replace(_config(path), auto_migrate=False)
        opening = asyncio.create_task(AvailabilityTracker(config).open())
        await asyncio.sleep(0.5)
        opening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opening
        # Its registration ended before the engine went: nothing left running on it.
        assert not [task for orphans in db._ORPHANS.values() for task in orphans if not task.done()]
        deadline = time.monotonic() + GAVE_UP_WITHIN_S
        while _driver_threads() - before and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not _driver_threads() - before


def _driver_threads() -> set[threading.Thread]:
    return {
        t for t in threading.enumerate() if t.name.endswith("(_connection_worker_thread)") and t.is_alive()
    }


async def test_a_cancelled_write_on_the_engine_stops_waiting_for_the_lock_and_writes_nothing(
    tmp_path: Path,
) -> None:
    """``db.run_write`` (the sweeper, gossip merges, imports) runs each attempt to its end for a
    cancelled caller (``to_completion``); one still waiting for the lock ends instead."""
    path = tmp_path / "engine.db"
    wrote = False

    async def work(conn: object) -> None:
        nonlocal wrote
        wrote = True

    async with AvailabilityTracker(_config(path)) as tracker:
        engine = tracker.engine
        with _write_lock_held(path):
            writing = asyncio.create_task(db.run_write(engine, work, 0))
            await asyncio.sleep(0.5)
            writing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await writing
            started = time.monotonic()
            await db.settle(engine, BUSY_TIMEOUT_S)
            assert time.monotonic() - started < GAVE_UP_WITHIN_S
            assert not db._ORPHANS.get(engine.sync_engine)
        assert not wrote
        # A write whose caller stays waits for the lock, slice after slice, and gets it once it is free.
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        writing = asyncio.create_task(db.run_write(engine, work, 0))
        await asyncio.sleep(4 * SLICE_S)
        other.execute("ROLLBACK")
        other.close()
        await writing
        assert wrote


def test_ctrl_c_stops_a_cli_command_waiting_for_the_write_lock_at_once(tmp_path: Path) -> None:
    """QA round 59 #3: ``tracker sweep`` behind another process's write lock exited 130 only once
    its busy timeout (30 s) ran out."""
    path = tmp_path / "cli.db"
    url = f"sqlite+aiosqlite:///{path}"
    env = {
        **os.environ,
        "TRACKER_DATABASE_URL": url,
        "TRACKER_SQLITE_BUSY_TIMEOUT_S": str(BUSY_TIMEOUT_S),
    }
    migrate = [sys.executable, "-m", "tracker", "db", "upgrade"]
    subprocess.run(migrate, env=env, check=True, capture_output=True, timeout=120)
    with _write_lock_held(path):
        process = subprocess.Popen(
            [sys.executable, "-m", "tracker", "sweep"], env=env, stderr=subprocess.PIPE, text=True
        )
        try:
            _wait_until_it_opened(process, path)
            time.sleep(0.5)  # now in its first write (opening registers the node), waiting for the lock
            started = time.monotonic()
            process.send_signal(signal.SIGINT)
            _, stderr = process.communicate(timeout=BUSY_TIMEOUT_S * 2)
            elapsed = time.monotonic() - started
        finally:
            process.kill()
    assert process.returncode == 130, stderr
    assert elapsed < CLI_EXIT_WITHIN_S, (elapsed, stderr)
    assert "Traceback" not in stderr, stderr


def _wait_until_it_opened(process: subprocess.Popen[str], path: Path) -> None:
    """Until ``process`` has the SQLite file open (Linux: its descriptors), so the signal lands in
    the command, not in the interpreter's start-up."""
    fds = Path(f"/proc/{process.pid}/fd")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        try:
            if any(os.readlink(fd) == str(path) for fd in fds.iterdir()):
                return
        except (FileNotFoundError, PermissionError):
            pass
        time.sleep(0.05)
    raise AssertionError("the command never opened the database")

"""An embedding application cancels calls and closes the tracker at any moment; nothing is left
holding the database (QA round 18), on both engines."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace

import asyncpg
import pytest
from conftest import _dsn
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection

from tracker import AvailabilityTracker, TrackerConfig, db
from tracker.testing import ManualClock


def _sqlite_threads() -> set[threading.Thread]:
    return {thread for thread in threading.enumerate() if "_connection_worker_thread" in thread.name}


async def _only_threads_of_before(before: set[threading.Thread]) -> bool:
    """Whether the SQLite worker threads started since ``before`` have ended (each ends shortly
    after its connection is closed: it finishes the close it was handed first)."""
    for _ in range(200):
        if _sqlite_threads() <= before:
            return True
        await asyncio.sleep(0.01)
    return False


async def _server_sessions(url: str) -> int:
    """Sessions the server holds on the tracker's Postgres database (0 on SQLite)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        return 0
    conn = await asyncpg.connect(_dsn(url, "postgres"))
    try:
        query = "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()"
        return int(await conn.fetchval(query, parsed.database))
    finally:
        await conn.close()


async def test_a_transaction_whose_caller_is_cancelled_runs_to_its_end_and_returns_its_connection(
    tracker: AvailabilityTracker,
) -> None:
    """Cancelled inside, an SQLite transaction's rollback was cancelled too and its connection, never
    returned, held the write lock until the garbage collector found it: every later write failed
    as locked (a cancelled ``sweep()``, QA round 18)."""
    engine = tracker.engine
    inside = asyncio.Event()

    async def slow_write(conn: AsyncConnection) -> None:
        await conn.execute(text("INSERT INTO tracker_settings (name, value) VALUES ('probe', 1)"))
        inside.set()
        await asyncio.sleep(0.2)

    caller = asyncio.create_task(db.run_write(engine, slow_write, 0))
    await inside.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await db.settle(engine, 5)
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    async with engine.connect() as conn:
        stored = (await conn.execute(text("SELECT value FROM tracker_settings WHERE name = 'probe'"))).all()
    assert [tuple(row) for row in stored] == [(1,)]
    await tracker.record_peer_online("after")  # the database takes writes


async def test_close_releases_everything_after_the_application_cancelled_the_sweeper_task(
    config: TrackerConfig,
) -> None:
    """A shutdown routine that cancels every task, the sweeper's among them, then closes: close()
    raised CancelledError and kept the engine (QA round 18)."""
    before = _sqlite_threads()
    tracker = await AvailabilityTracker.open(replace(config, run_sweeper=True, update_interval=0.01))
    await tracker.record_peer_online("p")
    await asyncio.sleep(0.05)
    (sweeper,) = [task for task in asyncio.all_tasks() if task.get_name() == "peer-tracker-sweeper"]
    sweeper.cancel()
    await asyncio.sleep(0)
    await tracker.close()
    assert await _only_threads_of_before(before)
    assert await _server_sessions(config.database_url) == 0


@pytest.mark.parametrize("deadline_s", [0.0005, 0.002, 0.01])
async def test_a_close_cut_short_by_a_deadline_is_finished_by_the_next(
    config: TrackerConfig, deadline_s: float
) -> None:
    """close() handed the engine over before awaiting its release: cut short there, the next close()
    found nothing to release and the connections stayed open (QA round 18)."""
    before = _sqlite_threads()
    tracker = await AvailabilityTracker.open(config)
    await tracker.record_peer_online("p")
    try:
        await asyncio.wait_for(tracker.close(), deadline_s)
    except TimeoutError:
        pass
    await tracker.close()
    assert await _only_threads_of_before(before)
    assert await _server_sessions(config.database_url) == 0


async def test_sweeps_running_when_close_begins_end_before_the_engine_is_released(
    config: TrackerConfig, clock: ManualClock
) -> None:
    """Sweeps already running went on after close() disposed the engine, and opened connections on it
    that nobody closed (10 Postgres sessions left; QA round 18)."""
    before = _sqlite_threads()
    tracker = await AvailabilityTracker.open(config)
    await tracker.record_batch([])
    await tracker.record_peer_online("p", at=clock.now - 1000)
    sweeps = [asyncio.create_task(tracker.sweep()) for _ in range(6)]
    await asyncio.sleep(0.002)
    await tracker.close()
    await asyncio.gather(*sweeps, return_exceptions=True)
    assert await _only_threads_of_before(before)
    assert await _server_sessions(config.database_url) == 0

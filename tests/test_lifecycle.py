"""An embedding application cancels calls and closes the tracker at any moment; nothing is left
holding the database (QA round 18), on both engines."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import re
import threading
import warnings
from collections.abc import Coroutine, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from conftest import _dsn
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection

from tracker import AvailabilityTracker, ConfigError, TrackerClosed, TrackerConfig, WrongEventLoop, db
from tracker.events import PeerOnline, SpeedSample
from tracker.sweeper import SweeperTask
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


@pytest.mark.parametrize("kind", ["read", "write"])
async def test_work_whose_caller_gave_up_while_it_waited_for_a_connection_is_not_begun(
    tracker: AvailabilityTracker, kind: str
) -> None:
    """Run to their end, 2,000 reads whose callers had given up waiting for a pooled connection held
    every later caller for 6.5 s, and 300 held heartbeats for 31 s (QA round 70): now, once they get
    a connection, they give it back without beginning."""
    engine = tracker.engine
    pool: Any = engine.pool
    held = [await engine.connect().start() for _ in range(pool.size() + pool._max_overflow)]
    begun: list[int] = []

    async def work(conn: AsyncConnection) -> None:
        begun.append(1)
        await conn.execute(text("SELECT 1"))

    run = db.run_read if kind == "read" else (lambda engine, work: db.run_write(engine, work, 0))
    callers = [asyncio.create_task(run(engine, work)) for _ in range(20)]
    await asyncio.sleep(0.1)
    for caller in callers:
        caller.cancel()
    await asyncio.gather(*callers, return_exceptions=True)
    for conn in held:
        await conn.close()
    await db.settle(engine, 10)
    assert begun == []
    assert pool.checkedout() == 0
    await run(engine, work)  # and a caller still waiting is served
    assert begun == [1]


async def test_close_waits_for_calls_in_flight_and_refuses_those_that_come_later(
    config: TrackerConfig, db_url: str
) -> None:
    """close() returned with 100 reads still running, which then finished on connections nothing
    closed (2 Postgres sessions, 22 SQLite file descriptors until the garbage collector, QA round
    70); and a call holding the engine from before ran on the pool that disposing made."""
    tracker = await AvailabilityTracker.open(config)
    engine = tracker.engine

    async def slow(conn: AsyncConnection) -> int:
        await asyncio.sleep(0.3)
        return int((await conn.execute(text("SELECT 1"))).scalar_one())

    reads = [asyncio.create_task(db.run_read(engine, slow)) for _ in range(8)]
    await asyncio.sleep(0.05)
    await tracker.close()
    assert all(read.done() for read in reads)
    assert [read.result() for read in reads] == [1] * 8
    assert await _server_sessions(db_url) == 0
    with pytest.raises(TrackerClosed):
        await db.run_read(engine, slow)


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


async def test_a_tracker_used_from_another_event_loop_says_so_and_writes_nothing(
    tracker: AvailabilityTracker,
) -> None:
    """Used from another loop, a Postgres tracker failed with asyncpg's bare RuntimeError and dropped
    a connection; SQLite's went on with locks and tasks of the loop that opened it (QA round 18)."""
    await tracker.record_content_available("c", "held")

    async def from_another_loop() -> list[str]:
        calls: list[Coroutine[Any, Any, object]] = [
            tracker.record_peer_online("p"),
            tracker.record_batch([PeerOnline("p"), SpeedSample("p", 5)]),
            tracker.get_peer_metrics("held"),
            tracker.select_best_peers("c", 3),
            # It took a ranking slot first, waited there for good and kept the slot (QA round 60).
            tracker.get_available_peers("c"),
            tracker.get_content_availability("c"),
            tracker.list_peers(),
            tracker.stats(),
            tracker.sweep(),
            tracker.close(),  # the loop that opened it is running: its connections are its to close
            tracker.__aenter__(),  # it counted itself in: the owner's exit left the tracker open (QA 70)
            tracker.open(),
        ]
        messages = []
        for call in calls:
            with pytest.raises(WrongEventLoop) as caught:
                await call
            messages.append(str(caught.value))
        return messages

    messages = await asyncio.to_thread(asyncio.run, from_another_loop())
    assert all("opened in another event loop" in message for message in messages)
    assert await tracker.get_peer_metrics("p") is None
    assert [peer.peer_id for peer in await tracker.select_best_peers("c", 3)] == ["held"]
    assert tracker._ranking_slots._free == tracker._ranking_slots.places  # none kept by the other loop
    assert tracker._entered == 1  # the fixture's block alone


async def test_a_call_before_open_from_another_loop_leaves_the_rankings_usable(config: TrackerConfig) -> None:
    """A ranking call on a tracker not opened yet, made in a loop that then ended, bound its ranking
    slots to that loop, and every ranking of the tracker opened in the next loop failed with a
    RuntimeError (QA round 61)."""
    tracker = AvailabilityTracker(config)

    async def too_early() -> None:
        with pytest.raises(TrackerClosed):
            await tracker.get_available_peers("c")

    await asyncio.to_thread(asyncio.run, too_early())
    async with tracker:
        await tracker.record_content_available("c", "p")
        assert await tracker.get_available_peers("c") == ["p"]
        assert (await tracker.get_content_availability("c")) is not None
        assert [p.peer_id for p in await tracker.select_best_peers("c", 1)] == ["p"]


async def test_a_tracker_whose_loop_has_ended_is_closed_from_the_next_one(config: TrackerConfig) -> None:
    """An application opens the tracker in one ``asyncio.run()`` and closes it in the next: close()
    releases what is left; on Postgres it logged an error with a traceback for each connection."""
    before = _sqlite_threads()

    async def opened() -> AvailabilityTracker:
        tracker = await AvailabilityTracker.open(config)
        await tracker.record_peer_online("p")
        return tracker

    tracker = await asyncio.to_thread(asyncio.run, opened())

    async def closed_elsewhere() -> None:
        with pytest.raises(WrongEventLoop):
            await tracker.get_peer_metrics("p")
        await tracker.close()

    with _captured_errors() as logged:
        await asyncio.to_thread(asyncio.run, closed_elsewhere())
    assert logged == []
    assert await _only_threads_of_before(before)
    # asyncpg's connections of an ended loop cannot be closed from another: the pool forgot them,
    # and their sessions end when Python collects them (each with asyncio's unclosed-transport warning).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    assert await _server_sessions(config.database_url) == 0
    async with AvailabilityTracker(config) as reopened:  # and nothing was lost
        assert (metrics := await reopened.get_peer_metrics("p")) is not None and metrics.online


@contextlib.contextmanager
def _captured_errors() -> Iterator[list[logging.LogRecord]]:
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append  # type: ignore[method-assign]
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield records
    finally:
        root.removeHandler(handler)


async def test_a_tracker_closed_and_opened_again_in_another_loop_works_there_sweeper_included(
    config: TrackerConfig,
) -> None:
    """A tracker object opened by a lifespan per test (or per ``asyncio.run()``): in its second loop
    the sweeper died without a word, and Postgres selections and close() raised RuntimeError about
    the first loop's locks (QA round 22)."""
    tracker = AvailabilityTracker(replace(config, run_sweeper=True, update_interval=0.01))

    async def session(peer: str) -> None:
        async with tracker:
            passes = tracker.sweeper_state.passes
            await tracker.record_content_available("c", peer)
            # More callers than selection slots, so that they wait on (and bind) its semaphore.
            callers = 4 * tracker.config.selection_slots
            await asyncio.gather(*(tracker.select_best_peers("c", 1) for _ in range(callers)))
            await asyncio.gather(*(tracker.sweep() for _ in range(3)))
            for _ in range(500):
                if tracker.sweeper_state.passes > passes:
                    break
                await asyncio.sleep(0.01)
            assert tracker.sweeper_state.passes > passes

    for peer in ("p1", "p2", "p3"):
        await asyncio.to_thread(asyncio.run, session(peer))
    assert tracker.sweeper_state.failures == 0, tracker.sweeper_state.last_error
    async with AvailabilityTracker(config) as reopened:
        assert sorted(await reopened.get_available_peers("c")) == ["p1", "p2", "p3"]


async def test_a_sweeper_that_dies_outside_a_pass_is_logged_and_counted(
    config: TrackerConfig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(self: SweeperTask, failures: int) -> float:
        raise RuntimeError("no delay")

    monkeypatch.setattr(SweeperTask, "_delay", broken)
    async with AvailabilityTracker(replace(config, run_sweeper=True)) as tracker:
        for _ in range(100):
            if tracker.sweeper_state.failures:
                break
            await asyncio.sleep(0.01)
        assert tracker.sweeper_state.last_error == "RuntimeError: no delay"
    assert [r.getMessage() for r in caplog.records if getattr(r, "action", None) == "sweeper_died"] == [
        "the sweeper stopped: RuntimeError: no delay"
    ]


@pytest.mark.parametrize("target", ["file", "file/snaps"])
async def test_a_snapshot_dir_that_cannot_be_written_is_refused_when_the_tracker_opens(
    config: TrackerConfig, tmp_path: Path, target: str
) -> None:
    """Found out by the sweeper, every pass failed with a bare OSError and backed off, expiry with
    it (QA round 22). (Tests run as root, which may write into any directory: a file stands in.)"""
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(ConfigError, match=r"snapshot_dir .* cannot be created"):
        await AvailabilityTracker.open(replace(config, snapshot_dir=str(tmp_path / target), run_sweeper=True))


async def test_a_missing_snapshot_dir_is_created_when_the_tracker_opens(
    config: TrackerConfig, tmp_path: Path
) -> None:
    target = tmp_path / "a" / "b"
    async with AvailabilityTracker(replace(config, snapshot_dir=str(target), run_sweeper=True)):
        assert target.is_dir()


async def test_a_tracker_that_writes_no_snapshots_neither_needs_nor_creates_snapshot_dir(
    config: TrackerConfig, tmp_path: Path
) -> None:
    """`tracker stats` run with the service's environment was refused, or created the directory as
    its own user (QA round 23): only a tracker whose sweeper runs checks it when it opens."""
    (tmp_path / "file").write_text("")
    for target in (tmp_path / "file" / "snaps", tmp_path / "new"):
        async with AvailabilityTracker(replace(config, snapshot_dir=str(target))) as tracker:
            await tracker.stats()
        assert not target.exists()


async def test_a_close_cut_short_in_a_loop_that_ended_is_finished_by_a_close_in_the_next(
    config: TrackerConfig,
) -> None:
    """The release begun in the first loop, cancelled when that loop ended, was awaited from the
    next one: close() raised CancelledError and the engine stayed (QA round 23)."""
    before = _sqlite_threads()

    async def cut_short() -> AvailabilityTracker:
        tracker = await AvailabilityTracker.open(config)
        await tracker.record_peer_online("p")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(tracker.close(), 0.0005)
        return tracker

    tracker = await asyncio.to_thread(asyncio.run, cut_short())

    async def close_again() -> None:
        await tracker.close()

    await asyncio.to_thread(asyncio.run, close_again())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    assert await _only_threads_of_before(before)
    assert await _server_sessions(config.database_url) == 0


async def test_nested_async_with_blocks_share_the_tracker_and_the_last_to_exit_closes_it(
    config: TrackerConfig,
) -> None:
    """A library that wraps its work in ``async with tracker`` inside the application's own block
    closed the tracker under the application (QA round 22)."""
    tracker = AvailabilityTracker(config)
    async with tracker as outer:
        async with tracker as inner:
            assert inner is outer
            await inner.record_peer_online("p")
        await outer.record_peer_online("q")  # still open
        assert {p.peer_id for p in await outer.list_peers()} == {"p", "q"}
    with pytest.raises(TrackerClosed):
        await tracker.record_peer_online("r")
    # Opened by open(), one block closes it, as before.
    opened = await AvailabilityTracker.open(config)
    async with opened:
        await opened.record_peer_online("r")
    with pytest.raises(TrackerClosed):
        await opened.record_peer_online("s")
    assert await _server_sessions(config.database_url) == 0


async def test_abort_before_open_or_after_close_leaves_the_next_open_working(config: TrackerConfig) -> None:
    """abort() on a tracker not yet open made it refuse every write once opened (QA round 22)."""
    tracker = AvailabilityTracker(config)
    tracker.abort()
    async with tracker:
        await tracker.record_peer_online("p")
    tracker.abort()
    async with tracker:
        await tracker.record_peer_online("q")
        assert {p.peer_id for p in await tracker.list_peers()} == {"p", "q"}


async def test_open_on_a_tracker_opens_that_tracker_with_its_own_config(
    config: TrackerConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A classmethod alone, ``await tracker.open()`` opened another tracker on ./tracker.db with the
    default settings and returned it: the writes went there without a word (QA round 56)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    tracker = AvailabilityTracker(config)
    with pytest.raises(TrackerClosed, match=r"`async with tracker:` or `await tracker\.open\(\)`"):
        assert tracker.node_key
    opened = await tracker.open()
    try:
        assert opened is tracker and tracker.config is config
        assert await tracker.open() is tracker  # open already: as a nested `async with`
        await tracker.record_peer_online("where-am-i")
    finally:
        await tracker.close()
    assert list(cwd.iterdir()) == []
    async with AvailabilityTracker(config) as again:
        assert [p.peer_id for p in await again.list_peers()] == ["where-am-i"]
    with pytest.raises(
        TypeError,
        match=re.escape("config must be a TrackerConfig, e.g. TrackerConfig(database_url=...), not str"),
    ):
        AvailabilityTracker(config.database_url)  # type: ignore[arg-type]


async def test_writes_queued_when_abort_comes_are_refused_not_left_waiting(config: TrackerConfig) -> None:
    """Writes queued behind a flusher that abort() cancelled before its first step waited for good,
    close() having returned (QA round 40). Each gets its answer; what was refused was not written."""
    tracker = await AvailabilityTracker.open(config)
    writes = [asyncio.create_task(tracker.record_peer_online(f"p{i}")) for i in range(20)]
    await asyncio.sleep(0)
    tracker.abort()
    await tracker.close()
    results = await asyncio.wait_for(asyncio.gather(*writes, return_exceptions=True), 10)
    assert {type(r).__name__ for r in results} <= {"NoneType", "TrackerClosed", "CommitOutcomeUnknown"}
    refused = {f"p{i}" for i, r in enumerate(results) if isinstance(r, TrackerClosed)}
    assert refused
    async with AvailabilityTracker(config) as again:
        stored = {p.peer_id for p in await again.list_peers()}
    assert not stored & refused


async def test_async_with_blocks_entered_at_once_open_the_tracker_once(config: TrackerConfig) -> None:
    """Two tasks entering ``async with tracker`` together each opened an engine, and the first one's
    connections were never released (QA round 25)."""
    tracker = AvailabilityTracker(config)
    engines: list[Any] = []
    both_inside = asyncio.Barrier(2)

    async def use(peer: str) -> None:
        async with tracker:
            engines.append(tracker.engine)
            await both_inside.wait()
            await tracker.record_peer_online(peer)

    await asyncio.gather(use("a"), use("b"))
    assert engines[0] is engines[1]
    with pytest.raises(TrackerClosed):
        await tracker.record_peer_online("c")
    assert await _server_sessions(config.database_url) == 0


async def test_a_block_entered_while_the_last_one_closes_the_tracker_gets_it_open_again(
    config: TrackerConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Entered while the last block's exit was closing the tracker, a block found the engine still
    there, counted itself in and got a tracker refusing every write (QA round 26)."""
    tracker = AvailabilityTracker(config)
    closing, go_on = asyncio.Event(), asyncio.Event()
    stop_sweeper = tracker.stop_sweeper

    async def slow_stop() -> None:  # stands for a sweep pass that close() lets finish
        closing.set()
        await go_on.wait()
        await stop_sweeper()

    monkeypatch.setattr(tracker, "stop_sweeper", slow_stop)

    async def first() -> None:
        async with tracker:
            await tracker.record_peer_online("a")

    async def second() -> None:
        await closing.wait()
        async with tracker:
            await tracker.record_peer_online("b")
            assert {p.peer_id for p in await tracker.list_peers()} == {"a", "b"}

    entering = asyncio.ensure_future(second())
    closed = asyncio.ensure_future(first())
    await closing.wait()
    await asyncio.sleep(0)  # the second block is waiting to enter
    go_on.set()
    await asyncio.gather(closed, entering)
    assert await _server_sessions(config.database_url) == 0


async def test_two_closes_at_once_both_return(config: TrackerConfig) -> None:
    """close() is safe to call twice, and was not at once: the second raised AttributeError (QA
    round 26)."""
    tracker = await AvailabilityTracker.open(config)
    await tracker.record_peer_online("a")
    assert await asyncio.gather(tracker.close(), tracker.close()) == [None, None]
    assert await _server_sessions(config.database_url) == 0

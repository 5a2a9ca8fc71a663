"""The SQLite write-ahead log under overlapping readers: the sweeper empties it once it grew past its
limit (QA round 73: two readers taking turns, one always open, kept SQLite from ever restarting it,
and it grew 15 MB/s under an ingest), and says so when a reader outlasts its wait."""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest

from tracker import AvailabilityTracker, TrackerConfig, sqlite_wal
from tracker.events import PeerOnline, SpeedSample
from tracker.testing import ManualClock

LIMIT = 256 * 1024


@contextmanager
def _readers_taking_turns(path: Path) -> Iterator[None]:
    """Two readers, each holding a read 0.2 s and starting the next at once, offset by 0.1 s: no read
    is long, but one is always open."""
    stop = threading.Event()
    started = threading.Barrier(3)

    def read(offset: float) -> None:
        with closing(sqlite3.connect(path, isolation_level=None)) as conn:
            started.wait()
            stop.wait(offset)
            while not stop.is_set():
                conn.execute("BEGIN")
                conn.execute("SELECT count(*) FROM peer_stats").fetchone()
                stop.wait(0.2)
                conn.execute("COMMIT")

    threads = [threading.Thread(target=read, args=(offset,)) for offset in (0.0, 0.1)]
    for thread in threads:
        thread.start()
    started.wait()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join()


async def _grow_wal(tracker: AvailabilityTracker, path: Path) -> int:
    for round_ in range(400):
        await tracker.record_batch(
            [e for i in range(100) for e in (PeerOnline(f"p{i}"), SpeedSample(f"p{i}", 1_000 + round_))]
        )
        if (size := sqlite_wal._wal_bytes(str(path))) > 4 * LIMIT:
            return size
    pytest.fail(f"the log did not grow past {4 * LIMIT} bytes: the readers did not hold it")


@pytest.fixture
def small_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_wal, "WAL_SIZE_LIMIT", LIMIT)


@pytest.mark.usefixtures("small_limit")
async def test_the_sweeper_empties_a_log_that_readers_taking_turns_kept_growing(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    config = TrackerConfig(database_url=f"sqlite+aiosqlite:///{path}", clock=ManualClock())
    async with AvailabilityTracker(config) as tracker:
        with _readers_taking_turns(path):
            grown = await _grow_wal(tracker, path)
            await tracker.record_peer_online("p0")  # and it goes on growing without a sweep
            assert sqlite_wal._wal_bytes(str(path)) >= grown
            assert (await tracker.sweep()).ran
            assert sqlite_wal._wal_bytes(str(path)) < LIMIT
            await tracker.record_peer_online("after")  # writes go on, into a log started again
        assert (metrics := await tracker.get_peer_metrics("after")) is not None and metrics.online
        assert await sqlite_wal.truncate_grown_wal(config) is None  # within the limit: nothing to do


@pytest.mark.usefixtures("small_limit")
async def test_a_read_longer_than_the_wait_leaves_the_log_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sqlite_wal, "CHECKPOINT_WAIT_S", 0.2)
    path = tmp_path / "t.db"
    config = TrackerConfig(database_url=f"sqlite+aiosqlite:///{path}", clock=ManualClock())
    async with AvailabilityTracker(config) as tracker:
        await tracker.record_peer_online("p0")
        with closing(sqlite3.connect(path, isolation_level=None)) as session:  # an operator's session
            session.execute("BEGIN")
            session.execute("SELECT count(*) FROM peer_stats").fetchone()
            grown = await _grow_wal(tracker, path)
            with caplog.at_level(logging.WARNING, logger="tracker.sweeper"):
                checkpoint = await sqlite_wal.truncate_grown_wal(config)
            assert checkpoint is not None and not checkpoint.done and checkpoint.after >= grown
            assert "a read or write held for more than 0.2 s" in caplog.text
            session.execute("COMMIT")
        checkpoint = await sqlite_wal.truncate_grown_wal(config)
        assert checkpoint is not None and checkpoint.done and checkpoint.after == 0
        await tracker.record_peer_online("after")
        assert (metrics := await tracker.get_peer_metrics("after")) is not None and metrics.online


async def test_a_log_within_its_limit_and_postgres_are_left_alone(db_url: str) -> None:
    async with AvailabilityTracker(TrackerConfig(database_url=db_url, clock=ManualClock())) as tracker:
        await tracker.record_peer_online("p")
        assert await sqlite_wal.truncate_grown_wal(tracker.config) is None
        assert (await tracker.sweep()).ran

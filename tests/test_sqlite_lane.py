"""The SQLite lanes: ingest, selection and the API's reads run whole in a lane thread, commit or roll
back as one, keep other processes' locks as retryable conflicts, and show their SQL to observers."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from tracker import AvailabilityTracker, TrackerConfig, db
from tracker.db import configure_sqlite, create_engine, run_read_unit
from tracker.errors import StorageError, TrackerClosed, TransientStorageError
from tracker.events import ContentAvailable, PeerOnline, SpeedSample
from tracker.sqlite_lane import LaneConnection, SqliteLane, SqliteLanes, lane_path
from tracker.testing import ManualClock


def _lane(path: Path, *, read_only: bool = False) -> SqliteLane:
    config = TrackerConfig(database_url=f"sqlite+aiosqlite:///{path}")
    return SqliteLane(
        str(path),
        lambda raw: configure_sqlite(raw, config),
        [],
        read_only=read_only,
        busy_timeout_s=config.sqlite_busy_timeout_s,
    )


@asynccontextmanager
async def _newcomers_holding_cid_1(
    path: Path, holders: int
) -> AsyncIterator[tuple[AvailabilityTracker, SqliteLanes]]:
    """A tracker on ``path`` where ``holders`` newcomers (a cap of one lease each) hold cid-1."""
    config = TrackerConfig(database_url=f"sqlite+aiosqlite:///{path}", clock=ManualClock(1_800_000_000.0))
    async with AvailabilityTracker(config) as tracker:
        await tracker.record_batch([ContentAvailable("cid-1", f"peer-{i}") for i in range(holders)])
        assert tracker.sqlite_lanes is not None
        yield tracker, tracker.sqlite_lanes


def _count(path: Path, table: str = "t") -> int:
    with sqlite3.connect(path) as raw:
        return int(raw.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


@pytest.fixture
def table_file(tmp_path: Path) -> Path:
    path = tmp_path / "lane.db"
    with sqlite3.connect(path) as raw:
        raw.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT NOT NULL)")
    return path


async def test_a_unit_commits_its_statements_together_and_returns_its_value(table_file: Path) -> None:
    lane = _lane(table_file)

    async def unit(conn: LaneConnection) -> list[tuple[int, str]]:
        await conn.exec_driver_sql("INSERT INTO t (k, v) VALUES (?, ?)", [(1, "a"), (2, "b")])
        return list(await conn.exec_driver_sql("SELECT k, v FROM t ORDER BY k", ()))

    try:
        assert await lane.transaction(unit) == [(1, "a"), (2, "b")]
    finally:
        await lane.close()
    assert _count(table_file) == 2


async def test_a_unit_that_fails_midway_leaves_nothing_and_the_lane_goes_on(table_file: Path) -> None:
    lane = _lane(table_file)

    async def failing(conn: LaneConnection) -> None:
        await conn.exec_driver_sql("INSERT INTO t (k, v) VALUES (?, ?)", (1, "a"))
        await conn.exec_driver_sql("INSERT INTO t (k, v) VALUES (?, ?)", (2, None))  # NOT NULL

    async def fine(conn: LaneConnection) -> None:
        await conn.exec_driver_sql("INSERT INTO t (k, v) VALUES (?, ?)", (3, "c"))

    try:
        with pytest.raises(sqlite3.IntegrityError):
            await lane.transaction(failing)
        await lane.transaction(fine)
    finally:
        await lane.close()
    with sqlite3.connect(table_file) as raw:
        assert raw.execute("SELECT k FROM t").fetchall() == [(3,)]


async def test_a_unit_that_awaits_anything_but_its_connection_is_refused_and_rolled_back(
    table_file: Path,
) -> None:
    lane = _lane(table_file)

    async def sleeps(conn: LaneConnection) -> None:
        await conn.exec_driver_sql("INSERT INTO t (k, v) VALUES (?, ?)", (1, "a"))
        await asyncio.sleep(0)  # would need the event loop, which the lane's thread cannot reach

    try:
        with pytest.raises(RuntimeError, match="awaited something other than its connection"):
            await lane.transaction(sleeps)
    finally:
        await lane.close()
    assert _count(table_file) == 0


async def test_a_closed_lane_refuses_work(table_file: Path) -> None:
    lane = _lane(table_file)
    await lane.close()
    await lane.close()  # twice is fine

    async def unit(conn: LaneConnection) -> None:
        await conn.exec_driver_sql("SELECT 1", ())

    with pytest.raises(TrackerClosed):
        await lane.transaction(unit)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite+aiosqlite:////var/lib/tracker/t.db", "/var/lib/tracker/t.db"),
        ("sqlite+aiosqlite:///t.db", "t.db"),
        ("postgresql+asyncpg://u@127.0.0.1/db", None),
    ],
)
def test_the_lane_opens_only_a_file_that_a_second_connection_shares(url: str, expected: str | None) -> None:
    assert lane_path(TrackerConfig(database_url=url)) == expected


async def test_the_tracker_has_lanes_on_an_sqlite_file_and_none_on_postgres(
    tracker: AvailabilityTracker,
) -> None:
    assert (tracker.sqlite_lanes is not None) == (tracker.config.dialect == "sqlite")


async def test_a_read_only_lane_refuses_to_write(table_file: Path) -> None:
    lane = _lane(table_file, read_only=True)

    async def writes(conn: LaneConnection) -> None:
        await conn.exec_driver_sql("INSERT INTO t (k, v) VALUES (?, ?)", (1, "a"))

    try:
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            await lane.transaction(writes)
    finally:
        await lane.close()
    assert _count(table_file) == 0


async def test_reads_see_every_acknowledged_write_at_once(tmp_path: Path) -> None:
    clock = ManualClock(1_800_000_000.0)
    config = TrackerConfig(database_url=f"sqlite+aiosqlite:///{tmp_path / 'raw.db'}", clock=clock)
    async with AvailabilityTracker(config) as tracker:
        speeds: list[int] = []
        for n in range(1, 41):  # each write on the write lane, each read right after on the read lane
            speeds.append(n * 1_000)
            await tracker.record_download_speed("peer-a", speeds[-1])
            clock.advance(1)
            metrics = await tracker.get_peer_metrics("peer-a")
            assert metrics is not None
            assert metrics.download_speed == round(sum(speeds[-10:]) / len(speeds[-10:]))


async def test_another_process_holding_the_write_lock_is_a_retryable_conflict_and_loses_nothing(
    tmp_path: Path,
) -> None:
    clock = ManualClock(1_800_000_000.0)
    url = f"sqlite+aiosqlite:///{tmp_path / 'busy.db'}"
    config = TrackerConfig(database_url=url, clock=clock, sqlite_busy_timeout_s=0.05, write_retries=1)
    async with AvailabilityTracker(config) as tracker:
        await tracker.record_batch(
            [PeerOnline("peer-a"), SpeedSample("peer-a", 1_000), ContentAvailable("cid-1", "peer-a")]
        )
        other = sqlite3.connect(str(make_url(url).database), isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # another process's writer, holding the file's write lock
            with pytest.raises(TransientStorageError, match="database is locked"):
                await tracker.record_batch([SpeedSample("peer-a", 9_000)])
            with pytest.raises(TransientStorageError):
                await tracker.select_best_peers("cid-1", 1)
            other.execute("ROLLBACK")
        finally:
            other.close()
        # Nothing of the refused batch was written; the tracker writes again once the lock is free.
        metrics = await tracker.get_peer_metrics("peer-a")
        assert metrics is not None and metrics.download_speed == 1_000
        await tracker.record_batch([SpeedSample("peer-a", 3_000)])
        metrics = await tracker.get_peer_metrics("peer-a")
        assert metrics is not None and metrics.download_speed == 2_000


async def test_the_lanes_statements_reach_their_observers(tmp_path: Path) -> None:
    config = TrackerConfig(database_url=f"sqlite+aiosqlite:///{tmp_path / 'o.db'}")
    async with AvailabilityTracker(config) as tracker:
        lanes = tracker.sqlite_lanes
        assert lanes is not None
        seen: list[tuple[str, bool]] = []
        lanes.observers.append(lambda sql, _params, many: seen.append((sql.split()[0].upper(), many)))
        await tracker.record_peer_online("peer-a")
        await tracker.get_peer_metrics("peer-a")
    assert ("INSERT", True) in seen
    assert ("SELECT", False) in seen


async def test_a_driver_error_on_the_read_lane_is_a_storage_error(table_file: Path) -> None:
    config = TrackerConfig(database_url=f"sqlite+aiosqlite:///{table_file}")
    engine, lane = create_engine(config), _lane(table_file, read_only=True)

    async def broken(conn: LaneConnection) -> None:
        await conn.exec_driver_sql("SELECT k FROM no_such_table", ())

    try:
        with pytest.raises(StorageError, match="no such table") as raised:
            await run_read_unit(engine, lane, broken)
        assert isinstance(raised.value.__cause__, sqlite3.OperationalError)
    finally:
        await lane.close()
        await engine.dispose()


async def test_a_selection_cancelled_midway_commits_whole_and_the_tracker_goes_on(tmp_path: Path) -> None:
    """docs/reliability.md: a cancelled caller stops waiting, its lane transaction does not stop."""
    path = tmp_path / "cancel.db"
    async with _newcomers_holding_cid_1(path, 4) as (tracker, lanes):
        entered, release = threading.Event(), threading.Event()

        def hold_the_lease_insert(sql: str, _params: object, _many: bool) -> None:
            if sql.startswith("INSERT INTO peer_leases"):  # in the lane thread, mid-transaction
                entered.set()
                release.wait(10)

        lanes.observers.append(hold_the_lease_insert)
        selecting = asyncio.create_task(tracker.select_best_peers("cid-1", 2))
        assert await asyncio.to_thread(entered.wait, 10)
        selecting.cancel()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await selecting
        lanes.observers.remove(hold_the_lease_insert)

        # The writer is free at once, and the next selection sees the two leases handed to nobody:
        # those peers are at a newcomer's cap of one lease, so only the other two are left.
        chosen = await tracker.select_best_peers("cid-1", 4)
        assert [p.load for p in chosen] == [0, 0]
        await tracker.record_peer_online("peer-9")
    with sqlite3.connect(path) as raw:
        leased = [row[0] for row in raw.execute("SELECT peer_id FROM peer_leases")]
    assert len(leased) == len(set(leased)) == 4


async def test_selections_rank_beside_a_busy_writer_and_the_grant_recounts_under_the_cap(
    tmp_path: Path,
) -> None:
    """A selection that finds the writer busy ranks on the read lane instead of waiting behind it; its
    grant, on the write lane, re-counts the leases. Two selections ranked from the same snapshot (every
    newcomer at load 0, cap 1) must not both lease the same peer. Of two contents the same peers hold:
    one process's selections of one content rank one after the other (QA round 41)."""
    path = tmp_path / "busy-writer.db"
    async with _newcomers_holding_cid_1(path, 3) as (tracker, lanes):
        await tracker.record_batch([ContentAvailable("cid-2", f"peer-{i}") for i in range(3)])
        held, release = threading.Event(), threading.Event()
        rankings_while_held = 0
        counted = threading.Lock()

        def observe(sql: str, _params: object, many: bool) -> None:
            nonlocal rankings_while_held
            if many and not held.is_set():  # the ingest batch's first statement, in the write lane
                held.set()
                release.wait(10)
            elif sql.startswith("WITH merged") and held.is_set() and not release.is_set():
                with counted:  # the ranking statement, while the writer is still held
                    rankings_while_held += 1

        lanes.observers.append(observe)
        ingest = asyncio.create_task(tracker.record_batch([PeerOnline("peer-x")]))
        assert await asyncio.to_thread(held.wait, 10)
        selections = [asyncio.create_task(tracker.select_best_peers(cid, 2)) for cid in ("cid-1", "cid-2")]
        for _ in range(500):
            if rankings_while_held == 2:
                break
            await asyncio.sleep(0.01)
        assert rankings_while_held == 2  # both ranked while the ingest held the writer
        assert not any(s.done() for s in selections)  # and wait for it only to grant
        release.set()
        chosen = [await s for s in selections]
        await ingest
        lanes.observers.remove(observe)

    picked = sorted(p.peer_id for result in chosen for p in result)
    assert sorted(len(result) for result in chosen) == [1, 2]  # the second found two at their cap
    assert picked == ["peer-0", "peer-1", "peer-2"]
    assert all(p.load == 0 and p.capacity == 1 for result in chosen for p in result)
    with sqlite3.connect(path) as raw:
        leased = [row[0] for row in raw.execute("SELECT peer_id FROM peer_leases")]
    assert len(leased) == len(set(leased)) == 3


async def test_the_wal_a_long_reader_grew_shrinks_back_once_it_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator's long read keeps checkpoints from recycling the WAL; it grew by every commit and
    kept that size (hundreds of MB in a QA pass) until the tracker closed."""
    monkeypatch.setattr(db, "WAL_SIZE_LIMIT", 512 * 1024)
    path = tmp_path / "t.db"
    wal = Path(f"{path}-wal")
    tracker = await AvailabilityTracker.open(TrackerConfig(database_url=f"sqlite+aiosqlite:///{path}"))

    async def write(batches: int) -> None:
        for b in range(batches):
            await tracker.record_batch([PeerOnline(f"p{b}-{i}") for i in range(1000)])

    try:
        reader = sqlite3.connect(path, isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM peers").fetchone()  # holds its snapshot
        await write(40)
        grown = wal.stat().st_size
        reader.execute("COMMIT")
        reader.close()
        await write(3)  # the first commit checkpoints the whole log; the next starts it over
        assert grown > 4 * 1024 * 1024 and wal.stat().st_size <= 512 * 1024, (grown, wal.stat().st_size)
    finally:
        await tracker.close()


async def test_echo_sql_logs_the_lanes_statements_whatever_sqlalchemys_logger_level(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLAlchemy sets its loggers to WARNING on import; the lanes logged at INFO through them, so
    with ``echo_sql`` on, ingest, selections and reads on SQLite never showed (QA round 11)."""
    config = TrackerConfig(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'echo.db'}", clock=ManualClock(), echo_sql=True
    )
    async with AvailabilityTracker(config) as tracker:
        caplog.clear()
        await tracker.record_batch([PeerOnline("a"), ContentAvailable("movie", "a")])
        await tracker.select_best_peers("movie", 1)
    lanes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[sqlite lane]")]
    assert any("INSERT INTO peer_stats" in m for m in lanes), lanes[:5]
    assert any("peer_leases" in m for m in lanes)

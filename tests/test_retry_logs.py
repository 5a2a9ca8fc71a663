"""A retried database error is logged as a short line that names it, never as the failed statement:
asyncpg's and SQLAlchemy's messages carry the whole SQL and its parameters (peer ids in bulk), and
each retry of a deadlocked gossip merge logged ~1.7 KB (a 48-minute soak)."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import asyncpg
import pytest
from conftest import FakeClock, _dsn
from gossip_helpers import KEY, LocalNet
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection

from tracker import AvailabilityTracker, StorageError, TrackerConfig, TransientStorageError, db
from tracker.events import PeerOnline
from tracker.gossip.agent import GossipAgent
from tracker.gossip.config import GossipConfig
from tracker.service.logs import TextFormatter

#: Longest a retry's whole log line may be, time, level, logger and fields included.
MOST_CHARACTERS = 400
PEER = "peer-with-a-recognisable-id"


@asynccontextmanager
async def _write_locked(db_url: str, engine_name: str) -> AsyncIterator[None]:
    """Another session holding what every write needs: the SQLite file's write lock, or the peers table."""
    if engine_name == "sqlite":
        other = sqlite3.connect(str(make_url(db_url).database), isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            yield
            other.execute("ROLLBACK")
        finally:
            other.close()
        return
    conn = await asyncpg.connect(_dsn(db_url))
    try:
        async with conn.transaction():
            await conn.execute("LOCK TABLE peers IN ACCESS EXCLUSIVE MODE")
            yield
    finally:
        await conn.close()


@contextmanager
def _retry_lines(caplog: pytest.LogCaptureFixture) -> Iterator[list[logging.LogRecord]]:
    found: list[logging.LogRecord] = []
    with caplog.at_level(logging.DEBUG, logger="tracker"):
        yield found
    found.extend(r for r in caplog.records if getattr(r, "action", None) == "write_retry")


async def _touch_peer(conn: AsyncConnection) -> None:
    await conn.execute(text("UPDATE peers SET peer_key = :key WHERE peer_key = :key"), {"key": PEER})


@pytest.mark.parametrize("how", ["record_batch", "run_write"])
async def test_a_retried_lock_conflict_is_logged_short_named_and_without_its_sql(
    db_url: str, engine_name: str, clock: FakeClock, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    """Through the ingest path (SQLite's lane: a bare sqlite3 error) and through ``run_write`` on the
    engine, as the gossip merge and the sweeper write (SQLAlchemy's error, statement and all)."""
    config = TrackerConfig(
        database_url=db_url, clock=clock, write_retries=1, sqlite_busy_timeout_s=0.05, pg_lock_timeout_s=0.05
    )
    async with AvailabilityTracker(config) as tracker:
        with _retry_lines(caplog) as lines:
            async with _write_locked(db_url, engine_name):
                with pytest.raises(TransientStorageError) as raised:
                    if how == "record_batch":
                        await tracker.record_batch([PeerOnline(PEER)])
                    else:
                        await db.run_write(tracker.engine, _touch_peer, config.write_retries)
    warnings = [r for r in lines if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in lines]
    line = TextFormatter().format(warnings[0])
    assert len(line) <= MOST_CHARACTERS, line
    named = "database is locked" if engine_name == "sqlite" else "LockNotAvailableError [SQLSTATE 55P03]"
    assert named in line and "attempt 1 of 2" in line, line
    # In the message itself: the CLI's commands print that alone (QA round 69).
    assert named in warnings[0].getMessage()
    # The error the caller gets says the same in as few words (an application's "failed: %s" line);
    # the driver's error, statement and all, stays its cause for a traceback.
    said = str(raised.value)
    assert said.startswith("database conflict, retries exhausted: ") and named in said, said
    assert raised.value.__cause__ is not None
    for text_ in (line, said):
        assert len(text_) <= MOST_CHARACTERS, text_
        for leaked in ("INSERT", "UPDATE", "SELECT", "BEGIN", "[SQL:", "parameters", PEER):
            assert leaked not in text_, text_


async def test_a_failed_statement_reaches_the_caller_as_a_short_storage_error(
    db_url: str, engine_name: str, clock: FakeClock
) -> None:
    """A failure that is not a conflict: its message names the driver's error, never the statement."""

    async def _into_nowhere(conn: AsyncConnection) -> None:
        await conn.execute(text("UPDATE no_such_table SET x = :key"), {"key": PEER})

    async with AvailabilityTracker(TrackerConfig(database_url=db_url, clock=clock)) as tracker:
        with pytest.raises(StorageError) as raised:
            await db.run_write(tracker.engine, _into_nowhere, 1)
    said = str(raised.value)
    named = "no such table" if engine_name == "sqlite" else "UndefinedTableError [SQLSTATE 42P01]"
    assert not isinstance(raised.value, TransientStorageError)
    assert said.startswith("database error: ") and named in said and len(said) <= MOST_CHARACTERS, said
    for leaked in ("UPDATE no_such_table", "[SQL:", "parameters", PEER):
        assert leaked not in said, said
    assert PEER in str(raised.value.__cause__)


async def test_a_gossip_exchange_failing_on_its_database_is_logged_short_and_without_its_sql(
    db_url: str, other_db_url: str, engine_name: str, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """The agent's failure line named the storage error by its ``str()``: the statement and its
    parameters again, at every round while its database stayed locked. And it is this tracker's
    failure, not the neighbour's: counted against it, a database outage backed off every healthy
    neighbour for up to ``backoff_max_s`` after the database was back (QA round 42)."""
    net = LocalNet()
    settings = {"clock": clock, "write_retries": 1, "sqlite_busy_timeout_s": 0.05, "pg_lock_timeout_s": 0.05}
    async with (
        AvailabilityTracker(TrackerConfig(database_url=db_url, **settings)) as here,
        AvailabilityTracker(TrackerConfig(database_url=other_db_url, **settings)) as there,
    ):
        agent = GossipAgent(here, GossipConfig(keys=(KEY,), neighbors=("http://b",)), transport=net)
        net.agents["http://b"] = GossipAgent(there, GossipConfig(keys=(KEY,)), transport=net)
        await there.record_peer_online(PEER)  # a row to merge here
        with caplog.at_level(logging.DEBUG, logger="tracker"):
            async with _write_locked(db_url, engine_name):
                assert await agent.round() == 0
            assert agent.stats.failures == 1
            assert [(n.url, n.consecutive_failures) for n in agent.neighbor_states()] == [("http://b", 0)]
            assert await agent.round() == 1  # at the next round, with no back-off
    failures = [
        r
        for r in caplog.records
        if getattr(r, "action", None) == "gossip_local_failure" and r.levelno >= logging.WARNING
    ]
    assert len(failures) == 1, [r.getMessage() for r in caplog.records]
    line = TextFormatter().format(failures[0])
    assert len(line) <= MOST_CHARACTERS and "TransientStorageError" in line, line
    for leaked in ("INSERT", "UPDATE", "SELECT", "BEGIN", "[SQL:", "parameters", PEER):
        assert leaked not in line, line


async def test_a_sweep_failing_on_its_database_is_logged_short_and_without_its_sql(
    db_url: str, engine_name: str, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """The background sweeper logged a failed pass with its traceback, the statement and parameters of
    the failing write chained in, and kept that text as ``last_error`` for /readyz and the CLI."""
    config = TrackerConfig(
        database_url=db_url,
        clock=clock,
        write_retries=1,
        sqlite_busy_timeout_s=0.05,
        pg_lock_timeout_s=0.05,
        update_interval=0.02,
    )
    async with AvailabilityTracker(config) as tracker:
        await tracker.record_peer_online(PEER)
        clock.advance(config.peer_timeout + 1)  # a stale session for the pass to close
        with caplog.at_level(logging.DEBUG, logger="tracker"):
            async with _write_locked(db_url, engine_name):
                tracker.start_sweeper()
                deadline = asyncio.get_running_loop().time() + 10
                while tracker.sweeper_state.failures == 0:
                    assert asyncio.get_running_loop().time() < deadline, "the pass never failed"
                    await asyncio.sleep(0.01)
                await tracker.stop_sweeper()
        last_error = tracker.sweeper_state.last_error
    failures = [
        r
        for r in caplog.records
        if getattr(r, "action", None) == "sweep_failed" and r.levelno >= logging.WARNING
    ]
    assert failures, [r.getMessage() for r in caplog.records]
    for text_ in (TextFormatter().format(failures[0]), str(last_error)):
        assert len(text_) <= MOST_CHARACTERS and "TransientStorageError" in text_, text_
        for leaked in ("INSERT", "UPDATE", "SELECT", "BEGIN", "[SQL:", "parameters", PEER):
            assert leaked not in text_, text_

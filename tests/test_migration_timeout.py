"""A migration's waits for its locks end (``migration_timeout_s``): a lock nobody releases fails
``open()`` with an error naming it, where it used to keep the tracker waiting forever (QA round 23)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pytest
from conftest import FakeClock, _dsn
from sqlalchemy.engine import make_url

from tracker import AvailabilityTracker, TrackerConfig, TransientStorageError, migrations
from tracker.migrations import MIGRATION_LOCK_KEY, current_revision, migrate

TIMEOUT_S = 0.5
#: Generous: without a bound the open would wait for the lock's holder, which waits for this test.
BOUND_S = 10.0


@asynccontextmanager
async def _migration_locked(db_url: str, engine_name: str) -> AsyncIterator[str]:
    """Another session holding what a migration needs first, as a process stuck migrating would: the
    SQLite file's write lock, or the trackers' advisory migration lock. Yields what the error names."""
    if engine_name == "sqlite":
        other = sqlite3.connect(str(make_url(db_url).database), isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            yield "SQLite file's write lock"
            other.execute("ROLLBACK")
        finally:
            other.close()
        return
    conn = await asyncpg.connect(_dsn(db_url), server_settings={"application_name": "stuck-migration"})
    try:
        await conn.execute(f"SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})")
        yield f"migration lock (advisory lock {MIGRATION_LOCK_KEY}) stayed held by another session for "
    finally:
        await conn.close()  # the lock goes with the session


async def test_a_migration_lock_never_released_fails_open_after_the_bound_naming_it(
    db_url: str, engine_name: str, clock: FakeClock
) -> None:
    config = TrackerConfig(
        database_url=db_url, clock=clock, migration_timeout_s=TIMEOUT_S, sqlite_busy_timeout_s=TIMEOUT_S
    )
    async with AvailabilityTracker(config):  # the database exists, at head: only the lock is missing
        pass
    async with _migration_locked(db_url, engine_name) as named:
        started = asyncio.get_running_loop().time()
        with pytest.raises(TransientStorageError) as raised:
            await asyncio.wait_for(AvailabilityTracker.open(config), BOUND_S)
        waited_s = asyncio.get_running_loop().time() - started
    message = str(raised.value)
    assert message.startswith("cannot migrate the database") and named in message, message
    assert TIMEOUT_S * 0.9 <= waited_s < BOUND_S / 2, waited_s
    if engine_name == "postgresql":
        assert "stuck-migration" in message, message  # who holds it
    async with AvailabilityTracker(config):  # released: it opens again
        pass


@pytest.mark.parametrize("engine_name", ["postgresql"], indirect=True)
async def test_a_table_locked_through_every_attempt_fails_the_migration_after_the_bound_naming_its_holder(
    db_url: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other wait: a table the migration changes, held by a report left open in its transaction,
    tried again every ``LOCK_ATTEMPT_S`` until the bound, where it was tried again without end."""
    monkeypatch.setattr(migrations, "LOCK_ATTEMPT_S", 0.2, raising=False)
    config = TrackerConfig(database_url=db_url, clock=clock)
    async with AvailabilityTracker(config) as tracker:
        report = await asyncpg.connect(_dsn(db_url), server_settings={"application_name": "report"})
        try:
            await report.execute("BEGIN; SELECT count(*) FROM peers")  # then left open
            with pytest.raises(TransientStorageError) as raised:
                await asyncio.wait_for(
                    migrate(tracker.engine, "0011", downgrade=True, timeout_s=1.0), BOUND_S
                )
        finally:
            await report.close()
        message = str(raised.value)
        assert "a table it changes stayed locked" in message and "report" in message, message
        assert await current_revision(tracker.engine) == migrations.head_revision()  # nothing changed


async def test_a_bound_beyond_what_postgres_takes_still_migrates(empty_pg_url: str, clock: FakeClock) -> None:
    """Postgres's ``lock_timeout`` stops at INT_MAX milliseconds (24.8 days): a longer bound was passed
    as it was, and every open failed with "invalid value for parameter" (QA round 27)."""
    config = TrackerConfig(database_url=empty_pg_url, clock=clock, migration_timeout_s=30 * 86_400.0)
    async with AvailabilityTracker(config) as tracker:
        assert await current_revision(tracker.engine) == migrations.head_revision()

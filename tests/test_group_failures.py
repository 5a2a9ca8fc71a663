"""A shared transaction that failed for want of the database, not for one request's doing, fails all of
its requests at once: retried each alone, they waited as long again one after another (QA round 70:
three heartbeats behind a held lock answered after 61, 91 and 121 s). And a pool with no connection
free says so as the tracker's transient error, not SQLAlchemy's."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection

from tracker import AvailabilityTracker, TrackerConfig, TransientStorageError, db

POOL_TIMEOUT_S = 0.3


@pytest.fixture
def config(db_url: str, clock: Any) -> TrackerConfig:
    return TrackerConfig(
        database_url=db_url, clock=clock, pool_size=1, write_retries=0, sqlite_busy_timeout_s=0.3
    )


@pytest.fixture
async def exhausted(tracker: AvailabilityTracker) -> AsyncIterator[AvailabilityTracker]:
    """The tracker's engine with every pooled connection taken, and a short wait for one."""
    pool: Any = tracker.engine.pool
    pool._timeout = POOL_TIMEOUT_S
    held = [await tracker.engine.connect().start() for _ in range(pool.size() + pool._max_overflow)]
    try:
        yield tracker
    finally:
        for conn in held:
            await conn.close()


async def _select_one(conn: AsyncConnection) -> int:
    return int((await conn.execute(text("SELECT 1"))).scalar_one())


async def test_a_read_with_no_pooled_connection_free_fails_as_transient(
    exhausted: AvailabilityTracker,
) -> None:
    with pytest.raises(TransientStorageError, match="no database connection came free") as raised:
        await db.run_read(exhausted.engine, _select_one)
    assert isinstance(raised.value.__cause__, sa_exc.TimeoutError)


@pytest.mark.parametrize("engine_name", ["postgresql"], indirect=True)
async def test_writes_with_no_pooled_connection_free_fail_together_not_one_by_one(
    exhausted: AvailabilityTracker,
) -> None:
    outcomes = await asyncio.gather(
        *(exhausted.record_peer_online(f"p{i}") for i in range(4)), return_exceptions=True
    )
    assert all(isinstance(o, TransientStorageError) for o in outcomes), outcomes
    assert exhausted.ingest_stats.isolated_retries == 0


@pytest.mark.parametrize("engine_name", ["sqlite"], indirect=True)
async def test_writes_behind_a_busy_sqlite_file_fail_together_not_one_by_one(
    tracker: AvailabilityTracker, db_url: str
) -> None:
    """SQLite's lock is the whole file's: no request of the group could have gone in alone."""
    await tracker.record_peer_online("first")
    holder = sqlite3.connect(make_url(db_url).database or "", isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        outcomes = await asyncio.gather(
            *(tracker.record_peer_online(f"p{i}") for i in range(4)), return_exceptions=True
        )
        holder.execute("ROLLBACK")
    finally:
        holder.close()
    assert all(isinstance(o, TransientStorageError) for o in outcomes), outcomes
    assert tracker.ingest_stats.isolated_retries == 0
    await asyncio.gather(*(tracker.record_peer_online(f"p{i}") for i in range(4)))
    assert len(await tracker.list_peers(limit=10)) == 5

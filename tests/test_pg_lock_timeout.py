"""Postgres lock waits are bounded (``pg_lock_timeout_s``): a write behind someone else's lock fails as
retryable, like a busy SQLite file, instead of waiting without end (it stalled every write, and a
graceful shutdown with them). Postgres only: SQLite's busy timeout is tested with its lanes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager

import asyncpg
import httpx
import pytest
from conftest import FakeClock, _dsn
from sqlalchemy.engine import make_url

from tracker import AvailabilityTracker, TrackerConfig, TransientStorageError
from tracker.db import create_engine
from tracker.errors import sqlstate_of
from tracker.events import ContentAvailable, Event, PeerOffline, PeerOnline
from tracker.migrations import MIGRATION_LOCK_KEY, migrate
from tracker.service import ServiceSettings, create_app

pytestmark = pytest.mark.parametrize("engine_name", ["postgresql"], indirect=True)

LOCK_TIMEOUT_S = 0.3
#: Generous: a blocked write fails after (write_retries + 1) lock timeouts plus back-off, ~0.6 s here;
#: without the timeout it would wait for the lock's holder, which waits for this test.
BOUND_S = 10.0
#: Events the locked table stops half-way: peers, contents and peer_stats take theirs first.
HALF_WRITTEN = (PeerOnline("peer-new"), ContentAvailable("cid-new", "peer-new"))


@pytest.fixture
def config(db_url: str, clock: FakeClock) -> TrackerConfig:
    return TrackerConfig(database_url=db_url, clock=clock, pg_lock_timeout_s=LOCK_TIMEOUT_S, write_retries=1)


@asynccontextmanager
async def _held(db_url: str, statement: str) -> AsyncIterator[asyncpg.Connection]:
    """An operator's session holding a lock (``statement``) in an open transaction, as psql would."""
    conn = await asyncpg.connect(_dsn(db_url))
    try:
        transaction = conn.transaction()
        await transaction.start()
        await conn.execute(statement)
        try:
            yield conn
        finally:
            await transaction.rollback()
    finally:
        await conn.close()


async def _stored(db_url: str) -> tuple[int, int]:
    """How many rows of ``HALF_WRITTEN``'s peer and content are in the database."""
    conn = await asyncpg.connect(_dsn(db_url))
    try:
        peers = await conn.fetchval("SELECT count(*) FROM peers WHERE peer_key = 'peer-new'")
        contents = await conn.fetchval("SELECT count(*) FROM contents WHERE content_key = 'cid-new'")
        return int(peers), int(contents)
    finally:
        await conn.close()


def _lock_timed_out(error: BaseException) -> bool:
    """The tracker's retryable error, for Postgres' lock_not_available (55P03) and not another failure."""
    return isinstance(error, TransientStorageError) and sqlstate_of(error.__cause__ or error) == "55P03"


async def _fails_behind_the_lock(call: Awaitable[object]) -> None:
    """``call`` fails for the lock it waited on, within ``BOUND_S``."""
    with pytest.raises(TransientStorageError) as raised:
        await asyncio.wait_for(call, BOUND_S)
    assert _lock_timed_out(raised.value), repr(raised.value.__cause__)


@pytest.mark.parametrize("how", ["record", "record_batch"])
async def test_a_write_behind_a_table_lock_fails_as_transient_and_stores_nothing_until_released(
    tracker: AvailabilityTracker, db_url: str, how: str
) -> None:
    async def write() -> None:
        if how == "record":
            await tracker.record(ContentAvailable("cid-new", "peer-new"))
        else:
            await tracker.record_batch(HALF_WRITTEN)

    async with _held(db_url, "LOCK TABLE content_peers IN ACCESS EXCLUSIVE MODE"):
        await _fails_behind_the_lock(write())
    assert await _stored(db_url) == (0, 0)  # rolled back: its peer and content rows went with it
    await asyncio.wait_for(write(), BOUND_S)
    assert await _stored(db_url) == (1, 1)
    availability = await tracker.get_content_availability("cid-new")
    assert availability is not None and [p.peer_id for p in availability.peers] == ["peer-new"]


async def test_a_row_lock_fails_the_writes_of_its_peer_alone_even_when_they_share_a_transaction(
    tracker: AvailabilityTracker, db_url: str
) -> None:
    """Group commit runs the requests of a failed shared transaction again one by one, so a lock on one
    peer's row costs the other peers' writes time, not their success."""
    await tracker.record_peer_online("peer-held")
    async with _held(db_url, "SELECT 1 FROM peers WHERE peer_key = 'peer-held' FOR UPDATE"):
        writes = [tracker.record_peer_online(f"peer-free-{i}") for i in range(5)]
        writes.insert(1, tracker.record_peer_online("peer-held"))  # queued with others, not first
        outcomes = await asyncio.wait_for(asyncio.gather(*writes, return_exceptions=True), BOUND_S)
    held = outcomes.pop(1)
    assert isinstance(held, BaseException) and _lock_timed_out(held), held
    assert outcomes == [None] * 5
    await asyncio.wait_for(tracker.record_peer_online("peer-held"), BOUND_S)


async def test_one_peers_requests_retried_alone_keep_their_order(
    tracker: AvailabilityTracker, db_url: str, clock: FakeClock
) -> None:
    """A lock on another peer fails the shared transaction and its requests are retried alone,
    ``pool_size`` at a time: one peer's alternating online and offline requests ran side by side,
    out of order, and its uptime grew (QA round 71: 23 or 24 s for 22)."""
    await tracker.record_peer_online("peer-held")
    start = clock.now - 100
    events = [(PeerOnline if i % 2 == 0 else PeerOffline)("P", at=start + i) for i in range(40)]
    async with _held(db_url, "SELECT 1 FROM peers WHERE peer_key = 'peer-held' FOR UPDATE"):
        writes = [tracker.record_peer_online("peer-held")] + [tracker.record(e) for e in events]
        outcomes = await asyncio.wait_for(asyncio.gather(*writes, return_exceptions=True), BOUND_S)
    assert _lock_timed_out(outcomes[0]) and outcomes[1:] == [None] * 40, outcomes  # type: ignore[arg-type]
    assert tracker.ingest_stats.isolated_retries == 1
    metrics = await tracker.get_peer_metrics("P")
    assert metrics is not None and not metrics.online
    assert metrics.uptime.total_seconds() == 20  # 20 sessions of 1 s


async def test_every_caller_of_a_blocked_group_commit_gets_the_transient_error(
    tracker: AvailabilityTracker, db_url: str
) -> None:
    """Concurrent writes share one transaction; when it fails for a busy database, each of its callers
    hears so, and none of their events is stored."""
    batches: list[tuple[Event, ...]] = [
        (PeerOnline(f"peer-{i}"), ContentAvailable("cid-new", f"peer-{i}")) for i in range(6)
    ]
    async with _held(db_url, "LOCK TABLE content_peers IN ACCESS EXCLUSIVE MODE"):
        outcomes = await asyncio.wait_for(
            asyncio.gather(*(tracker.record_batch(b) for b in batches), return_exceptions=True), BOUND_S
        )
    assert all(isinstance(o, BaseException) and _lock_timed_out(o) for o in outcomes), outcomes
    assert [await tracker.get_peer_metrics(f"peer-{i}") for i in range(6)] == [None] * 6
    await asyncio.wait_for(asyncio.gather(*(tracker.record_batch(b) for b in batches)), BOUND_S)
    availability = await tracker.get_content_availability("cid-new")
    assert availability is not None and availability.replication_factor == 6


async def test_the_http_api_answers_503_storage_busy_while_a_lock_blocks_writes(
    tracker: AvailabilityTracker, db_url: str
) -> None:
    app = create_app(tracker, ServiceSettings())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t.test") as api:
        event = {"type": "peer_online", "peer_id": "peer-new"}
        async with _held(db_url, "LOCK TABLE peers IN ACCESS EXCLUSIVE MODE"):
            response = await asyncio.wait_for(api.post("/v1/events", json={"events": [event]}), BOUND_S)
        assert response.status_code == 503 and response.headers["retry-after"] == "1", response.text
        assert response.json()["error"]["code"] == "storage_busy"
        assert await _stored(db_url) == (0, 0)
        response = await api.post("/v1/events", json={"events": [event]})
        assert response.status_code == 200, response.text


async def test_every_session_starts_with_the_lock_timeout_including_replacements_of_lost_ones(
    tracker: AvailabilityTracker, db_url: str
) -> None:
    async def lock_timeout() -> str:
        async with tracker.engine.connect() as conn:
            return str((await conn.exec_driver_sql("SHOW lock_timeout")).scalar())

    assert await lock_timeout() == "300ms"
    admin = await asyncpg.connect(_dsn(db_url))
    try:  # every pooled session dies, as in a server restart; the pool replaces them
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await admin.close()
    assert await lock_timeout() == "300ms"
    assert await tracker.get_peer_metrics("nobody") is None  # reads go through the new sessions too


@pytest.mark.parametrize(("seconds", "shown"), [(0, "7s"), (2, "2s")])
async def test_zero_leaves_the_lock_timeout_the_server_sets_and_any_other_value_overrides_it(
    db_url: str, clock: FakeClock, seconds: float, shown: str
) -> None:
    admin = await asyncpg.connect(_dsn(db_url))
    try:  # a DBA's default for this database
        await admin.execute(f"ALTER DATABASE \"{make_url(db_url).database}\" SET lock_timeout = '7s'")
    finally:
        await admin.close()
    config = TrackerConfig(database_url=db_url, clock=clock, pg_lock_timeout_s=seconds)
    async with AvailabilityTracker(config) as tracker, tracker.engine.connect() as conn:
        assert (await conn.exec_driver_sql("SHOW lock_timeout")).scalar() == shown


async def test_a_migration_waits_for_its_locks_past_the_lock_timeout(
    config: TrackerConfig, db_url: str
) -> None:
    """Processes opening one database queue on the migration's advisory lock for as long as the first
    one's migration takes; a lock timeout there would stop them from starting."""
    engine = create_engine(config)
    try:
        async with _held(db_url, f"SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})"):
            migrating = asyncio.create_task(migrate(engine))
            # Three lock timeouts: with one the migration would have failed by now.
            done, _ = await asyncio.wait({migrating}, timeout=3 * LOCK_TIMEOUT_S)
            assert not done, migrating.exception()
        await asyncio.wait_for(migrating, BOUND_S)
        async with engine.connect() as conn:  # the lift was the migration transaction's alone
            assert (await conn.exec_driver_sql("SHOW lock_timeout")).scalar() == "300ms"
    finally:
        await engine.dispose()


async def test_a_read_behind_an_exclusive_lock_fails_as_transient_too(
    tracker: AvailabilityTracker, db_url: str
) -> None:
    await tracker.record_peer_online("peer-a")
    async with _held(db_url, "LOCK TABLE peers IN ACCESS EXCLUSIVE MODE"):
        await _fails_behind_the_lock(tracker.get_peer_metrics("peer-a"))
    assert await tracker.get_peer_metrics("peer-a") is not None

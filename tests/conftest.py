"""Shared fixtures: one ``db_url`` parametrized over SQLite (a temp file) and a real PostgreSQL.

Each Postgres test gets its own database cloned from a template that was migrated once per session
(``CREATE DATABASE ... TEMPLATE``), which is much faster than migrating every time. With
``TRACKER_REQUIRE_POSTGRES=1`` an unreachable Postgres fails the run instead of skipping.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from tracker import AvailabilityTracker, TrackerConfig
from tracker.db import create_engine
from tracker.migrations import migrate
from tracker.testing import ManualClock

# Any PostgreSQL URL form (postgresql://, postgresql+asyncpg://): the tracker's driver is asyncpg.
PG_URL = (
    make_url(os.environ.get("TRACKER_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"))
    .set(drivername="postgresql+asyncpg")
    .render_as_string(hide_password=False)
)
REQUIRE_PG = os.environ.get("TRACKER_REQUIRE_POSTGRES") == "1"
ENGINES = ("sqlite", "postgresql")
T = TypeVar("T")


def _dsn(url: str, database: str | None = None) -> str:
    """A plain libpq DSN (what asyncpg wants) for an SQLAlchemy URL, optionally another database."""
    parsed = make_url(url)
    if database is not None:
        parsed = parsed.set(database=database)
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


def _with_database(url: str, database: str) -> str:
    return make_url(url).set(database=database).render_as_string(hide_password=False)


async def _pg_reachable() -> str | None:
    try:
        conn = await asyncpg.connect(_dsn(PG_URL), timeout=5)
    except (TimeoutError, OSError, asyncpg.PostgresError) as error:
        return f"{type(error).__name__}: {error}"
    await conn.close()
    return None


def _run_in_thread(make_coro: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion on its own loop, even when called from inside a running loop
    (session fixtures are first requested from async fixtures)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(make_coro())).result()


FakeClock = ManualClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """Name of a migrated template database for this test session (Postgres only)."""
    problem = _run_in_thread(_pg_reachable)
    if problem is not None:
        if REQUIRE_PG:
            pytest.fail(f"TRACKER_REQUIRE_POSTGRES=1 but Postgres at {PG_URL} is unreachable: {problem}")
        # Justified skip: a newcomer without Postgres can still run the SQLite half locally. CI sets
        # TRACKER_REQUIRE_POSTGRES=1, which turns this into the failure above.
        pytest.skip(f"Postgres unreachable ({problem}); set TRACKER_REQUIRE_POSTGRES=1 to make this fail")
    name = f"tracker_tpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"

    async def drop() -> None:
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    async def create() -> None:
        await _admin(f'CREATE DATABASE "{name}"')
        engine = create_engine(TrackerConfig(database_url=_with_database(PG_URL, name)))
        try:
            await migrate(engine)
        except BaseException:
            await engine.dispose()
            await drop()  # not left behind by a session that never started
            raise
        await engine.dispose()

    _run_in_thread(create)
    yield name
    _run_in_thread(drop)


@pytest.fixture
async def empty_pg_url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A fresh, empty Postgres database (for migration tests); skips or fails like every Postgres test."""
    request.getfixturevalue("pg_template")  # applies the reachability / TRACKER_REQUIRE_POSTGRES rule
    async for url in _pg_database(template=None):
        yield url


async def _admin(statement: str) -> None:
    """One statement on the server's maintenance connection (CREATE/DROP DATABASE)."""
    admin = await asyncpg.connect(_dsn(PG_URL))
    try:
        await admin.execute(statement)
    finally:
        await admin.close()


async def _pg_database(template: str | None) -> AsyncIterator[str]:
    name = f"tracker_t_{uuid.uuid4().hex[:12]}"
    clause = f' TEMPLATE "{template}"' if template else ""
    await _admin(f'CREATE DATABASE "{name}"{clause}')
    try:
        yield _with_database(PG_URL, name)
    finally:
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=ENGINES)
def engine_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def db_url(engine_name: str, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """An isolated database of each engine: a temp SQLite file, or a Postgres clone of the template."""
    if engine_name == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'tracker.db'}"
        return
    template = request.getfixturevalue("pg_template")
    async for url in _pg_database(template):
        yield url


@pytest.fixture
async def other_db_url(
    engine_name: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[str]:
    """A second isolated database of the same engine (for tests comparing two trackers)."""
    if engine_name == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'other.db'}"
        return
    template = request.getfixturevalue("pg_template")
    async for url in _pg_database(template):
        yield url


@pytest.fixture
def config(db_url: str, clock: FakeClock) -> TrackerConfig:
    return TrackerConfig(database_url=db_url, clock=clock)


@pytest.fixture
async def tracker(config: TrackerConfig) -> AsyncIterator[AvailabilityTracker]:
    async with AvailabilityTracker(config) as opened:
        yield opened

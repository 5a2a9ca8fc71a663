"""Scratch PostgreSQL databases for benchmarks: one server URL, created and dropped by name."""

from __future__ import annotations

import os
import uuid

import asyncpg
from sqlalchemy.engine import make_url

#: The server benchmarks create their scratch databases on (the test server by default).
PG_URL = os.environ.get("TRACKER_BENCH_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")


def driver_dsn(url: str) -> str:
    """An SQLAlchemy ``postgresql+asyncpg://`` URL as the DSN asyncpg itself takes."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def execute(url: str, sql: str) -> None:
    """Run one statement on the database of ``url`` through the bare driver, outside any transaction
    (``VACUUM`` and ``CREATE DATABASE`` refuse to run inside one)."""
    conn = await asyncpg.connect(driver_dsn(url))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def admin(sql: str) -> None:
    """Run one statement (CREATE/DROP DATABASE) on the server's default database."""
    await execute(PG_URL, sql)


async def create_database(prefix: str) -> str:
    """A new empty database named ``<prefix>_<random>``; its SQLAlchemy URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    await admin(f'CREATE DATABASE "{name}"')
    return make_url(PG_URL).set(database=name).render_as_string(hide_password=False)


async def drop_database(url: str) -> None:
    """Drop the database of ``url`` (a no-op for SQLite URLs), even with connections still open."""
    if url.startswith("postgresql"):
        await admin(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)')

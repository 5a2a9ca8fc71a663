"""Scratch PostgreSQL databases for benchmarks: one server URL, created and dropped by name."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
import uuid
from typing import Any, Self

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


class BareTables:
    """Plain unindexed tables written by the bare driver, one transaction per ``insert``
    (``sqlite3.executemany`` / asyncpg ``copy_records_to_table``): the storage engine's floor for
    writing rows, measured beside a workload so both run in the same conditions.

    On SQLite they live in a file of their own beside the database of ``url`` (the measured file
    does not grow); on Postgres, in that database. ``tables`` maps a name to its column list.
    """

    def __init__(self, url: str, tables: dict[str, str]) -> None:
        self.url, self.tables = url, tables
        self.seconds, self.rows = 0.0, 0
        self._sqlite: sqlite3.Connection | None = None
        self._pg: asyncpg.Connection | None = None

    async def __aenter__(self) -> Self:
        ddl = [f"CREATE TABLE {name} ({columns})" for name, columns in self.tables.items()]
        if self.url.startswith("sqlite"):
            self._sqlite = sqlite3.connect(str(make_url(self.url).database) + ".raw")
            for statement in ddl:
                self._sqlite.execute(statement)
        else:
            self._pg = await asyncpg.connect(driver_dsn(self.url))
            for statement in ddl:
                await self._pg.execute(statement)
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._sqlite is not None:
            self._sqlite.close()
        if self._pg is not None:
            await self._pg.close()

    async def insert(self, rows: dict[str, list[tuple[Any, ...]]]) -> None:
        """Write each table's rows, all in one transaction; adds to ``seconds`` and ``rows``."""
        started = time.perf_counter()
        if self._sqlite is not None:
            with self._sqlite:
                for name, values in rows.items():
                    marks = ",".join("?" * len(self.tables[name].split(",")))
                    self._sqlite.executemany(f"INSERT INTO {name} VALUES ({marks})", values)
        else:
            assert self._pg is not None
            # One table's COPY is a transaction of its own: no BEGIN and COMMIT round trips to add.
            async with self._pg.transaction() if len(rows) > 1 else contextlib.nullcontext():
                for name, values in rows.items():
                    await self._pg.copy_records_to_table(name, records=values)
        self.seconds += time.perf_counter() - started
        self.rows += sum(len(values) for values in rows.values())

"""Alembic environment for both engines, from Alembic's async template.

Three ways in:
* the tracker (and tests) pass an open connection in ``config.attributes["connection"]`` and the
  migration runs on it, inside the caller's transaction;
* ``alembic upgrade head`` from the shell uses ``-x url=...``, ``sqlalchemy.url`` or
  ``TRACKER_DATABASE_URL``, and takes the lock trackers take to migrate: on Postgres their
  migration lock, on SQLite the file's write lock, for the whole chain;
* offline mode (``--sql``) renders the SQL for a DBA.
SQLite gets batch mode, so later ALTERs work through table copies.
"""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import async_engine_from_config

from tracker import db
from tracker.config import DEFAULT_DATABASE_URL, TrackerConfig
from tracker.migrations import MIGRATION_LOCK_KEY
from tracker.schema import metadata

config = context.config
target_metadata = metadata


def _url() -> str:
    return (
        context.get_x_argument(as_dictionary=True).get("url")
        or os.environ.get("TRACKER_DATABASE_URL")
        or config.get_main_option("sqlalchemy.url")
        or DEFAULT_DATABASE_URL
    )


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )


def do_run_migrations(connection: Connection, *, lock: bool = False) -> None:
    _configure(connection)
    with context.begin_transaction():
        if lock and connection.dialect.name == "postgresql":
            # From the shell, take the lock trackers that migrate as they open take (migrations.migrate), so
            # a deployment's `alembic upgrade head` and a starting tracker do not both create the
            # tables; and wait for locks without end, as they do (their ALTERs wait for traffic).
            connection.exec_driver_sql("SET LOCAL lock_timeout = 0")
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})")
        context.run_migrations()


def run_migrations_offline() -> None:
    context.configure(
        url=_url(), target_metadata=target_metadata, literal_binds=True, dialect_opts={"paramstyle": "named"}
    )
    with context.begin_transaction():
        context.run_migrations()


def _changes_schema() -> bool:
    """Whether the command moves the schema (upgrade, downgrade, stamp: they name a destination);
    ``current``, ``history`` and ``check`` only read it."""
    try:
        context.get_revision_argument()
    except KeyError:
        return False
    return True


async def run_async_migrations() -> None:
    url = _url()
    if url.startswith("sqlite") and _changes_schema():
        # The tracker's own engine, and its write connection: the whole chain in one transaction that
        # takes the file's write lock at BEGIN (IMMEDIATE), waiting the busy timeout for another. The
        # driver's own transactions leave DDL outside any: two shell upgrades of one new file at once
        # both created the tables, and the second failed (QA round 49).
        # Read-only commands keep the plain engine: they waited for any writer, switched the file
        # to WAL, and failed on a read-only file (QA round 52). The busy timeout is the
        # environment's, as the trackers' (TRACKER_SQLITE_BUSY_TIMEOUT_S), and no other setting:
        # a bad TRACKER_PEER_TIMEOUT failed the migration (QA round 53).
        busy = {k: v for k, v in os.environ.items() if k == "TRACKER_SQLITE_BUSY_TIMEOUT_S"}
        tracker_engine = db.create_engine(TrackerConfig.from_env(busy, database_url=url))
        try:
            await db.ensure_wal(tracker_engine)  # as the tracker's own upgrade leaves a new file
            async with db.write_connection(tracker_engine) as connection, connection.begin():
                await connection.run_sync(do_run_migrations)
        finally:
            await tracker_engine.dispose()
        return
    section = config.get_section(config.config_ini_section, {})
    section["sqlalchemy.url"] = url
    engine = async_engine_from_config(section, prefix="sqlalchemy.", poolclass=pool.NullPool)
    async with engine.connect() as connection:
        await connection.run_sync(do_run_migrations, lock=True)
    await engine.dispose()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        asyncio.run(run_async_migrations())
    else:
        do_run_migrations(connection)


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()

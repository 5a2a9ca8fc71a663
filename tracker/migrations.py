"""Migrations, run in-process: where they are, which revision a database is at, and moving it.

Alembic does the work (alembic/env.py); this module gives it the tracker's connection and lock, so a
tracker that opens an empty database, ``tracker db upgrade`` and ``alembic upgrade head`` from the
shell never migrate one database at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from .db import write_connection
from .errors import SchemaOutOfDate

#: The advisory lock migrations take on Postgres: in process (``migrate``) and from the shell
#: (alembic/env.py). Any fixed number serves, as long as every tracker uses the same one.
MIGRATION_LOCK_KEY = 0x7EE7_7AC3


def alembic_dir() -> Path:
    """Where the migrations are: inside the installed wheel, or alembic/ in a source checkout."""
    packaged = Path(__file__).parent / "_alembic"
    if (packaged / "env.py").exists():
        return packaged
    return Path(__file__).resolve().parent.parent / "alembic"


def alembic_config(url: str | None = None) -> Any:
    """An Alembic ``Config`` pointing at the tracker's migrations (and ``url``, when given)."""
    from alembic.config import Config

    folder = alembic_dir()
    ini = folder / "alembic.ini" if (folder / "alembic.ini").exists() else folder.parent / "alembic.ini"
    cfg = Config(str(ini)) if ini.exists() else Config()
    cfg.set_main_option("script_location", str(folder))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


async def migrate(engine: AsyncEngine, revision: str = "head", *, downgrade: bool = False) -> None:
    """Upgrade (or downgrade) the database in-process, on a connection of ``engine``.

    Several processes may open the same empty Postgres database at once; an advisory lock makes
    them migrate one after the other. On SQLite the IMMEDIATE transaction does the same.

    On Postgres the migration waits for its locks without end, whatever ``pg_lock_timeout_s`` says:
    the processes queued on the advisory lock wait for as long as the first one's migration takes,
    and a migration's ALTERs wait for the traffic on their tables to let go. Either failing after a
    few seconds would stop a tracker from starting, or a deployment step, for a wait that ends.
    """
    from alembic import command

    def _run(sync_conn: Connection) -> None:
        cfg = alembic_config()
        cfg.attributes["connection"] = sync_conn
        if downgrade:
            command.downgrade(cfg, revision)
        else:
            command.upgrade(cfg, revision)

    async with write_connection(engine) as conn, conn.begin():
        if engine.dialect.name == "postgresql":
            await conn.exec_driver_sql("SET LOCAL lock_timeout = 0")  # this transaction only
            await conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})")
        problem = unknown_revision_problem(await conn.run_sync(_revision_of))
        if problem:
            raise SchemaOutOfDate(problem)
        await conn.run_sync(_run)


def _revision_of(sync_conn: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(sync_conn).get_current_revision()


def unknown_revision_problem(current: str | None) -> str | None:
    """What to say when the database is at a revision this tracker does not ship (``None`` if it does).

    A newer tracker migrated it. Alembic's own error ("Can't locate revision") gave no hint, and the
    advice to run `tracker db upgrade` could not work: this version has nothing newer to upgrade to.
    """
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    if current is None:
        return None
    try:
        if ScriptDirectory.from_config(alembic_config()).get_revision(current) is not None:
            return None
    except CommandError:
        pass
    head = head_revision()
    return (
        f"the database schema is at revision {current}, which this version of the tracker does not "
        f"know (its newest is {head}): a newer version migrated it. Run that version (upgrade this "
        f"installation: pip install -U peer-tracker), or take the schema back down with the newer "
        f"version's `tracker db downgrade {head}` (that drops what it added)"
    )


async def current_revision(engine: AsyncEngine) -> str | None:
    """The revision the database is at, or ``None`` for an empty database."""
    async with engine.connect() as conn:
        return await conn.run_sync(_revision_of)


def head_revision() -> str | None:
    """The newest revision shipped with this version of the tracker."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()

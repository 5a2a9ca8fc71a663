"""Migrations, run in-process: where they are, which revision a database is at, and moving it.

Alembic does the work (alembic/env.py); this module gives it the tracker's connection and lock, so a
tracker that opens an empty database, ``tracker db upgrade`` and ``alembic upgrade head`` from the
shell never migrate one database at once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from .db import write_connection
from .errors import InvalidInput, SchemaOutOfDate, TransientStorageError, describe, is_transient, sqlstate_of
from .schema import metadata

if TYPE_CHECKING:
    from alembic.script import ScriptDirectory

log = logging.getLogger("tracker.migrations")

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


#: How long one attempt of a Postgres migration waits for a table's lock before it lets go, lets the
#: statements queued behind its request run, and tries again (``migrate``).
LOCK_ATTEMPT_S = 2.0
#: The pause between attempts grows to this.
_MOST_PAUSE_S = 10.0


#: ``TrackerConfig.migration_timeout_s``'s default, for callers without a config.
DEFAULT_TIMEOUT_S = 600.0


async def migrate(
    engine: AsyncEngine,
    revision: str = "head",
    *,
    downgrade: bool = False,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> None:
    """Upgrade (or downgrade) the database in-process, on a connection of ``engine``.

    Several processes may open the same empty Postgres database at once; an advisory lock makes
    them migrate one after the other. On SQLite the IMMEDIATE transaction does the same.

    On Postgres the migration waits for its locks whatever ``pg_lock_timeout_s`` says (failing would
    stop a tracker from starting, or a deployment step, for a wait that ends), but never more than
    ``LOCK_ATTEMPT_S`` at a time for a table: a migration's ALTER waiting for a table's lock holds
    up every statement on that table queued behind it, so a report left idle in a transaction
    stopped every tracker for as long as it stayed open (QA round 19). Each attempt is rolled back
    whole, and the sessions holding the tables are logged, while it waits.

    All those waits together end after ``timeout_s``, counted again from each revision an upgrade
    commits (0: never; an attempt under way may overrun it
    by up to ``LOCK_ATTEMPT_S``): then ``TransientStorageError`` says which lock stayed held, and by
    whom. A lock never released kept ``open()`` waiting forever
    (QA round 23). The migration's own work, once it has its locks, is not cut short. On SQLite the
    busy timeout bounds the one wait for the write lock.
    """
    await asyncio.to_thread(_load_alembic)
    # The loop's clock, not the tracker's injected one: this bounds real waits (the server's lock
    # waits, the pauses below), which a test clock that stands still would never end.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s if timeout_s > 0 else math.inf
    attempt = 0
    while True:
        try:
            # A Postgres upgrade goes one revision a transaction, so that an attempt that loses on a
            # table's lock redoes its own revision only: the whole chain in one transaction redid
            # 0013's rewrite of every peer row at each attempt (QA round 47: 4 attempts over a
            # million peers, 4,000,040 row updates, the table 138 -> 425 MB). Every revision leaves
            # a schema a tracker of its release runs on.
            if await _migrate_once(engine, revision, downgrade=downgrade, wait_s=deadline - loop.time()):
                return
            # A revision committed: the waits start again. Its own work is no wait, and counted,
            # a long revision left the next one 1 ms to wait for another process that took the
            # migration lock in between: it failed, "held for 5 s", while the other finished the
            # upgrade (QA round 49).
            deadline, attempt = loop.time() + timeout_s if timeout_s > 0 else math.inf, 0
            continue
        except DBAPIError as error:
            if engine.dialect.name != "postgresql":
                if is_transient(error):
                    raise TransientStorageError(
                        "cannot migrate the database: another connection held the SQLite file's write "
                        f"lock for all of the busy timeout (sqlite_busy_timeout_s): {describe(error)}"
                    ) from error
                raise
            if sqlstate_of(error) != _LOCK_NOT_AVAILABLE:
                raise
            locked = error
        except _MigrationLockHeld as held:
            raise TransientStorageError(
                f"cannot migrate the database: the migration lock (advisory lock {MIGRATION_LOCK_KEY}) "
                f"stayed held by another session for {timeout_s:g} s (migration_timeout_s)"
                f"{await _advisory_holders(engine)}; end that session, or raise migration_timeout_s "
                "if a long migration holds it"
            ) from held.error
        attempt += 1
        holders = await _lock_holders(engine)
        if loop.time() >= deadline:
            raise TransientStorageError(
                f"cannot migrate the database: a table it changes stayed locked through {attempt} "
                f"attempts in {timeout_s:g} s (migration_timeout_s){holders or ' by another session'}"
            ) from locked
        # The last pause ends at the deadline, for one more attempt (which may overrun it by up to
        # LOCK_ATTEMPT_S): a lock released meanwhile lets the migration through.
        pause = min(_MOST_PAUSE_S, 0.5 * 2 ** min(attempt, 5)) * random.uniform(0.5, 1.0)
        pause = min(pause, deadline - loop.time())
        log.warning(
            "migration: a table it changes stayed locked for %g s; trying again in %.1f s (attempt %d)%s",
            LOCK_ATTEMPT_S,
            pause,
            attempt,
            holders,
            extra={"action": "migration_lock_wait", "attempt": attempt},
        )
        await asyncio.sleep(pause)


class _MigrationLockHeld(Exception):
    """The migration lock was not granted within the migration's time left: another session holds
    it. Carries the driver's error."""

    def __init__(self, error: DBAPIError) -> None:
        super().__init__(str(error))
        self.error = error


_LOCK_NOT_AVAILABLE = "55P03"
#: The largest ``lock_timeout`` Postgres accepts (an int of milliseconds).
_MOST_LOCK_TIMEOUT_MS = 2_147_483_647


def _load_alembic() -> None:
    """Import Alembic's machinery, in a worker thread: imported where the migration runs, on the
    event loop (and, on SQLite, with the write lock held), it held the loop 50-250 ms at every
    tracker's open (QA round 20). Once imported, this returns at once."""
    import alembic.command
    import alembic.runtime.migration
    import alembic.script  # noqa: F401


async def _migrate_once(engine: AsyncEngine, revision: str, *, downgrade: bool, wait_s: float) -> bool:
    """One transaction of the migration: the next revision of an upgrade towards ``revision``, or a
    whole downgrade; whether the database is then at ``revision``."""
    from alembic import command

    step: str | None = None

    def _run(sync_conn: Connection) -> None:
        cfg = alembic_config()
        cfg.attributes["connection"] = sync_conn
        if downgrade:
            command.downgrade(cfg, revision)
        else:
            command.upgrade(cfg, step or revision)

    async with write_connection(engine) as conn, conn.begin():
        if engine.dialect.name == "postgresql":
            # Queued on the advisory lock, a process waits for another's migration: that holds up no
            # one else, so for all the time the migration has left (0: without limit; at least 1 ms,
            # which 0 would not be). Its own statements then wait LOCK_ATTEMPT_S at a time.
            # Postgres takes at most INT_MAX ms (24.8 days): above it every open failed (QA round 27).
            wait_ms = 0 if math.isinf(wait_s) else min(_MOST_LOCK_TIMEOUT_MS, max(1, round(wait_s * 1000)))
            await conn.exec_driver_sql(f"SET LOCAL lock_timeout = {wait_ms}")  # this transaction only
            try:
                await conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})")
            except DBAPIError as error:
                if sqlstate_of(error) == _LOCK_NOT_AVAILABLE:
                    raise _MigrationLockHeld(error) from error
                raise
            await conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{round(LOCK_ATTEMPT_S * 1000)}ms'")
        current = await conn.run_sync(_revision_of)
        if problem := unknown_revision_problem(current):
            raise SchemaOutOfDate(problem)
        if not downgrade and revision == "head" and current == head_revision():
            return True  # Alembic would only log that it has nothing to do, at every open (QA round 22)
        if downgrade and (problem := downgrade_problem(current, revision)):
            raise InvalidInput(problem)
        # One revision a transaction on Postgres, where a revision may lose on a table's lock and be
        # tried again. SQLite's one write lock is taken once for all: its write connection, and
        # Alembic's set-up, made per revision, took a new file's open from 0.1 to 0.4 s.
        by_revision = not downgrade and engine.dialect.name == "postgresql"
        step, last = _next_revision(current, revision) if by_revision else (None, True)
        await conn.run_sync(_run)
        return last


def _next_revision(current: str | None, target: str) -> tuple[str | None, bool]:
    """The revision after ``current`` on the way up to ``target``, and whether it is ``target``;
    ``(None, True)`` where Alembic should take the whole way itself (a target it does not resolve,
    or not above ``current``: its own error says why)."""
    from alembic.script.revision import RevisionError
    from alembic.util import CommandError

    scripts = _scripts()
    try:
        wanted = scripts.get_revision(target)
        if wanted is None:
            return None, True
        path = list(scripts.iterate_revisions(wanted.revision, current or "base"))
    except (CommandError, RevisionError):
        return None, True
    if not path:
        return None, True
    return path[-1].revision, len(path) == 1


async def _lock_holders(engine: AsyncEngine) -> str:
    """``": sessions holding the tracker's tables: ..."``, the longest in their transactions first,
    for the warning; empty when none is found (or asking fails: the warning matters more)."""
    query = text(
        "SELECT a.pid, a.state, coalesce(a.application_name, ''), "
        "       extract(epoch FROM now() - a.xact_start) AS in_xact_s "
        "FROM pg_stat_activity a "
        "WHERE a.pid <> pg_backend_pid() AND a.xact_start IS NOT NULL AND a.pid IN ("
        "  SELECT l.pid FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
        "  JOIN pg_namespace n ON n.oid = c.relnamespace "
        "  WHERE l.granted AND n.nspname = current_schema() AND c.relname = ANY(:tables)) "
        "ORDER BY a.xact_start LIMIT 5"
    )
    try:
        async with engine.connect() as conn:
            tables = [*metadata.tables, "alembic_version"]
            rows = (await conn.execute(query, {"tables": tables})).all()
    except Exception:  # a diagnosis only: the warning matters more
        return ""
    if not rows:
        return ""
    sessions = ", ".join(
        f"pid {pid} ({state}{f', {app}' if app else ''}, in a transaction for {float(age):.0f} s)"
        for pid, state, app, age in rows
    )
    return f": sessions holding the tracker's tables: {sessions}"


async def _advisory_holders(engine: AsyncEngine) -> str:
    """``": pid N (state, application)"``: the session holding the migration lock, for the error;
    empty when none is found (or asking fails: the error matters more)."""
    query = text(
        "SELECT a.pid, a.state, coalesce(a.application_name, '') "
        "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.granted AND l.database = "
        "      (SELECT oid FROM pg_database WHERE datname = current_database()) "
        "  AND ((l.classid::bigint << 32) | l.objid::bigint) = :key AND a.pid <> pg_backend_pid() "
        "LIMIT 1"
    )
    try:
        async with engine.connect() as conn:
            row = (await conn.execute(query, {"key": MIGRATION_LOCK_KEY})).first()
    except Exception:  # a diagnosis only: the error matters more
        return ""
    if row is None:
        return ""
    pid, state, app = row
    return f": pid {pid} ({state}{f', {app}' if app else ''})"


def _revision_of(sync_conn: Connection) -> str | None:
    """Read straight from ``alembic_version``: Alembic's ``MigrationContext`` logs two INFO lines each
    time it is made, so an application embedding the tracker saw them at every open, and the
    service at every /readyz probe (QA round 22)."""
    inspector = inspect(sync_conn)
    versions: list[str] = []
    if inspector.has_table("alembic_version"):
        rows = sync_conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
        versions = [str(version) for version in rows]
    if len(versions) > 1:  # the tracker's history has one line of revisions
        raise SchemaOutOfDate(f"alembic_version holds several revisions ({', '.join(sorted(versions))})")
    if versions:
        return versions[0]
    # No revision: an empty database, unless the tracker's tables are there all the same (a partial
    # restore, an `alembic stamp base`). Taken for empty, it was "empty (no schema)" and upgrading
    # it failed on "table tracker_nodes already exists" (QA round 62).
    if ours := sorted(set(inspector.get_table_names()) & set(metadata.tables)):
        raise SchemaOutOfDate(
            f"the database holds tables named as the tracker's ({', '.join(ours[:3])}"
            f"{f' and {len(ours) - 3} more' if len(ours) > 3 else ''}) but no schema revision "
            "(alembic_version is missing or empty), and the tracker will not migrate over tables it "
            "cannot date. If they are the tracker's (a partial restore), restore alembic_version "
            "with them, or record the revision they are at with `alembic stamp REVISION`; if they "
            "are another application's, point the tracker at a database of its own"
        )
    return None


def unknown_revision_problem(current: str | None) -> str | None:
    """What to say when the database is at a revision this tracker does not ship (``None`` if it does).

    A newer tracker migrated it. Alembic's own error ("Can't locate revision") gave no hint, and the
    advice to run `tracker db upgrade` could not work: this version has nothing newer to upgrade to.
    """
    from alembic.util import CommandError

    if current is None:
        return None
    try:
        if _scripts().get_revision(current) is not None:
            return None
    except CommandError:
        pass
    head = head_revision()
    if not (current.isdigit() and len(current) == len(head or "") and current > (head or "")):
        # The tracker numbers its revisions 0001, 0002, ...: anything else is another history's,
        # where the advice to downgrade with a newer tracker was wrong, and destructive (QA round 62).
        return (
            f"the database's alembic_version holds {current}, which is not a revision of the "
            f"tracker (its revisions are numbered, 0001 to {head}): is this another application's "
            "database? Point the tracker at a database of its own"
        )
    return (
        f"the database schema is at revision {current}, which this version of the tracker does not "
        f"know (its newest is {head}): a newer version migrated it. Run that version (upgrade this "
        f"installation to it), or take the schema back down with the newer "
        f"version's `tracker db downgrade {head}` (that drops what it added)"
    )


def downgrade_problem(current: str | None, target: str) -> str | None:
    """Why a downgrade from ``current`` to ``target`` cannot go, in the tracker's words; ``None`` when
    it can (or Alembic's own error is clear). Alembic said "Relative revision -1 didn't produce 1
    migrations" at base, of ``+1`` and of ``-0``, and "Destination head is not a valid downgrade
    target from current head(s)" (QA round 65)."""
    if target.startswith("+"):
        return f"a downgrade goes down, and {target} is up: `tracker db upgrade` goes up"
    if target.startswith("-") and target[1:].isdigit() and int(target[1:]) == 0:
        return f"{target} is no step: give -1 or more, a revision, or base"
    if current is None:  # `base` again is done already
        return None if target == "base" else "the schema is empty (base): there is nothing to take down"
    at_or_below = {script.revision for script in _scripts().iterate_revisions(current, "base")}
    if target.startswith("-") and target[1:].isdigit() and int(target[1:]) > len(at_or_below):
        steps = "step" if len(at_or_below) == 1 else "steps"
        return (
            f"the schema is at {current}, {len(at_or_below)} {steps} above base: {target} goes past it "
            "(base drops every table)"
        )
    wanted = _scripts().get_revision(target) if not target.startswith("-") and target != "base" else None
    if wanted is not None and wanted.revision not in at_or_below:
        named = target if target == wanted.revision else f"{target} ({wanted.revision})"
        return (
            f"{named} is above the schema's revision, {current}: "
            f"`tracker db upgrade --revision {wanted.revision}` goes up"
        )
    return None


def require_known_revision(revision: str) -> None:
    """Refuse a target this tracker does not ship, with Alembic's own words ("Can't locate revision
    identified by ..."), before any database is touched. Relative ones (``-1``) need the database."""
    if not revision.strip():
        # Alembic answers a blank one with a bare AssertionError (QA round 74).
        raise InvalidInput("give a revision: a number such as 0017, head, base, or a step such as -1")
    if not revision.startswith(("+", "-")):
        _scripts().get_revisions(revision)


async def current_revision(engine: AsyncEngine) -> str | None:
    """The revision the database is at, or ``None`` for an empty database."""
    async with engine.connect() as conn:
        return await conn.run_sync(_revision_of)


def head_revision() -> str | None:
    """The newest revision shipped with this version of the tracker."""
    return _scripts().get_current_head()


@cache
def _scripts() -> ScriptDirectory:
    """The shipped revisions, read once per process (they do not change under it; /readyz asks at
    every probe, and parsing them took milliseconds on the event loop)."""
    from alembic.script import ScriptDirectory as Scripts

    return Scripts(str(alembic_dir()))

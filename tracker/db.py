"""Engines, SQLite connection set-up, transactions with retry and dialect helpers."""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import sqlite3
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

from sqlalchemy import Table, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

from .config import TrackerConfig
from .errors import (
    CommitOutcomeUnknown,
    ConfigError,
    StorageError,
    TrackerClosed,
    describe,
    is_disconnect,
    is_stale_statement,
    is_transient,
    sqlstate_of,
    translate,
)
from .sqlite_begin import CALLER, Abandoned, Caller, begin_immediate, sliced
from .sqlite_lane import SqliteLane

log = logging.getLogger(__name__)
T = TypeVar("T")

_SQLITE_BEGIN = "tracker_sqlite_begin"
WAL_SIZE_LIMIT = 64 * 1024 * 1024  # bytes the SQLite WAL is truncated back to after it grew
_READ_RETRIES = 4  # fresh connections for a read whose connection was lost: 0.15 s of back-off in all


def create_engine(config: TrackerConfig) -> AsyncEngine:
    """An async engine for ``config.database_url`` with the settings this tracker relies on."""
    if config.dialect == "sqlite":
        engine = create_async_engine(
            config.database_url,
            echo=config.echo_sql,
            connect_args={"timeout": config.sqlite_busy_timeout_s},
        )
        _configure_sqlite(engine, config)
        return engine
    engine = create_async_engine(
        config.database_url,
        echo=config.echo_sql,
        pool_size=config.pool_size,
        max_overflow=config.pool_size,
        pool_pre_ping=True,
        # Each transaction begins READ COMMITTED whatever the database's or role's
        # default_transaction_isolation: under REPEATABLE READ a selection counted the leases of
        # the peer it had just locked in its snapshot, missed those the lock's previous holder
        # committed, and handed 30 callers 2 leases of peers whose capacity was 1 (QA round 76).
        # Per transaction (asyncpg's BEGIN ISOLATION LEVEL), so a transaction pooler keeps it too.
        isolation_level="READ COMMITTED",
        connect_args={
            "timeout": config.pg_connect_timeout_s,
            **(_TRANSACTION_POOLING_ARGS if config.pg_transaction_pooling else {}),
        },
    )
    _configure_postgres(engine, config)
    _name_connect_timeouts(engine, config.pg_connect_timeout_s)
    return engine


def _name_connect_timeouts(engine: AsyncEngine, seconds: float) -> None:
    """A connection attempt that runs out of time says which server and which setting: asyncpg's
    ``TimeoutError`` has no message, and the one line a command prints was "error: TimeoutError"."""

    @event.listens_for(engine.sync_engine, "do_connect")
    def _connect(dialect: Any, _record: Any, cargs: Any, cparams: dict[str, Any]) -> Any:
        try:
            return dialect.connect(*cargs, **cparams)
        except TimeoutError as error:
            if str(error):
                raise
            where = f"{cparams.get('host') or 'localhost'}:{cparams.get('port') or 5432}"
            raise TimeoutError(
                f"cannot connect to the database: the server at {where} did not answer within "
                f"{seconds:g} s (pg_connect_timeout_s); is that its address, and is it up?"
            ) from error


#: No prepared statement outlives its transaction: neither the dialect's cache nor asyncpg's keeps
#: one, and each is unnamed (asyncpg names them ``__asyncpg_stmt_<n>__`` otherwise, per process, so
#: two processes would clash on one server connection). An unnamed statement lasts until the next
#: one is parsed on the connection, and the dialect prepares and runs each inside a transaction, on
#: the server connection that the pooler keeps for it.
_TRANSACTION_POOLING_ARGS: dict[str, Any] = {
    "statement_cache_size": 0,
    "prepared_statement_cache_size": 0,
    "prepared_statement_name_func": lambda: "",
}


def pg_server_settings(config: TrackerConfig) -> dict[str, str]:
    """The Postgres settings every tracker session starts with.

    JIT compilation pays off for long analytic scans, not for our millisecond statements: a selection
    over a hot content was costed high enough to spend ~0.8 s compiling itself. The lock timeout
    bounds how long a statement waits behind someone else's lock (``pg_lock_timeout_s``), so such a
    write fails as retryable, like a busy SQLite file, instead of waiting without end.
    """
    settings = {"jit": "off"}
    if config.pg_lock_timeout_s > 0:
        # Whole milliseconds, at least one: lock_timeout = 0 would mean no limit at all.
        settings["lock_timeout"] = f"{max(1, round(config.pg_lock_timeout_s * 1000))}ms"
    return settings


def _configure_postgres(engine: AsyncEngine, config: TrackerConfig) -> None:
    """Start every new connection (the pool's, and those replacing lost ones) with the tracker's
    settings; a migration's transaction lifts the lock timeout (``migrate``).

    Set by a statement once connected, not sent as startup parameters: a pooler between the tracker
    and the server (PgBouncer, as managed Postgres services offer) refuses to connect a client that
    sends a startup parameter it does not know (``unsupported startup parameter: jit``).
    """
    settings = pg_server_settings(config)
    if config.pg_transaction_pooling:
        _set_in_each_transaction(engine, settings)
        return
    statement = ";".join(f"SET {name} = '{value}'" for name, value in settings.items())

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        try:
            dbapi_connection.run_async(lambda conn: conn.execute(statement))
        except Exception as error:
            raise _set_up_failed(error) from error


def _set_up_failed(error: Exception) -> Exception:
    """A new connection that failed while the tracker set it up, as an error the retries and the
    service know. Raised here the driver's own error passes SQLAlchemy unwrapped: a backend killed
    during the SET (a failover, an administrator) reached callers as asyncpg's bare
    ConnectionDoesNotExistError or InternalClientError, neither retried nor a StorageError, and the
    service answered 500 (QA round 50). Nothing was sent for the caller yet: as a refused
    connection, a ``ConnectionError``, retried on a new one. What the server refused for its own
    reasons (not a connection exception, class 08, nor a shutdown, 57P) is a ``StorageError``."""
    state = getattr(error, "sqlstate", None)
    said = f"setting up a new database connection failed: {describe(error)}"
    if isinstance(state, str) and not state.startswith(("08", "57P")):
        return StorageError(said)
    return ConnectionError(said)


def _set_in_each_transaction(engine: AsyncEngine, settings: dict[str, str]) -> None:
    """Behind a pooler in transaction mode a transaction may run on another server connection than
    the last: each sets the settings for itself, a round trip each (single events through PgBouncer
    went from 0.82 to 0.65 of a direct connection's rate, docs/benchmarks.md), unless the server's
    defaults for the tracker's role and database already carry them (``ALTER ROLE ... SET``), which
    the first transaction finds out. A migration's ``SET LOCAL``, which comes after, still wins."""
    local = "SELECT " + ", ".join(
        f"set_config('{name}', '{value}', true)" for name, value in settings.items()
    )
    # Sets each to the session's default (pg_settings.reset_val), then to the tracker's, and compares
    # the two as the server shows them (30000 and 30000ms both read 30s).
    wanted = ", ".join(f"('{name}', '{value}')" for name, value in settings.items())
    check = (
        "SELECT bool_and(set_config(s.name, s.reset_val, true) = set_config(s.name, w.value, true)) "
        f"FROM pg_settings AS s JOIN (VALUES {wanted}) AS w (name, value) USING (name)"
    )
    by_default: list[bool | None] = [None]  # None: not known yet

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        if by_default[0] is None:
            by_default[0] = False  # transactions that begin meanwhile set them
            try:
                found = bool(conn.exec_driver_sql(check).scalar())
            except BaseException:
                by_default[0] = None
                raise
            by_default[0] = found
            if not found:
                log.info(
                    "behind a pooler in transaction mode, each transaction sets %s: the server's "
                    "defaults for this role and database do not (ALTER ROLE ... SET would save a "
                    "round trip per transaction)",
                    ", ".join(f"{name} = {value}" for name, value in settings.items()),
                    extra={"action": "pg_settings_per_transaction"},
                )
        elif not by_default[0]:
            conn.exec_driver_sql(local)


def _configure_sqlite(engine: AsyncEngine, config: TrackerConfig) -> None:
    """WAL, busy timeout, foreign keys, and transactions whose BEGIN we emit ourselves.

    The sqlite3 module's own transaction handling begins lazily and cannot take the write lock up
    front. Writers use BEGIN IMMEDIATE so that two writers queue on the busy timeout instead of one
    failing with "database is locked" when it upgrades a read lock mid-transaction (WAL cannot wait
    out that case), and wait a slice at a time (``tracker.sqlite_begin``): ``to_completion`` flags
    an attempt whose caller was cancelled, and one still waiting for the lock then gives up.
    """

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        configure_sqlite(dbapi_connection, config)

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        if conn.get_execution_options().get(_SQLITE_BEGIN) == "IMMEDIATE":
            with sliced(conn.exec_driver_sql, config.sqlite_busy_timeout_s):
                begin_immediate(
                    conn.exec_driver_sql, config.sqlite_busy_timeout_s, CALLER.get(), is_transient
                )
        else:
            conn.exec_driver_sql("BEGIN DEFERRED")


def configure_sqlite(dbapi_connection: Any, config: TrackerConfig) -> None:
    """Set up a new SQLite connection: the engine's pool and the lanes (``tracker.sqlite_lane``) both
    use this, so every connection of a tracker sees the same pragmas and functions."""
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # No lock-taking statement here: journal_mode=WAL is set once per file by ensure_wal().
    cursor.execute(f"PRAGMA busy_timeout={int(config.sqlite_busy_timeout_s * 1000)}")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA mmap_size={config.sqlite_mmap_mib * 1024 * 1024}")
    # A long reader (an operator's query) stops checkpoints from recycling the WAL, which then grows
    # with every commit; SQLite never gives the space back unless told to, after the next checkpoint.
    cursor.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
    try:
        cursor.execute("SELECT power(2.0, 0.5)")
    except Exception:  # SQLite built without math functions: provide the one we use.
        dbapi_connection.create_function("power", 2, math.pow, deterministic=True)
    cursor.close()


async def ensure_wal(engine: AsyncEngine, attempts: int = 50) -> None:
    """Put an SQLite file in WAL mode (persistent, so once per file; a no-op on Postgres).

    Switching the journal mode needs the file to itself and SQLite answers "database is locked" at
    once instead of waiting on the busy timeout, so several processes opening a new file at the same
    moment retry here, with back-off, without blocking the event loop.
    """
    if engine.dialect.name != "sqlite":
        return
    for attempt in range(attempts):
        try:
            async with engine.connect() as conn:
                # On the bare aiosqlite connection: SQLAlchemy would open a transaction first, and
                # the journal mode cannot change inside one.
                raw: Any = (await conn.get_raw_connection()).driver_connection
                async with raw.execute("PRAGMA journal_mode=WAL") as cursor:
                    mode = await cursor.fetchone()
                if mode is None or str(mode[0]).lower() != "wal":
                    raise StorageError(f"SQLite refused WAL mode (journal_mode is {mode})")
                return
        except sqlite3.OperationalError as error:  # from the bare driver, so not wrapped by SQLAlchemy
            if "locked" not in str(error) or attempt == attempts - 1:
                raise StorageError(f"cannot put the SQLite file in WAL mode: {error}") from error
            await asyncio.sleep(min(0.2, 0.005 * 2**attempt))


@asynccontextmanager
async def write_connection(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection whose transactions take SQLite's write lock at BEGIN (no effect on Postgres)."""
    async with engine.connect() as conn:
        await conn.execution_options(**{_SQLITE_BEGIN: "IMMEDIATE"})
        yield conn


class _SqliteWriter:
    """One in-process writer at a time per SQLite engine, and how many write units want it.

    SQLite lets one connection write at a time anyway. Without this, the coroutines of one process
    (ingest, selections, the sweeper, gossip) would queue on the file lock inside driver threads, each
    thread sleeping in SQLite's busy handler, and under load some exhausted the busy timeout. Queued
    on an asyncio lock instead, they wait in order and cheaply; other processes still queue on the
    file lock.
    """

    __slots__ = ("lock", "wanted")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        #: Write units holding or waiting for ``lock``: the lock alone reads free for a moment
        #: between one holder's release and the next waiter's wake-up.
        self.wanted = 0


_SQLITE_WRITERS: weakref.WeakKeyDictionary[Any, _SqliteWriter] = weakref.WeakKeyDictionary()


def _sqlite_writer(engine: AsyncEngine) -> _SqliteWriter | None:
    if engine.dialect.name != "sqlite":
        return None
    writer = _SQLITE_WRITERS.get(engine.sync_engine)
    if writer is None:
        writer = _SQLITE_WRITERS[engine.sync_engine] = _SqliteWriter()
    return writer


def sqlite_writer_busy(engine: AsyncEngine) -> bool:
    """Whether a write unit of this process holds or awaits the SQLite writer (always ``False`` on
    Postgres). Selection looks at it to decide where to rank (``AvailabilityTracker.select_best_peers``)."""
    writer = _SQLITE_WRITERS.get(engine.sync_engine)
    return writer is not None and writer.wanted > 0


class DriverSQL(Protocol):
    """The one call the hot units of work make: driver-level SQL with positional parameters (a tuple
    runs once and returns rows; a list of tuples is an executemany). ``AsyncConnection`` has it, and so
    has the SQLite lanes' ``LaneConnection``, so one unit of work serves both."""

    async def exec_driver_sql(self, statement: str, parameters: Any = None) -> Any: ...


async def run_write(
    engine: AsyncEngine,
    work: Callable[[AsyncConnection], Awaitable[T]],
    retries: int,
    *,
    repeatable: bool = False,
) -> T:
    """Run ``work`` in one write transaction, retrying deadlocks, busy errors and lost connections
    with back-off.

    ``work`` must be safe to run again from scratch: a retried transaction was rolled back entirely.
    On Postgres a connection lost while committing leaves the outcome open: the server may have
    committed. The transaction's id, read before COMMIT, settles it (``txid_status`` on a new
    connection): committed is success, aborted runs again, and anything else raises
    ``CommitOutcomeUnknown``. ``repeatable`` work, which may be applied twice without harm, skips the
    check and runs again like any other lost connection.
    It must not call ``run_write`` itself (on SQLite that would wait for its own lock).
    """
    check_commit = engine.dialect.name == "postgresql" and not repeatable

    async def once() -> T:
        committing, xid = False, None
        try:
            async with write_connection(engine) as conn, conn.begin():
                still_wanted()
                result = await work(conn)
                if check_commit:
                    # NULL when the work wrote nothing: then there is nothing to apply twice.
                    xid = (await conn.exec_driver_sql("SELECT txid_current_if_assigned()")).scalar()
                committing = True
            return result
        except Exception as error:
            if not (committing and check_commit and _commit_unanswered(error)):
                raise
            status = "aborted" if xid is None else await _commit_status(engine, xid)
            if status == "committed":
                log.warning(
                    "COMMIT went unanswered but was applied",
                    extra={"action": "commit_checked", "status": status, "error": describe(error)},
                )
                return result
            if status == "aborted":
                raise _RolledBack(error) from error
            raise CommitOutcomeUnknown(f"the connection failed while committing: {error}") from error

    return await _with_retries(engine, lambda: to_completion(engine, once()), retries)


#: Per engine: transactions whose callers were cancelled, still running to their end.
_ORPHANS: weakref.WeakKeyDictionary[Any, set[asyncio.Task[Any]]] = weakref.WeakKeyDictionary()
#: Per engine: every transaction running (its caller's or an orphan), which ``settle`` waits for.
_RUNNING: weakref.WeakKeyDictionary[Any, set[asyncio.Task[Any]]] = weakref.WeakKeyDictionary()
#: Engines being released (``retire``): no transaction begins on them any more.
_RETIRED: weakref.WeakSet[Any] = weakref.WeakSet()


async def to_completion(engine: AsyncEngine, transaction: Awaitable[T]) -> T:
    """Await ``transaction`` (one connection's whole use), which runs to its end even if the caller is
    cancelled: the caller gets ``CancelledError`` at once, the transaction commits or rolls back
    and gives its connection back. Cancelled inside, an SQLite transaction's rollback was cancelled
    too, and its connection, dropped unreturned, held the write lock until the garbage collector
    found it: every later write failed as locked (QA round 18); a cancelled asyncpg read dropped
    its connection with an unretrieved error. ``settle`` waits for such leftovers.

    A transaction still waiting for SQLite's write lock, or for a pooled connection, when its caller
    is cancelled gives up instead (``tracker.sqlite_begin``, ``still_wanted``): it has not begun, so
    nothing is left half done."""
    if engine.sync_engine in _RETIRED:
        if asyncio.iscoroutine(transaction):
            transaction.close()  # never begun
        raise TrackerClosed("the tracker closed before this call reached the database")
    caller = Caller()
    token = CALLER.set(caller)
    try:
        task = asyncio.ensure_future(transaction)  # which runs in a copy of this context
    finally:
        CALLER.reset(token)
    running = _RUNNING.setdefault(engine.sync_engine, set())
    running.add(task)
    task.add_done_callback(running.discard)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        caller.gone = True
        if not task.done():
            orphans = _ORPHANS.setdefault(engine.sync_engine, set())
            orphans.add(task)
            task.add_done_callback(functools.partial(_orphan_done, orphans))
        raise


def still_wanted() -> None:
    """Raise ``Abandoned`` if the caller of the transaction about to begin was cancelled meanwhile
    (waiting for a pooled connection, say): work nobody awaits is not begun. Run to their end, 2,000
    reads whose callers had given up held every later caller for 6.5 s (QA round 70)."""
    caller = CALLER.get()
    if caller is not None and caller.gone:
        raise Abandoned("the caller gave up before its transaction began")


def _orphan_done(orphans: set[asyncio.Task[Any]], task: asyncio.Task[Any]) -> None:
    """A transaction nobody awaits any more ended: forgotten, and its outcome marked seen (asyncio
    would log it as never retrieved; its caller was told it was cancelled)."""
    orphans.discard(task)
    if not task.cancelled():
        task.exception()


async def settle(engine: AsyncEngine, timeout_s: float) -> None:
    """Wait up to ``timeout_s`` for the transactions running on ``engine`` to end, those whose callers
    were cancelled included, so that closing the engine finds their connections returned."""
    running = _RUNNING.get(engine.sync_engine)
    if running:
        await asyncio.wait(set(running), timeout=timeout_s)


def retire(engine: AsyncEngine) -> None:
    """Let no new transaction begin on ``engine`` (``TrackerClosed``): it is being released. Calls
    that took the engine before ``close()`` and reached the database after it ran on the pool that
    disposing made, on connections nothing closed (QA round 70)."""
    _RETIRED.add(engine.sync_engine)


class _RolledBack(Exception):
    """A COMMIT went unanswered and the server says the transaction was rolled back: safe to run
    again. Carries the driver error it stands for."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


_STATUS_WAIT_S = 2.0  # for the server to finish a transaction whose connection is going away, or to come back


async def _commit_status(engine: AsyncEngine, xid: int) -> str | None:
    """What Postgres says became of transaction ``xid`` ("committed", "aborted"), asked on a new
    connection; None when it cannot say within ``_STATUS_WAIT_S`` (unreachable, or the transaction
    still in progress). A server that restarted answers too: its recovery knows what committed."""
    failure: Exception | None = None
    try:
        async with asyncio.timeout(_STATUS_WAIT_S):
            while True:
                try:
                    async with engine.connect() as conn:
                        status = (await conn.exec_driver_sql("SELECT txid_status($1)", (xid,))).scalar()
                    if status != "in progress":
                        return str(status) if status is not None else None
                except Exception as error:  # asked again until the deadline
                    failure = error
                await asyncio.sleep(0.05)
    except TimeoutError:
        log.warning(
            "cannot settle an unanswered COMMIT: %s",
            describe(failure) if failure else "the transaction is still in progress",
            extra={"action": "commit_check_failed"},
        )
        return None


def _commit_unanswered(error: BaseException) -> bool:
    """Whether a failed COMMIT may still have been applied: no SQLSTATE (the server did not answer),
    a connection exception (class 08, which asyncpg also raises for a connection lost on its side)
    or the server going down (57P)."""
    state = sqlstate_of(error)
    return state is None or state.startswith(("08", "57P"))


async def run_write_unit(
    engine: AsyncEngine,
    lane: SqliteLane | None,
    work: Callable[[DriverSQL], Awaitable[T]],
    retries: int,
    *,
    repeatable: bool = False,
) -> T:
    """``run_write`` for a unit that only sends driver SQL: on SQLite's write lane when there is one
    (the whole transaction in one thread crossing, see ``tracker.sqlite_lane``), else on the engine."""
    if lane is None:
        return await run_write(engine, work, retries, repeatable=repeatable)

    async def once() -> T:
        return await lane.transaction(work)

    return await _with_retries(engine, once, retries)


async def run_read_unit(
    engine: AsyncEngine, lane: SqliteLane | None, work: Callable[[DriverSQL], Awaitable[T]]
) -> T:
    """``run_read`` for a unit that only sends driver SQL: on SQLite's read lane when there is one (one
    read transaction in one thread crossing, see ``tracker.sqlite_lane``), else on the engine."""
    if lane is None:
        return await run_read(engine, work)
    return await _translating(lane.transaction(work))


async def _with_retries(engine: AsyncEngine, once: Callable[[], Awaitable[T]], retries: int) -> T:
    attempt = 0
    writer = _sqlite_writer(engine)
    while True:
        try:
            if writer is None:
                return await once()
            writer.wanted += 1
            try:
                async with writer.lock:
                    return await once()
            finally:
                writer.wanted -= 1
        except Exception as error:
            # A lost connection is retried too: ``once`` raised CommitOutcomeUnknown instead if it was
            # lost while committing and may have committed, so what reaches here was rolled back.
            if isinstance(error, _RolledBack):
                error = error.error
            elif not (is_transient(error) or is_disconnect(error)):
                if is_driver_error(error):
                    raise translate(error) from error
                raise
            attempt = await _back_off(error, attempt, retries, "write_retry")


async def _back_off(error: Exception, attempt: int, retries: int, action: str) -> int:
    """Wait before the next attempt (exponential, at most 0.5 s), or raise ``error`` translated once
    ``retries`` are spent; return the attempt's number."""
    if attempt >= retries:
        raise translate(error) from error
    attempt += 1
    what = "database connection lost" if is_disconnect(error) else "transient database conflict"
    # The error described, never str(error): SQLAlchemy's carries the statement and its parameters
    # (~1.7 KB a line, peer ids in bulk, for each retried deadlock of a gossip merge in a soak).
    # In the message, not a field: the CLI's commands print a warning's message alone, and "transient
    # database conflict on attempt 1 of 9, retrying" told an operator nothing of the lock his own
    # session held (QA round 69).
    fields: dict[str, Any] = {"action": action, "attempt": attempt}
    if (state := sqlstate_of(error)) is not None:
        fields["sqlstate"] = state
    log.warning(f"{what} on attempt {attempt} of {retries + 1}, retrying: {describe(error)}", extra=fields)
    log.debug("the retried error in full", exc_info=error, extra={"action": action, "attempt": attempt})
    await asyncio.sleep(min(0.5, 0.005 * 2**attempt))
    return attempt


async def run_read(
    engine: AsyncEngine, work: Callable[[AsyncConnection], Awaitable[T]], retries: int = _READ_RETRIES
) -> T:
    """Run ``work`` on a plain connection, translating driver errors. A read whose connection was lost
    (a restarted or failed-over server, a killed backend) runs again on a fresh one: reads are safe
    to repeat, and the pool's pre-ping cannot see a connection die while it is in use."""
    attempt = 0

    async def once() -> T:
        async with engine.connect() as conn:
            still_wanted()
            return await work(conn)

    while True:
        try:
            return await to_completion(engine, once())
        except Exception as error:
            if not (is_disconnect(error) or is_stale_statement(error)):
                if is_driver_error(error):
                    raise translate(error) from error
                raise
            attempt = await _back_off(error, attempt, retries, "read_retry")


async def _translating(call: Awaitable[T]) -> T:
    """Await ``call``, raising driver errors as the tracker's ``StorageError`` family."""
    try:
        return await call
    except Exception as error:
        if is_driver_error(error):
            raise translate(error) from error
        raise


def is_driver_error(error: BaseException) -> bool:
    """Errors of the database or of reaching it (a refused connection surfaces as an ``OSError``,
    no pooled connection free in time as SQLAlchemy's ``TimeoutError``)."""
    from sqlalchemy import exc as sa_exc

    return isinstance(error, sa_exc.DBAPIError | sa_exc.TimeoutError | sqlite3.Error | OSError)


def missing_sqlite_file(config: TrackerConfig) -> str | None:
    """The path of an SQLite database that does not exist yet (``None``: it exists, or not SQLite).

    Connecting creates the file: a caller that must not create one (a read, a tracker that may not
    migrate) checks first, so a typo in a path is an error and not an empty file or an empty swarm.
    """
    if config.dialect != "sqlite":
        return None
    database = make_url(config.database_url).database
    if database and database != ":memory:" and not Path(database).exists():
        return database
    return None


def _sqlite_file(config: TrackerConfig) -> Path | None:
    """The SQLite file ``config`` names, symlinks followed (a link to a file not made yet is created
    where it points: QA round 75), or ``None`` (Postgres, in-memory)."""
    if config.dialect != "sqlite":
        return None
    database = make_url(config.database_url).database
    if not database or database == ":memory:":
        return None
    try:
        return Path(database).resolve()
    except (RuntimeError, OSError) as error:  # a symlink loop: Python's own exception (QA round 77)
        raise ConfigError(f"the database path {database} cannot be resolved: {error}") from None


def refuse_sqlite_directory(config: TrackerConfig) -> Path | None:
    """The SQLite file ``config`` names (``_sqlite_file``), refused if it is a directory: SQLite said
    only "unable to open database file" (QA 74)."""
    if (path := _sqlite_file(config)) is not None and path.is_dir():
        shown = make_url(config.database_url).database
        raise ConfigError(
            f"the database {shown} is a directory: name a file (in it, say {path / 'tracker.db'})"
        )
    return path


def require_creatable(config: TrackerConfig) -> None:
    """Refuse an SQLite path that cannot be opened or created, saying why: SQLite's own "unable to
    open database file" named neither the file nor the reason (QA rounds 16, 59; a directory given
    as the file, or a directory this user may not write in, QA round 74)."""
    path = refuse_sqlite_directory(config)
    if path is None or path.exists():
        return
    shown = make_url(config.database_url).database
    if not path.parent.is_dir():
        raise ConfigError(f"cannot create the database {shown}: directory {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise ConfigError(
            f"cannot create the database {shown}: this user may not write in directory {path.parent}"
        )


def insert_for(dialect: str, table: Table) -> Any:
    """The dialect's INSERT, which has ``on_conflict_do_update``/``do_nothing`` on both engines."""
    if dialect == "sqlite":
        return sqlite.insert(table)
    return postgresql.insert(table)

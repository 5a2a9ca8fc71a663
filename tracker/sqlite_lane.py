"""SQLite lanes: a whole transaction runs in one worker thread, in one crossing.

Through SQLAlchemy's aiosqlite adapter every step of a transaction (BEGIN, cursor, execute, fetch, close,
COMMIT, the pool's reset) is handed to aiosqlite's thread and back. On the 2-core machines we run on a
crossing costs ~0.1 ms (a queue put, a thread wake-up, a loop wake-up): a selection made twelve of
them, an ingest transaction about twenty, a one-statement read five (docs/benchmarks.md). Here the
tracker's hot units (ingest's ``apply_events`` and selection on the write lane; the API's reads on the
read lane, where a selection also ranks while the writer is busy) run whole in a lane thread on its
own ``sqlite3`` connection: one crossing per transaction, and no SQLAlchemy execution machinery in
between (their statements are ``Precompiled``).

A unit of work is the same ``async`` function the Postgres path runs, given a ``LaneConnection``
whose ``exec_driver_sql`` completes without suspending. The lane drives the coroutine to its end inside
the thread; a unit that awaits anything else (a sleep, a lock, a network call) is a bug and fails
loudly instead of blocking the thread on an event loop it cannot reach.

SQLite lets one connection write at a time; the write lane's single thread and ``db.run_write``'s
in-process writer lock keep writers in order, and other processes queue on the file lock (the
connection's busy timeout, a slice at a time: ``tracker.sqlite_begin``) in that thread, never in the
event loop.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from sqlalchemy.engine import make_url

from .config import TrackerConfig
from .errors import TrackerClosed, is_transient
from .sqlite_begin import Abandoned, Caller, begin_immediate, slice_ms

T = TypeVar("T")
#: ``echo_sql`` shows the lane's statements where SQLAlchemy's echo shows the engine's.
_echo_log = logging.getLogger("sqlalchemy.engine.Engine")

#: Called with (sql, parameters, executemany) for every statement a lane runs, in the lane's thread.
StatementObserver = Callable[[str, Any, bool], None]

#: Read lane threads: this machine kind has two cores, and SQLite releases the GIL while it reads.
READ_THREADS = 2


class _Rows(list[Any]):
    """A statement's fetched rows, with what the write path reads of a result (``all()``, ``rowcount``)."""

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        super().__init__(rows)
        self.rowcount = rowcount

    def all(self) -> list[Any]:
        return self


class LaneConnection:
    """What a unit of work holds on the lane: driver SQL, executed at once on the thread's connection.

    Same call as ``AsyncConnection.exec_driver_sql`` for what the write path uses: a tuple runs the
    statement once and returns its rows; a list of tuples runs it once per tuple (executemany).
    """

    __slots__ = ("_observers", "_raw")

    def __init__(self, raw: sqlite3.Connection, observers: list[StatementObserver]) -> None:
        self._raw = raw
        self._observers = observers

    async def exec_driver_sql(self, statement: str, parameters: Any = None) -> _Rows:
        many = isinstance(parameters, list)
        for observe in self._observers:
            observe(statement, parameters, many)
        if many:
            cursor = self._raw.executemany(statement, parameters)
            written = cursor.rowcount
            cursor.close()
            return _Rows([], written)
        cursor = self._raw.execute(statement, parameters or ())
        try:
            return _Rows(cursor.fetchall(), cursor.rowcount)
        finally:
            cursor.close()


def lane_path(config: TrackerConfig) -> str | None:
    """The file a lane would open for ``config``, or ``None`` where a second connection would not see
    the same database (Postgres; an in-memory SQLite database, which the tracker refuses anyway: it
    needs WAL, and WAL needs a file)."""
    if config.dialect != "sqlite":
        return None
    url = make_url(config.database_url)
    database = url.database or ""
    if database in ("", ":memory:") or database.startswith("file:") or url.query.get("mode") == "memory":
        return None
    return database


class SqliteLane:
    """Worker threads, each with its own ``sqlite3`` connection, that run transactions whole (module
    docstring). The write lane has one thread and begins ``IMMEDIATE`` (takes the write lock up front);
    a read-only lane has a few, begins ``DEFERRED`` and sets ``query_only``, so a unit that tried to
    write there would fail instead of taking the write lock (WAL lets readers run beside the writer
    and each other; the threads release the GIL while SQLite works).

    ``configure`` prepares a new connection exactly as the engine's pool does (``db.configure_sqlite``),
    so all see the same pragmas and functions. Close it with ``close()``; the tracker does.
    """

    def __init__(
        self,
        path: str,
        configure: Callable[[sqlite3.Connection], None],
        observers: list[StatementObserver],
        *,
        busy_timeout_s: float,
        threads: int = 1,
        read_only: bool = False,
    ) -> None:
        self._path = path
        self._busy_timeout_s = busy_timeout_s
        self._configure = configure
        self._read_only = read_only
        self._local = threading.local()
        self._opened: list[sqlite3.Connection] = []
        self._opened_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="peer-tracker-sqlite")
        self._closed = False
        self._observers = observers
        #: The callers of transactions not yet ended, for abandon_waiting().
        self._callers: set[Caller] = set()

    async def transaction(self, work: Callable[[LaneConnection], Awaitable[T]]) -> T:
        """Run ``work`` in one transaction in a lane thread; commit, or roll back and raise. Driver
        errors come through unwrapped (``db.run_write_unit`` retries and translates them).

        A caller cancelled while its transaction runs stops waiting; the transaction still finishes in
        the thread (commits or rolls back), as a statement already sent to a server would. One that has
        not begun (queued behind another, or waiting for another process's write lock) never does: it
        ends with ``sqlite_begin.Abandoned``, which nobody sees.
        """
        if self._closed:
            raise TrackerClosed("the tracker is closed (its SQLite lanes are shut down)")
        loop = asyncio.get_running_loop()
        caller = Caller()
        self._callers.add(caller)
        try:
            return await loop.run_in_executor(self._executor, self._run, work, caller)
        except asyncio.CancelledError:
            caller.gone = True
            raise
        except Abandoned as abandoned:  # by abandon_waiting(), its caller still there
            raise TrackerClosed(
                "the tracker was aborted before this write began; nothing of it was written"
            ) from abandoned
        finally:
            self._callers.discard(caller)

    def abandon_waiting(self) -> None:
        """Give up the transactions not yet begun (queued, or waiting for another process's lock):
        their callers get ``TrackerClosed``. For ``AvailabilityTracker.abort()``; the lane still
        refuses nothing until it is closed."""
        for caller in self._callers:
            caller.gone = True

    def _connection(self) -> sqlite3.Connection:
        raw: sqlite3.Connection | None = getattr(self._local, "raw", None)
        if raw is None:
            # check_same_thread off only so that close() can close it after its thread has stopped.
            raw = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            try:
                self._configure(raw)
                if self._read_only:
                    raw.execute("PRAGMA query_only=ON")
                else:
                    # It waits for the lock at BEGIN only (a WAL writer holding it waits for nothing
                    # else), and there a slice a try (``sqlite_begin``): set once, not per transaction.
                    raw.execute(f"PRAGMA busy_timeout={slice_ms(self._busy_timeout_s)}")
            except BaseException:
                raw.close()
                raise
            with self._opened_lock:
                self._opened.append(raw)
            self._local.raw = raw
        return raw

    def _run(self, work: Callable[[LaneConnection], Awaitable[T]], caller: Caller) -> T:
        raw = self._connection()
        if self._read_only:
            raw.execute("BEGIN DEFERRED")
        else:
            begin_immediate(raw.execute, self._busy_timeout_s, caller, is_transient)
        try:
            result = _drive(work(LaneConnection(raw, self._observers)))
            raw.execute("COMMIT")
        except BaseException:
            if raw.in_transaction:
                raw.execute("ROLLBACK")
            raise
        return result

    async def close(self) -> None:
        """Let running transactions finish, stop the threads and close their connections (in a worker
        thread, off the event loop). Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        await asyncio.get_running_loop().run_in_executor(None, self._shutdown)

    def _shutdown(self) -> None:
        self._executor.shutdown(wait=True)
        with self._opened_lock:
            opened, self._opened = self._opened, []
        for raw in opened:
            raw.close()


class SqliteLanes:
    """A tracker's two lanes on one SQLite file: ingest and selection on ``write``, the API's reads on
    ``read``. ``observers`` (tests, the benchmark's replay) see the SQL both send, in their threads."""

    def __init__(
        self,
        path: str,
        configure: Callable[[sqlite3.Connection], None],
        *,
        busy_timeout_s: float,
        echo: bool = False,
    ) -> None:
        self.observers: list[StatementObserver] = [_echo] if echo else []
        self.write = SqliteLane(path, configure, self.observers, threads=1, busy_timeout_s=busy_timeout_s)
        self.read = SqliteLane(
            path,
            configure,
            self.observers,
            threads=READ_THREADS,
            read_only=True,
            busy_timeout_s=busy_timeout_s,
        )

    async def close(self) -> None:
        """Close both lanes (the write lane first: queued writes finish before the readers stop)."""
        try:
            await self.write.close()
        finally:
            await self.read.close()


def _drive(awaitable: Awaitable[T]) -> T:
    """Run a coroutine that never suspends to its end, here in this thread, and return its value."""
    if not isinstance(awaitable, Coroutine):
        raise TypeError(f"a lane unit of work must be a coroutine, got {type(awaitable).__name__}")
    coroutine: Coroutine[Any, Any, T] = awaitable
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coroutine.close()
    raise RuntimeError(
        "a unit of work on an SQLite lane awaited something other than its connection; "
        "only LaneConnection.exec_driver_sql may be awaited inside a lane transaction"
    )


def _echo(statement: str, parameters: Any, many: bool) -> None:
    """``echo_sql`` for the lanes, on SQLAlchemy's engine logger (its own echo never sees these).

    Handed to the logger's handlers whatever its level, as SQLAlchemy's echo does: importing
    SQLAlchemy sets its loggers to WARNING, and ``info()`` dropped every lane statement (QA round
    11: ingest, selections and reads never showed).
    """
    shown = f"[{len(parameters)} rows]" if many else repr(parameters)
    record = _echo_log.makeRecord(
        _echo_log.name, logging.INFO, __file__, 0, "[sqlite lane] %s %s", (statement, shown), None
    )
    _echo_log.handle(record)

"""The SQLite write lane: a whole write transaction runs in one worker thread, in one crossing.

Through SQLAlchemy's aiosqlite adapter every step of a transaction (BEGIN, cursor, execute, fetch, close,
COMMIT, the pool's reset) is handed to aiosqlite's thread and back. On the 2-core machines we run on a
crossing costs ~0.1 ms (a queue put, a thread wake-up, a loop wake-up), and a selection made twelve of
them, an ingest transaction about twenty (docs/benchmarks.md). Here the tracker's hot write units,
``apply_events`` and the selection, run whole in the lane's thread on its own ``sqlite3`` connection:
one crossing per transaction, and no SQLAlchemy execution machinery in between (their statements are
``Precompiled`` already).

A unit of work is the same ``async`` function the Postgres path runs, given a ``LaneConnection``
whose ``exec_driver_sql`` completes without suspending. The lane drives the coroutine to its end inside
the thread; a unit that awaits anything else (a sleep, a lock, a network call) is a bug and fails
loudly instead of blocking the thread on an event loop it cannot reach.

SQLite lets one connection write at a time; the lane's single thread and ``db.run_write``'s
in-process writer lock keep writers in order, and other processes queue on the file lock (the
connection's busy timeout) in this thread, never in the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from sqlalchemy.engine import make_url

from .config import TrackerConfig

T = TypeVar("T")
#: ``echo_sql`` shows the lane's statements where SQLAlchemy's echo shows the engine's.
_echo_log = logging.getLogger("sqlalchemy.engine.Engine")

#: Called with (sql, parameters, executemany) for every statement the lane runs, in the lane's thread.
StatementObserver = Callable[[str, Any, bool], None]


class _Rows(list[Any]):
    """A statement's fetched rows, with the one result method the write path reads (``all()``)."""

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
            self._raw.executemany(statement, parameters)
            return _Rows()
        cursor = self._raw.execute(statement, parameters or ())
        try:
            return _Rows(cursor.fetchall())
        finally:
            cursor.close()


def lane_path(config: TrackerConfig) -> str | None:
    """The file a lane would open for ``config``, or ``None`` where a second connection would not see
    the same database (Postgres; an in-memory SQLite database, private to its connection)."""
    if config.dialect != "sqlite":
        return None
    url = make_url(config.database_url)
    database = url.database or ""
    if database in ("", ":memory:") or database.startswith("file:") or url.query.get("mode") == "memory":
        return None
    return database


class SqliteLane:
    """One thread and one ``sqlite3`` connection that run write transactions whole (module docstring).

    ``configure`` prepares a new connection exactly as the engine's pool does (``db.configure_sqlite``),
    so both see the same pragmas and functions. Close it with ``close()``; the tracker does.
    """

    def __init__(
        self, path: str, configure: Callable[[sqlite3.Connection], None], *, echo: bool = False
    ) -> None:
        self._path = path
        self._configure = configure
        self._raw: sqlite3.Connection | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="peer-tracker-sqlite-lane")
        self._closed = False
        #: Statement observers (tests and the benchmark's replay read the SQL the lane sends).
        self.observers: list[StatementObserver] = []
        if echo:
            self.observers.append(_echo)

    async def transaction(self, work: Callable[[LaneConnection], Awaitable[T]]) -> T:
        """Run ``work`` in one ``BEGIN IMMEDIATE`` transaction in the lane's thread; commit, or roll back
        and raise. Driver errors come through unwrapped (``db.run_write`` retries and translates them).

        A caller cancelled while its transaction runs stops waiting; the transaction still finishes in
        the thread (commits or rolls back), as a statement already sent to a server would.
        """
        if self._closed:
            raise RuntimeError("the SQLite write lane is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._run, work)

    def _connection(self) -> sqlite3.Connection:
        if self._raw is None:
            raw = sqlite3.connect(self._path, isolation_level=None, check_same_thread=True)
            try:
                self._configure(raw)
            except BaseException:
                raw.close()
                raise
            self._raw = raw
        return self._raw

    def _run(self, work: Callable[[LaneConnection], Awaitable[T]]) -> T:
        raw = self._connection()
        raw.execute("BEGIN IMMEDIATE")
        try:
            result = _drive(work(LaneConnection(raw, self.observers)))
            raw.execute("COMMIT")
        except BaseException:
            if raw.in_transaction:
                raw.execute("ROLLBACK")
            raise
        return result

    async def close(self) -> None:
        """Close the connection in its own thread and stop the thread. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._close_connection)
        finally:
            self._executor.shutdown(wait=True)

    def _close_connection(self) -> None:
        raw, self._raw = self._raw, None
        if raw is not None:
            raw.close()


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
        "a unit of work on the SQLite write lane awaited something other than its connection; "
        "only LaneConnection.exec_driver_sql may be awaited inside a lane transaction"
    )


def _echo(statement: str, parameters: Any, many: bool) -> None:
    """``echo_sql`` for the lane, on its own logger (SQLAlchemy's echo does not see these statements)."""
    shown = f"[{len(parameters)} rows]" if many else repr(parameters)
    _echo_log.info("[sqlite lane] %s %s", statement, shown)

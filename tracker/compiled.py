"""Statements compiled once to the driver's SQL and run with plain values: the hot paths' statements.

``Precompiled`` runs any Core statement so; ``Rows`` and ``RowsStatement`` give a write statement a
batch's rows in the form each engine runs fastest (bound parameters per row on SQLite, arrays on
Postgres); ``BulkInsert`` is the plain many-rows insert built on them.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Hashable, Mapping
from typing import Any

from sqlalchemy import Table, bindparam, column, func, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.sql.dml import Insert
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import TypeEngine

from .db import DriverSQL, insert_for


def _driver_dialect(name: str) -> Any:
    if name == "sqlite":
        from sqlalchemy.dialects.sqlite.aiosqlite import dialect as aiosqlite_dialect

        return aiosqlite_dialect()
    from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect

    return asyncpg_dialect()  # type: ignore[no-untyped-call]


class Precompiled:
    """A Core statement compiled once to the driver's SQL, executed with plain tuples.

    SQLAlchemy recomputes a statement's cache key on every execution; for the big upserts of the
    write path that costs more than the database work of one event. Compiling once keeps the SQL
    written with Core (and dialect-checked) while a single event pays only the driver round trip.
    """

    def __init__(self, statement: Any, dialect: str) -> None:
        if isinstance(statement, Insert):
            # Nothing reads an inserted row back here, but SQLAlchemy would add RETURNING for a primary
            # key given as a subquery (peer_stats, content_peers) and, on Postgres, for every generated
            # id: each row then came back and was thrown away, ~17% of the peer_stats upsert's time.
            statement = statement.inline()
        compiled = statement.compile(dialect=_driver_dialect(dialect))
        self.sql: str = compiled.string
        self._names: tuple[str, ...] = tuple(compiled.positiontup or ())
        # Values the statement carries itself; a name without one must come with every call (a
        # missing one raises KeyError instead of binding NULL).
        self._defaults: dict[str, Any] = {
            name: value for name, value in compiled.params.items() if not compiled.binds[name].required
        }
        # itemgetter always returns a tuple when it picks several names, one value otherwise.
        self._pick = operator.itemgetter(*self._names) if len(self._names) > 1 else None

    def _row(self, params: dict[str, Any]) -> tuple[Any, ...]:
        # The write path's big statements carry no defaults: their rows are picked without a copy.
        merged = self._defaults | params if self._defaults else params
        if self._pick is not None:
            return self._pick(merged)  # type: ignore[no-any-return]
        return tuple(merged[n] for n in self._names)

    async def executemany(self, conn: DriverSQL, rows: list[dict[str, Any]]) -> int:
        """Run the statement once per row (one driver executemany); the rows it wrote in all, where the
        driver counts them (sqlite3 does; asyncpg's executemany reports nothing: 0)."""
        if not rows:
            return 0
        result = await conn.exec_driver_sql(self.sql, list(map(self._row, rows)))
        return max(0, int(result.rowcount or 0))

    async def execute(self, conn: DriverSQL, params: dict[str, Any]) -> int:
        """Run the statement once; the rows it wrote (the driver's row count)."""
        result = await conn.exec_driver_sql(self.sql, self._row(params))
        return int(result.rowcount or 0)

    async def fetch(self, conn: DriverSQL, params: dict[str, Any]) -> list[Any]:
        """Run the statement once and return its rows (tuples in select order)."""
        result = await conn.exec_driver_sql(self.sql, self._row(params))
        return list(result.all())


class Rows:
    """The per-row values of a write statement, in the form its engine runs fastest.

    On SQLite they are bound parameters and the statement runs once per row (one executemany of a
    statement compiled once: a row costs SQLite's own work). On Postgres they are one array per
    name, unnested into rows by a single statement: asyncpg's executemany runs the statement once per
    row, and the executor's start and end per row cost as much as an upsert's own work (a peer_stats
    upsert of a heartbeat: ~35 us a row that way, ~15 us as one statement over 1,000 rows).

    Values the statement binds without going through ``Rows`` (the node id, the clock) are the same for
    the whole batch.
    """

    def __init__(self, dialect: str, **types: TypeEngine[Any]) -> None:
        self.dialect = dialect
        self.arrays = dialect == "postgresql"
        self.names = tuple(types)
        self._source: Any = None
        if self.arrays:
            self._source = (
                func.unnest(*[bindparam(name, type_=postgresql.ARRAY(t)) for name, t in types.items()])
                .table_valued(*[column(name, t) for name, t in types.items()])
                .render_derived()
            )
            self._columns: dict[str, ColumnElement[Any]] = {name: self._source.c[name] for name in types}
        else:
            self._columns = {name: bindparam(name, type_=t) for name, t in types.items()}

    def __getitem__(self, name: str) -> ColumnElement[Any]:
        return self._columns[name]

    def insert(self, table: Table, values: Mapping[str, Any]) -> Any:
        """The dialect's INSERT of one row per row of the batch (``on_conflict_*`` applies to each)."""
        statement = insert_for(self.dialect, table)
        if self.arrays:
            return statement.from_select(list(values), select(*values.values()).select_from(self._source))
        return statement.values(dict(values))


class RowsStatement:
    """A write statement over ``Rows``, compiled once, run for a batch of rows given as dicts.

    On Postgres one statement covers many rows, and an ``ON CONFLICT DO UPDATE`` may not reach one
    row twice in a statement: rows with the same ``key`` then go in successive statements, the
    first of each key's rows in the first, and so on, so that each key's rows apply in their order
    (and locks are taken in the rows' order, as one row per statement did).
    """

    def __init__(
        self, statement: Any, rows: Rows, key: Callable[[dict[str, Any]], Hashable] | None = None
    ) -> None:
        self._statement = Precompiled(statement, rows.dialect)
        self.sql = self._statement.sql
        self._arrays = rows.names if rows.arrays else None
        self._key = key

    async def run(self, conn: DriverSQL, rows: list[dict[str, Any]]) -> int:
        """Apply every row, in order for any one key; how many rows the statement wrote (an upsert
        whose ``WHERE`` turns a row down does not count it; on Postgres, rows of a keyed statement's
        small later rounds are not counted: the keyed statements' callers do not read the count)."""
        if not rows:
            return 0
        if self._arrays is None:
            return await self._statement.executemany(conn, rows)
        written = 0
        rounds = _rounds(rows, self._key) if self._key is not None else [rows]
        # The first round always as arrays: a statement without a key has only that one, and its
        # callers read the count.
        small = next((i for i, part in enumerate(rounds) if i and len(part) < _SMALL_ROUND), len(rounds))
        for part in rounds[:small]:
            for start in range(0, len(part), ARRAY_ROWS):
                written += await self._statement.execute(
                    conn, self._as_arrays(part[start : start + ARRAY_ROWS])
                )
        if small < len(rounds):
            # A key with many rows (one peer's thousand outcomes) made as many statements, each a round
            # trip: rounds this small go as one driver executemany instead, one row per execution,
            # still in round order (so each key's rows apply in order); asyncpg counts nothing there.
            tail = [self._as_arrays([row]) for part in rounds[small:] for row in part]
            written += await self._statement.executemany(conn, tail)
        return written

    def _as_arrays(self, part: list[dict[str, Any]]) -> dict[str, Any]:
        assert self._arrays is not None
        params = dict(part[0])  # the batch's own values (node, clock) are the same in every row
        for name in self._arrays:
            params[name] = [row[name] for row in part]
        return params


#: Rows per statement as arrays: asyncpg encodes a statement's parameters on the event loop, ~0.45 us
#: a value, and one statement of 50,000 rows of four columns (a gossip message's samples) held the
#: loop for 90 ms (measured); a statement per 5,000 rows costs one more round trip each (~0.1 us a
#: row). Chunks keep the rows' order, and within a round no key repeats, so nothing else changes.
ARRAY_ROWS = 5_000

#: Rounds after the first with fewer rows than this run one row per execution in a single executemany:
#: a statement of its own costs a round trip (~0.5 ms on loopback), an executemany row ~35 us (``Rows``).
_SMALL_ROUND = 16


def _rounds(
    rows: list[dict[str, Any]], key: Callable[[dict[str, Any]], Hashable]
) -> list[list[dict[str, Any]]]:
    """Split rows into lists in which no key repeats: each key's n-th row goes into the n-th list."""
    seen: dict[Hashable, int] = {}
    rounds: list[list[dict[str, Any]]] = []
    for row in rows:
        k = key(row)
        n = seen.get(k, 0)
        seen[k] = n + 1
        if n == len(rounds):
            rounds.append([])
        rounds[n].append(row)
    return rounds


class BulkInsert:
    """Many rows into one table, compiled once, given as tuples in the order of ``columns``: on
    Postgres one ``INSERT ... SELECT FROM unnest()`` (``Rows``), on SQLite the driver's executemany.

    200,000 bandwidth samples took 8.2 s through asyncpg's executemany against 4.7 s as arrays
    (COPY: 3.7 s; most of the rest is the two foreign-key checks per row).
    """

    def __init__(self, table: Table, columns: tuple[str, ...], dialect: str) -> None:
        rows = Rows(dialect, **{name: table.c[name].type for name in columns})
        self._postgres = rows.arrays
        self._statement = Precompiled(rows.insert(table, {name: rows[name] for name in columns}), dialect)

    async def run(self, conn: DriverSQL, rows: list[tuple[Any, ...]]) -> None:
        """Insert ``rows``, tuples in the order of the columns given."""
        if not rows:
            return
        if self._postgres:
            for start in range(0, len(rows), ARRAY_ROWS):
                part = rows[start : start + ARRAY_ROWS]
                await conn.exec_driver_sql(self._statement.sql, tuple(map(list, zip(*part, strict=True))))
        else:
            await conn.exec_driver_sql(self._statement.sql, rows)

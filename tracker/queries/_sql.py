"""Small SQL building blocks shared by the read and write statements."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import and_, any_, bindparam, func, literal_column, or_, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import ColumnElement

from ..reputation import sql_num
from ..schema import contents, peer_stats, peers

#: A float constant as double precision, written into the SQL (the queries' short name for it).
num = sql_num

#: Ids per IN list where a statement names many rows by id: bounded statements and parameter counts
#: (SQLite limits bound parameters per statement) whatever the size of a gossip message.
IN_CHUNK = 500


def one_of(dialect: str, column: ColumnElement[Any], values: list[Any]) -> ColumnElement[bool]:
    """``column`` equals one of ``values``: an IN list on SQLite, one array parameter on Postgres (one
    statement text whatever the count, so one prepared statement; run it under ``custom_plans``)."""
    if dialect == "sqlite":
        return column.in_(values)
    return column == any_(bindparam(None, values, type_=postgresql.ARRAY(column.type)))


@asynccontextmanager
async def custom_plans(conn: AsyncConnection, dialect: str) -> AsyncIterator[None]:
    """Postgres plans the statements run inside for their own values and the tables' sizes now.

    asyncpg prepares every statement, and after five runs Postgres may keep a generic plan costed
    for the tables as they were then. A gossip merge fills empty tables: a key lookup planned when
    ``contents`` held a few rows kept seq-scanning it against each of 2,000 keys (87 ms a lookup at
    10,000 contents, and more as it grew); planned per call, one took ~2 ms, planning included. Scoped to
    the caller's transaction and restored after, so per-row statements keep their cached plans (an
    error aborts the transaction, whose rollback undoes the setting). The ranking, one statement in
    its own transaction, sets the mode for the whole transaction instead (``reads.py``).
    """
    if dialect == "sqlite":
        yield
        return
    before = (
        await conn.exec_driver_sql(
            "SELECT current_setting('plan_cache_mode'), set_config('plan_cache_mode', $1, true)",
            ("force_custom_plan",),
        )
    ).scalar()
    yield
    await conn.exec_driver_sql("SELECT set_config('plan_cache_mode', $1, true)", (before,))


def greatest(dialect: str, a: ColumnElement[Any], b: ColumnElement[Any]) -> ColumnElement[Any]:
    """The larger of two non-NULL values (SQLite's scalar max, Postgres's greatest)."""
    return func.max(a, b) if dialect == "sqlite" else func.greatest(a, b)


def least(dialect: str, a: ColumnElement[Any], b: ColumnElement[Any]) -> ColumnElement[Any]:
    """The smaller of two non-NULL values (SQLite's scalar min, Postgres's least)."""
    return func.min(a, b) if dialect == "sqlite" else func.least(a, b)


def peer_id_of(key: str | ColumnElement[Any]) -> ColumnElement[Any]:
    """The surrogate id of the peer whose key is bound to the parameter ``key`` (or is that column)."""
    value = bindparam(key) if isinstance(key, str) else key
    return select(peers.c.id).where(peers.c.peer_key == value).scalar_subquery()


def content_id_of(key: str | ColumnElement[Any]) -> ColumnElement[Any]:
    """The surrogate id of the content whose key is bound to the parameter ``key`` (or is that
    column); NULL for none."""
    value = bindparam(key) if isinstance(key, str) else key
    return select(contents.c.id).where(contents.c.content_key == value).scalar_subquery()


def node_key_of(node_id: ColumnElement[Any], dialect: str) -> ColumnElement[Any]:
    """The node key (origin name) behind a ``node_id`` column: the tie-break every node agrees on.

    Written as text because it lives inside ON CONFLICT ... WHERE, where SQLAlchemy cannot correlate a
    subquery to ``excluded`` or the target table and would add them to the subquery's FROM. Compared
    by code point on both engines (``COLLATE "C"`` on Postgres): under a database collation such as
    ICU "en-US" a Postgres node broke a tie between "a" and "B" the other way from a SQLite node.
    """
    column = node_id.table.name + "." + node_id.name
    collate = ' COLLATE "C"' if dialect == "postgresql" else ""
    return literal_column(
        f"(SELECT tracker_nodes.node_key{collate} FROM tracker_nodes WHERE tracker_nodes.id = {column})"
    )


def lww_newer(
    new_changed: ColumnElement[Any],
    new_node: ColumnElement[Any],
    old_changed: ColumnElement[Any],
    old_node: ColumnElement[Any],
    dialect: str,
) -> ColumnElement[bool]:
    """Whether a content mapping change beats the stored one: later ``changed_at`` wins, equal times go
    to the larger origin key, and the same origin's later write wins (its own order is authoritative).

    The local write path and the gossip merge use this one rule, so every node orders the same changes
    the same way whatever order they arrive in.
    """
    return or_(
        new_changed > old_changed,
        and_(
            new_changed == old_changed,
            or_(new_node == old_node, node_key_of(new_node, dialect) > node_key_of(old_node, dialect)),
        ),
    )


#: One origin's view of one peer as gossip and snapshots carry it (after the origin and before the
#: extras each adds): the stats row with the peer's key and first sighting. Join ``peers`` on peer_id.
PEER_STATE_COLUMNS = (
    peers.c.peer_key,
    peers.c.first_seen,
    peer_stats.c.online,
    peer_stats.c.online_since,
    peer_stats.c.last_seen,
    peer_stats.c.uptime_s,
    peer_stats.c.served_count,
    peer_stats.c.failed_count,
    peer_stats.c.success_weight,
    peer_stats.c.failure_weight,
    peer_stats.c.evidence_at,
)

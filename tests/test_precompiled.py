"""``compiled.Precompiled``: statements compiled once and run with tuples, on both engines.

The write path's upserts and the ranking run through it, so its parameter handling (defaults,
names used several times, constants written into the SQL) must give the same rows as SQLAlchemy.
"""

from __future__ import annotations

from sqlalchemy import Double, Integer, bindparam, literal, select

from tracker import AvailabilityTracker, reputation
from tracker.compiled import Precompiled
from tracker.db import insert_for
from tracker.queries import leases, writes
from tracker.queries._sql import num
from tracker.schema import nodes


async def test_parameters_defaults_repeats_and_inline_constants(tracker: AvailabilityTracker) -> None:
    dialect = tracker.config.dialect
    x = bindparam("x", type_=Double())
    none = Precompiled(select(num(0.25) * num(4.0)), dialect)
    one = Precompiled(select(x * num(2.0)), dialect)
    # "x" twice, a bound default (literal) and a constant written into the SQL.
    many = Precompiled(
        select(x + x, bindparam("n", type_=Integer()), literal(7, Integer()), num(1e-100)), dialect
    )
    async with tracker.engine.connect() as conn:
        assert [tuple(r) for r in await none.fetch(conn, {})] == [(1.0,)]
        assert [tuple(r) for r in await one.fetch(conn, {"x": 1.5})] == [(3.0,)]
        assert [tuple(r) for r in await many.fetch(conn, {"x": 0.5, "n": 3})] == [(1.0, 3, 7, 1e-100)]
        # Unused keys are ignored; a missing name without a default is an error, not a silent NULL.
        assert [tuple(r) for r in await one.fetch(conn, {"x": 2.0, "unused": 1})] == [(4.0,)]
    try:
        many._row({"x": 1.0})
    except KeyError as error:
        assert "n" in str(error)
    else:
        raise AssertionError("a missing parameter must raise")


def test_constants_are_written_into_the_sql_not_bound() -> None:
    for dialect in ("sqlite", "postgresql"):
        statement = Precompiled(select(num(0.5) + bindparam("x", type_=Double())), dialect)
        assert "CAST(0.5 AS DOUBLE PRECISION)" in statement.sql
        assert statement._names == ("x",)


def test_write_path_inserts_send_no_returning_clause() -> None:
    """Nothing reads an inserted row back on the write path: a RETURNING clause (which SQLAlchemy adds
    for a primary key given as a subquery, and on Postgres for every generated id) made the driver
    build and discard one result row per event."""
    for dialect in ("sqlite", "postgresql"):
        statements = [
            writes._peer_stats_upsert(dialect, 300.0, reputation.DEFAULT_PARAMS),
            writes._content_peers_upsert(dialect),
            writes._outcomes_insert(dialect),
            writes._samples_insert(dialect),
            writes._keys_upsert(dialect, "peers"),
            writes._keys_upsert(dialect, "contents"),
            leases._grant(dialect),
        ]
        for statement in statements:
            assert statement.sql.startswith("INSERT"), statement.sql[:40]
            assert "RETURNING" not in statement.sql.upper(), (dialect, statement.sql[:60])
    # An explicit RETURNING stays: only the implicit one is dropped.
    explicit = insert_for("sqlite", nodes).values(node_key=bindparam("k")).returning(nodes.c.id)
    assert "RETURNING" in Precompiled(explicit, "sqlite").sql

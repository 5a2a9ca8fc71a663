"""``db.Precompiled``: statements compiled once and run with tuples, on both engines.

The write path's upserts and the ranking run through it, so its parameter handling (defaults,
names used several times, constants written into the SQL) must give the same rows as SQLAlchemy.
"""

from __future__ import annotations

from sqlalchemy import Double, Integer, bindparam, literal, select

from tracker import AvailabilityTracker
from tracker.db import Precompiled
from tracker.queries._sql import num


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

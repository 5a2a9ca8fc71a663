"""Small SQL building blocks shared by the read and write statements."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Double, bindparam, func, literal, select
from sqlalchemy.sql.elements import ColumnElement

from ..schema import contents, peers


def num(value: float) -> ColumnElement[float]:
    """A float bound as double precision (Postgres would otherwise pick NUMERIC for a literal)."""
    return literal(float(value), Double())


def greatest(dialect: str, a: ColumnElement[Any], b: ColumnElement[Any]) -> ColumnElement[Any]:
    """The larger of two non-NULL values (SQLite's scalar max, Postgres's greatest)."""
    return func.max(a, b) if dialect == "sqlite" else func.greatest(a, b)


def peer_id_of(param: str) -> ColumnElement[Any]:
    """The surrogate id of the peer whose key is bound to ``param``."""
    return select(peers.c.id).where(peers.c.peer_key == bindparam(param)).scalar_subquery()


def content_id_of(param: str) -> ColumnElement[Any]:
    """The surrogate id of the content whose key is bound to ``param`` (NULL for none)."""
    return select(contents.c.id).where(contents.c.content_key == bindparam(param)).scalar_subquery()

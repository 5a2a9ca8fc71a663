"""Whether the live schema is the one the migrations make: what `tracker db check` compares beyond
the revision.

`alembic_version` only says which migrations ran. A column or index dropped by hand, or a column an
operator added, NOT NULL without a default, left the revision at head: `db check` said "up to date"
while every write failed, and the storage error's advice sent the operator to `db check` (QA round
62). Alembic's autogenerate comparison against ``tracker.schema.metadata`` (what
tests/test_migrations.py proves `upgrade head` builds) names the differences.

Not reported: tables the tracker does not have, and plain indexes an operator added (for analytics:
they harm no write). Reported: anything of the tracker's missing or changed, a partial index's
condition included (Alembic does not compare those: `uq_tracker_nodes_local` without its `WHERE
is_local` allows one remote node, QA round 65), and what an operator added to its tables that can
refuse its writes: columns, UNIQUE and CHECK constraints, unique indexes. Not compared: a view's
definition (only that it exists) and SQLite's WITHOUT ROWID (tests/test_migrations.py checks both
kinds of drift in the migrations themselves).
"""

from __future__ import annotations

import warnings
from typing import Any

from sqlalchemy import inspect
from sqlalchemy.engine import Connection, Dialect, Inspector
from sqlalchemy.exc import SAWarning
from sqlalchemy.ext.asyncio import AsyncEngine

from .schema import metadata

#: The analytics views (migration 0004 and later; docs/analytics.md), which the models do not hold.
VIEWS = ("peer_scores", "content_replication", "under_replicated_content")


async def schema_drift(engine: AsyncEngine) -> list[str]:
    """One line per difference between the database's schema and the tracker's; empty when none."""
    async with engine.connect() as conn:
        return await conn.run_sync(_drift)


def _drift(sync_conn: Connection) -> list[str]:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    options = {"compare_type": True, "compare_server_default": True}
    context = MigrationContext.configure(sync_conn, opts=options)
    with warnings.catch_warnings():
        # SQLAlchemy warns about reflected dialect options it cannot check (an operator's unique
        # index on Postgres): one line on the command's stderr, about nothing it reports.
        warnings.simplefilter("ignore", SAWarning)
        diffs = compare_metadata(context, metadata)
    lines = [line for diff in diffs for line in _described(diff)]
    inspector = inspect(sync_conn)
    existing = set(inspector.get_table_names())
    lines += _conditions(inspector, sync_conn.dialect, existing)
    lines += [
        f"check constraint {check['name'] or '(unnamed)'} on {table} is not the tracker's"
        for table in metadata.tables
        if table in existing
        for check in inspector.get_check_constraints(table)
    ]
    views = set(inspector.get_view_names())
    lines += [f"view {name} is missing" for name in VIEWS if name not in views]
    return lines


def _conditions(inspector: Inspector, dialect: Dialect, existing: set[str]) -> list[str]:
    """The tracker's partial indexes whose WHERE differs from the models' (``existing``: the tables)."""
    lines = []
    for table in metadata.tables.values():
        if table.name not in existing:
            continue
        found = {ix["name"]: ix for ix in inspector.get_indexes(table.name)}
        for index in table.indexes:
            where = index.dialect_options[dialect.name].get("where")
            if where is None or index.name not in found:
                continue
            wanted = condition_text(
                where.compile(dialect=dialect, compile_kwargs={"literal_binds": True}), table.name
            )
            reflected = found[index.name].get("dialect_options", {}).get(f"{dialect.name}_where")
            has = condition_text(reflected, table.name) if reflected is not None else "none"
            if has != wanted:
                lines.append(f"index {index.name} on {table.name}: condition {has}, the tracker's {wanted}")
    return lines


def condition_text(where: object, table: str) -> str:
    """An index's WHERE as comparable text: lower case, no parentheses, no table prefix (each engine
    reflects it in its own spelling)."""
    text = str(where).lower().replace(f"{table}.", "").replace("(", " ").replace(")", " ")
    return " ".join(text.split())


def _described(diff: Any) -> list[str]:
    """A line for one of Alembic's differences ("add" is what the models have and the database lacks)."""
    if isinstance(diff, list):  # a column's modifications, each a tuple
        return [line for change in diff for line in _described(change)]
    kind = diff[0]
    if kind == "add_table":
        return [f"table {diff[1].name} is missing"]
    if kind == "add_column":
        return [f"column {diff[2]}.{diff[3].name} is missing"]
    if kind == "remove_column":
        return [f"column {diff[2]}.{diff[3].name} is not the tracker's"]
    if kind in ("add_index", "add_constraint", "add_fk"):
        return [f"{_what(diff[1])} {diff[1].name} on {diff[1].table.name} is missing"]
    if kind in ("remove_constraint", "remove_fk"):
        return [f"{_what(diff[1])} {diff[1].name} on {diff[1].table.name} is not the tracker's"]
    if kind in ("modify_type", "modify_nullable", "modify_default", "modify_comment"):
        _, _, table, column, _, found, wanted = diff
        what = kind.removeprefix("modify_")
        return [f"column {table}.{column}: {what} {_shown(found)}, the tracker's {_shown(wanted)}"]
    if kind == "remove_index" and diff[1].unique:
        return [f"unique index {diff[1].name} on {diff[1].table.name} is not the tracker's"]
    if kind in ("remove_table", "remove_index"):
        return []  # an operator's own table or plain index: no harm to the tracker's writes
    return [f"{kind}: {diff[1:]!r}"]


def _shown(value: Any) -> str:
    """A type, nullability or default as SQL would write it (a server default is a clause)."""
    if value is None:
        return "none"
    arg = getattr(value, "arg", value)  # a DefaultClause holds its expression
    return str(getattr(arg, "text", arg))


def _what(item: Any) -> str:
    name = type(item).__name__
    return {
        "Index": "index",
        "UniqueConstraint": "unique constraint",
        "ForeignKeyConstraint": "foreign key",
    }.get(name, "constraint")

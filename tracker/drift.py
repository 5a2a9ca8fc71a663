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
refuse its writes: columns, UNIQUE and CHECK constraints, unique indexes; and an analytics view
whose definition is not the newest migration's (a replaced `peer_scores` passed, and operators'
analytics read it: QA round 65). Not compared: SQLite's WITHOUT ROWID (tests/test_migrations.py
checks it in the migrations themselves).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Dialect, Inspector
from sqlalchemy.exc import DBAPIError, SAWarning
from sqlalchemy.ext.asyncio import AsyncEngine

from .schema import metadata

log = logging.getLogger(__name__)

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
    lines += _collations(sync_conn, existing)
    views = set(inspector.get_view_names())
    lines += [f"view {name} is missing" for name in VIEWS if name not in views]
    lines += [
        f"view {name}: not the definition the migrations make" for name in _changed_views(sync_conn, views)
    ]
    return lines


def _collations(conn: Connection, existing: set[str]) -> list[str]:
    """The key columns whose collation is not the models' ``"C"`` (Postgres): Alembic compares no
    collation it reflects as the database's default, and a column put back in it (by hand, or a
    revision stamped rather than run) passed the check while ids sorted as before 0012 and 0018 (QA
    round 77)."""
    if conn.dialect.name != "postgresql":
        return []
    lines = []
    for table in metadata.tables.values():
        if table.name not in existing:
            continue
        for column in table.columns:
            wanted = getattr(column.type.dialect_impl(conn.dialect), "collation", None)
            if wanted is None:
                continue
            found = conn.execute(
                text(
                    "SELECT collation_name FROM information_schema.columns WHERE table_schema = "
                    "current_schema() AND table_name = :table AND column_name = :column"
                ),
                {"table": table.name, "column": column.name},
            ).scalar()
            if found != wanted:
                lines.append(
                    f"column {table.name}.{column.name} is in collation {found or 'the database default'}, "
                    f'not "{wanted}": its ids sort by the database\'s rules, not by code point'
                )
    return lines


def _changed_views(conn: Connection, present: set[str]) -> list[str]:
    """The analytics views in ``present`` whose definition differs from the newest migration's.

    Each engine is asked to compare in its own terms: SQLite keeps a view's statement as it was
    written, so the texts are compared with whitespace and case folded; Postgres keeps a parsed
    definition, so the migration's statement is made into a temporary view and the two are printed
    back by ``pg_get_viewdef`` (inside a savepoint, undone at once: nothing stays)."""
    wanted = {name: sql for name, sql in _view_statements(conn.dialect.name) if name in present}
    if conn.dialect.name != "postgresql":
        rows = conn.execute(text("SELECT name, sql FROM sqlite_master WHERE type = 'view'")).all()
        found = {name: sql for name, sql in rows}
        return sorted(name for name, sql in wanted.items() if _folded(found[name]) != _folded(sql))
    changed = []
    savepoint = conn.begin_nested()
    try:
        for name, sql in wanted.items():
            conn.execute(text(sql.replace(f"CREATE VIEW {name} AS", f"CREATE TEMP VIEW {_TEMP}{name} AS", 1)))
            made, live = conn.execute(
                text(
                    "SELECT pg_get_viewdef(CAST(:made AS regclass)), pg_get_viewdef(CAST(:live AS regclass))"
                ),
                {"made": f"{_TEMP}{name}", "live": name},
            ).one()
            if made != live:
                changed.append(name)
    except DBAPIError as error:
        # A role without the TEMPORARY privilege: the rest of the check still says what it can.
        log.warning("the analytics views' definitions were not compared: %s", str(error.orig).strip())
        return []
    finally:
        savepoint.rollback()
    return sorted(changed)


#: The prefix of the temporary views ``_changed_views`` makes on Postgres.
_TEMP = "tracker_drift_"


def _view_statements(dialect: str) -> list[tuple[str, str]]:
    """(name, CREATE VIEW statement) of the views as the newest migration that makes them makes them.

    The migrations are the schema's only source (views are not in the models): the newest revision
    whose module has ``view_sql`` holds the statements head has."""
    from alembic.script import ScriptDirectory

    from .migrations import alembic_config

    for script in ScriptDirectory.from_config(alembic_config()).walk_revisions():
        make = getattr(script.module, "view_sql", None)
        if make is not None:
            statements: list[str] = make(dialect)
            return [(_view_name(sql), sql) for sql in statements]
    return []


def _view_name(statement: str) -> str:
    words = statement.split()
    assert words[:2] == ["CREATE", "VIEW"] and words[3] == "AS", statement[:60]
    return words[2]


def _folded(sql: str) -> str:
    return " ".join(sql.lower().split())


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

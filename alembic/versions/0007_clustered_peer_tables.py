"""SQLite: ``peer_stats`` and ``content_peers`` become WITHOUT ROWID tables, clustered on their keys.

Both are read and written by their composite primary key: a selection walks a content's holders by
(content_id, peer_id) and probes each holder's (peer_id, node_id) stats; every event upserts by those
keys. As rowid tables each of those steps searched the key's index and then the table; clustered on
the key it is one search, and a content's holders sit together on disk. Measured on the 100k-peer
benchmark swarm: the ranking statement ~18% faster (docs/benchmarks.md). Postgres: no change.

The columns, constraints and indexes are rebuilt from SQLite's own schema text, so they stay exactly
what earlier migrations made. The views that read these tables stay in place: the rename runs with
``legacy_alter_table`` so SQLite does not re-check them while their table is briefly missing.

Gossip stamping addressed rows by rowid on SQLite; it now uses the primary key
(tracker/queries/gossip/stamp.py).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import context, op, util
from sqlalchemy import text

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("peer_stats", "content_peers")
SUFFIX = " WITHOUT ROWID"


def _rebuild(table: str, clustered: bool) -> None:
    """Recreate ``table`` with its own DDL, WITHOUT ROWID or not, keeping rows and indexes."""
    if context.is_offline_mode():
        # Offline (``alembic ... --sql``) there is no database to read: alembic failed with
        # "'NoneType' object has no attribute ..." and a traceback.
        raise util.CommandError(
            "revision 0007 rebuilds its tables from the schema the database holds on SQLite, so it cannot be "
            "rendered as SQL (--sql): run it on the database (tracker db upgrade), or render only "
            "the revisions after it (0007:head)"
        )
    bind = op.get_bind()
    ddl = bind.execute(
        text("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = :t"), {"t": table}
    ).scalar_one()
    indexes = (
        bind.execute(
            text("SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = :t AND sql IS NOT NULL"),
            {"t": table},
        )
        .scalars()
        .all()
    )
    columns = ", ".join(row[1] for row in bind.execute(text(f"PRAGMA table_info({table})")).all())
    body = ddl.rstrip().removesuffix(SUFFIX).rstrip()
    head, rest = body.split("(", 1)
    assert head.split()[-1].strip('"') == table, ddl
    new = f"{table}_rebuild"
    op.execute(f"CREATE TABLE {new} ({rest}{SUFFIX if clustered else ''}")
    op.execute(f"INSERT INTO {new} ({columns}) SELECT {columns} FROM {table}")
    op.execute(f"DROP TABLE {table}")
    op.execute("PRAGMA legacy_alter_table = ON")
    op.execute(f"ALTER TABLE {new} RENAME TO {table}")
    op.execute("PRAGMA legacy_alter_table = OFF")
    for index in indexes:
        op.execute(index)


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for table in TABLES:
        _rebuild(table, clustered=True)


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for table in TABLES:
        _rebuild(table, clustered=False)

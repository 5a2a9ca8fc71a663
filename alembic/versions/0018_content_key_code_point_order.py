"""Postgres: ``contents.content_key`` compares by code point (``COLLATE "C"``), as ``peer_key`` has
since 0012 and as SQLite compares every string.

The tracker compares content keys only for equality, but the analytics views and docs/analytics.md's
queries sort by them: on a database whose collation is not C (ICU ``en-US``) ``content_replication``
ordered ``a, b, B, Z`` on Postgres and ``B, Z, a, b`` on SQLite (QA round 76). The views read the
column, so they are dropped and made again around the change, as 0012 did. Nothing to do on SQLite.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-08
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from alembic import op

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _migration_0009() -> ModuleType:
    path = Path(__file__).with_name("0009_views_statement_time.py")
    spec = importlib.util.spec_from_file_location("tracker_migration_0009", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _collate(collation: str) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    views = _migration_0009()
    for view in views.VIEWS:
        op.execute(f"DROP VIEW {view}")
    op.execute(f"ALTER TABLE contents ALTER COLUMN content_key TYPE varchar(256) COLLATE {collation}")
    for statement in views.view_sql("postgresql"):
        op.execute(statement)


def upgrade() -> None:
    _collate('"C"')


def downgrade() -> None:
    _collate('"default"')

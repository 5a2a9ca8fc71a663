"""Postgres: ``peers.peer_key`` compares by code point (``COLLATE "C"``), as SQLite's does.

Listings page in peer-id order (``list_peers``, ``/v1/peers``, ``get_available_peers``), and on a
database whose collation is not C (``en_US.UTF-8``, ICU) that order was the collation's: ``a``
before ``B`` on Postgres, after it on SQLite (QA round 8). Ordering by ``peer_key COLLATE "C"``
instead made every page sort all the peers (the unique index is in the column's collation); a
column in C keeps one index for lookups, keyset pages and prefixes alike. Equality is unchanged.
The analytics views read the column, so they are dropped and made again around the change, as
0009 made them. Nothing to do on SQLite, which compares strings by code point already.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-05
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
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
    op.execute(f"ALTER TABLE peers ALTER COLUMN peer_key TYPE varchar(256) COLLATE {collation}")
    for statement in views.view_sql("postgresql"):
        op.execute(statement)


def upgrade() -> None:
    _collate('"C"')


def downgrade() -> None:
    _collate('"default"')

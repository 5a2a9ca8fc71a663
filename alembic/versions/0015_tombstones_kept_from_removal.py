"""``content_peers.removed_at``: when this tracker took a removal, which its tombstone is kept from.

Tombstones were pruned ``tombstone_keep_s`` after their date (``changed_at``), but a removal can be
made, or reach a tracker, long after the date it carries: a late event, a departed peer's removal
(dated at its last sighting so that the peer's announcements after it win, QA round 30), a tracker
back from a partition. Pruned by that date, such a removal could be gone before a snapshot taken
before it was made came in, and the snapshot's announcement then brought the mapping back for good
(QA round 32). Kept from when this tracker took it, it outlives anything a snapshot or a neighbour
could still send that predates it.

Existing tombstones keep their old schedule (``removed_at = changed_at``); the partial index the
sweeper prunes by moves to the new column.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_NOT_AVAILABLE = sa.text("NOT available")


def upgrade() -> None:
    op.add_column("content_peers", sa.Column("removed_at", sa.Double(), nullable=True))
    op.execute("UPDATE content_peers SET removed_at = changed_at WHERE NOT available")
    _index_tombstones_by("removed_at")


def downgrade() -> None:
    _index_tombstones_by("changed_at")
    op.drop_column("content_peers", "removed_at")


def _index_tombstones_by(column: str) -> None:
    """The sweeper's partial index over the tombstones, on ``column`` instead."""
    op.drop_index("ix_content_peers_tombstones", table_name="content_peers")
    op.create_index(
        "ix_content_peers_tombstones",
        "content_peers",
        [column],
        sqlite_where=_NOT_AVAILABLE,
        postgresql_where=_NOT_AVAILABLE,
    )

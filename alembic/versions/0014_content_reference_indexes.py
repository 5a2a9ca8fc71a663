"""Indexes on the columns that refer to a content without one: outcomes and leases by content.

Deleting a content (the sweeper forgets those nothing refers to any more) sets its outcomes'
``content_id`` to NULL and deletes its leases through their foreign keys, and without an index
each deleted content scanned ``upload_outcomes`` whole, a week of them, inside the slice's write
transaction: 16 s for 2,000 contents beside 80,000 outcomes on SQLite, every heartbeat waiting
(QA round 27). The outcomes' index is partial: most outcomes name no content.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_upload_outcomes_content",
        "upload_outcomes",
        ["content_id"],
        sqlite_where=sa.text("content_id IS NOT NULL"),
        postgresql_where=sa.text("content_id IS NOT NULL"),
    )
    op.create_index("ix_peer_leases_content", "peer_leases", ["content_id"])


def downgrade() -> None:
    op.drop_index("ix_peer_leases_content", table_name="peer_leases")
    op.drop_index("ix_upload_outcomes_content", table_name="upload_outcomes")

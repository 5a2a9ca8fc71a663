"""Indexes the sweeper's retention deletes walk: outcomes by time, tombstones by age.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_upload_outcomes_at", "upload_outcomes", ["at"])
    op.create_index(
        "ix_content_peers_tombstones",
        "content_peers",
        ["changed_at"],
        sqlite_where=sa.text("NOT available"),
        postgresql_where=sa.text("NOT available"),
    )


def downgrade() -> None:
    op.drop_index("ix_content_peers_tombstones", table_name="content_peers")
    op.drop_index("ix_upload_outcomes_at", table_name="upload_outcomes")

"""Leases: the per-peer index also carries ``closed_at`` and ``id``, so a load probe reads no rows.

Selection counts each candidate's open leases (``closed_at IS NULL``) and takes its latest lease id
among the unexpired ones; with only (peer_id, expires_at) in the index every unexpired lease was
fetched from the table, and a busy peer keeps its closed leases until they expire. Same name, so
nothing that refers to it changes.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_peer_leases_peer_expires", table_name="peer_leases")
    op.create_index(
        "ix_peer_leases_peer_expires", "peer_leases", ["peer_id", "expires_at", "closed_at", "id"]
    )


def downgrade() -> None:
    op.drop_index("ix_peer_leases_peer_expires", table_name="peer_leases")
    op.create_index("ix_peer_leases_peer_expires", "peer_leases", ["peer_id", "expires_at"])

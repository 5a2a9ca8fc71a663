"""Leases: every peer handed out by selection holds one until an outcome closes it or it expires.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "peer_leases",
        sa.Column("id", Id, primary_key=True),
        sa.Column("peer_id", Id, nullable=False),
        sa.Column("content_id", Id, nullable=True),
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("leased_at", sa.Double(), nullable=False),
        sa.Column("expires_at", sa.Double(), nullable=False),
        sa.Column("closed_at", sa.Double(), nullable=True),
        sa.ForeignKeyConstraint(
            ["peer_id"], ["peers.id"], name=op.f("fk_peer_leases_peer_id_peers"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["content_id"],
            ["contents.id"],
            name=op.f("fk_peer_leases_content_id_contents"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["node_id"],
            ["tracker_nodes.id"],
            name=op.f("fk_peer_leases_node_id_tracker_nodes"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_peer_leases")),
        comment="Assignments handed out by selection; a peer's load is its open, unexpired leases.",
    )
    op.create_index("ix_peer_leases_peer_expires", "peer_leases", ["peer_id", "expires_at"])
    op.create_index("ix_peer_leases_expires", "peer_leases", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_peer_leases_expires", table_name="peer_leases")
    op.drop_index("ix_peer_leases_peer_expires", table_name="peer_leases")
    op.drop_table("peer_leases")

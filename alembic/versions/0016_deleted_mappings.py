"""``deleted_mappings``: other origins' mappings the sweeper deleted without a removal, per peer.

Every such deletion asked the mapping's origin for its rows again at once (lowering this node's clock
of it), so that a live mapping deleted while this tracker was cut off from its origin came back (QA
round 30). Two sweeping trackers holding the never-removed mapping of an origin gone for good then
sent it back to each other about hourly for as long as they ran, with that origin's rows since its
version, and its peer and content were never forgotten (QA round 34). The deletion judged the peer
departed; the origin is now asked once the peer is seen again (``tracker/queries/asks.py``), which
needs the deletion remembered until then: this table. Local to this database, never gossiped.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "deleted_mappings",
        sa.Column("content_id", Id, nullable=False),
        sa.Column("peer_id", Id, nullable=False),
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("unseen_since", sa.Double(), nullable=False),
        sa.Column("deleted_at", sa.Double(), nullable=False),
        sa.Column("asked_at", sa.Double(), nullable=True),
        sa.Column("asks", sa.Integer(), nullable=False),
        sa.Column("ask_after", sa.Double(), nullable=True),
        sa.ForeignKeyConstraint(
            ["content_id"],
            ["contents.id"],
            name=op.f("fk_deleted_mappings_content_id_contents"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["peer_id"], ["peers.id"], name=op.f("fk_deleted_mappings_peer_id_peers"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["node_id"],
            ["tracker_nodes.id"],
            name=op.f("fk_deleted_mappings_node_id_tracker_nodes"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("content_id", "peer_id", name=op.f("pk_deleted_mappings")),
        comment="Other origins' mappings the sweeper deleted as departed without a removal; their "
        "origin is asked for its rows again once the peer is seen again, until the row is back. "
        "Local, never gossiped.",
        sqlite_with_rowid=False,
    )
    op.create_index("ix_deleted_mappings_peer", "deleted_mappings", ["peer_id"])
    op.create_index("ix_deleted_mappings_deleted_at", "deleted_mappings", ["deleted_at"])


def downgrade() -> None:
    op.drop_index("ix_deleted_mappings_deleted_at", table_name="deleted_mappings")
    op.drop_index("ix_deleted_mappings_peer", table_name="deleted_mappings")
    op.drop_table("deleted_mappings")

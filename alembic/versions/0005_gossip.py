"""Gossip: per-origin versions for deltas, each origin's clock, and the nonces that stop replays.

``version`` is null on a row this node changed since its last stamp ("dirty"); the stamper gives dirty
rows the local node's next versions before every exchange. Rows learned from other origins keep their
origin's version. ``tracker_nodes.clock`` is the highest version this database holds completely for
that origin (for the local node: the last version stamped). See docs/gossip.md.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ADD COLUMN on both engines: no table rebuild, so the analytics views stay valid.
    op.add_column("peer_stats", sa.Column("version", sa.BigInteger(), nullable=True))
    op.add_column("content_peers", sa.Column("version", sa.BigInteger(), nullable=True))
    op.add_column(
        "tracker_nodes", sa.Column("clock", sa.BigInteger(), nullable=False, server_default=sa.text("0"))
    )
    op.create_index("ix_peer_stats_node_version", "peer_stats", ["node_id", "version"])
    op.create_index("ix_content_peers_node_version", "content_peers", ["node_id", "version"])
    op.create_table(
        "gossip_nonces",
        sa.Column("nonce", sa.String(64), nullable=False),
        sa.Column("node_key", sa.String(64), nullable=False),
        sa.Column("expires_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("nonce", name=op.f("pk_gossip_nonces")),
        comment="Nonces of accepted gossip messages, kept until their message would be too old anyway.",
    )
    op.create_index("ix_gossip_nonces_expires", "gossip_nonces", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_gossip_nonces_expires", table_name="gossip_nonces")
    op.drop_table("gossip_nonces")
    op.drop_index("ix_content_peers_node_version", table_name="content_peers")
    op.drop_index("ix_peer_stats_node_version", table_name="peer_stats")
    # ALTER TABLE ... DROP COLUMN on both engines (SQLite >= 3.35): a batch rebuild would break the views.
    for table, column in (
        ("tracker_nodes", "clock"),
        ("content_peers", "version"),
        ("peer_stats", "version"),
    ):
        op.execute(f"ALTER TABLE {table} DROP COLUMN {column}")

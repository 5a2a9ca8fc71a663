"""Initial schema: nodes, peers, contents, per-origin peer stats, samples, outcomes, content mappings.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the types in tracker/schema.py at this revision; a migration never imports the models.
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Key = sa.String(256)


def upgrade() -> None:
    op.create_table(
        "tracker_nodes",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("node_key", sa.String(64), nullable=False),
        sa.Column("is_local", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tracker_nodes")),
        sa.UniqueConstraint("node_key", name=op.f("uq_tracker_nodes_node_key")),
        comment="Origin trackers whose observations this database holds; exactly one is local.",
    )
    op.create_index(
        "uq_tracker_nodes_local",
        "tracker_nodes",
        ["is_local"],
        unique=True,
        sqlite_where=sa.text("is_local"),
        postgresql_where=sa.text("is_local"),
    )
    op.create_table(
        "peers",
        sa.Column("id", Id, primary_key=True),
        sa.Column("peer_key", Key, nullable=False),
        sa.Column("first_seen", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_peers")),
        sa.UniqueConstraint("peer_key", name=op.f("uq_peers_peer_key")),
        comment="Every peer ever seen, by its external id.",
    )
    op.create_table(
        "contents",
        sa.Column("id", Id, primary_key=True),
        sa.Column("content_key", Key, nullable=False),
        sa.Column("first_seen", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_contents")),
        sa.UniqueConstraint("content_key", name=op.f("uq_contents_content_key")),
        comment="Every content id ever announced.",
    )
    op.create_table(
        "peer_stats",
        sa.Column("peer_id", Id, nullable=False),
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("online", sa.Boolean(), nullable=False),
        sa.Column("online_since", sa.Double(), nullable=True),
        sa.Column("last_seen", sa.Double(), nullable=False),
        sa.Column("uptime_s", sa.Double(), nullable=False),
        sa.Column("served_count", sa.BigInteger(), nullable=False),
        sa.Column("failed_count", sa.BigInteger(), nullable=False),
        sa.Column("success_weight", sa.Double(), nullable=False),
        sa.Column("failure_weight", sa.Double(), nullable=False),
        sa.Column("evidence_at", sa.Double(), nullable=True),
        sa.Column("speed_bps", sa.Double(), nullable=True),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(
            ["peer_id"], ["peers.id"], name=op.f("fk_peer_stats_peer_id_peers"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["node_id"],
            ["tracker_nodes.id"],
            name=op.f("fk_peer_stats_node_id_tracker_nodes"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("peer_id", "node_id", name=op.f("pk_peer_stats")),
        comment="One origin's view of one peer: presence, exact lifetime counters, decayed evidence, speed.",
    )
    op.create_table(
        "bandwidth_samples",
        sa.Column("id", Id, primary_key=True),
        sa.Column("peer_id", Id, nullable=False),
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("at", sa.Double(), nullable=False),
        sa.Column("bytes_per_sec", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["peer_id"], ["peers.id"], name=op.f("fk_bandwidth_samples_peer_id_peers"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["node_id"],
            ["tracker_nodes.id"],
            name=op.f("fk_bandwidth_samples_node_id_tracker_nodes"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bandwidth_samples")),
        comment="Download speed samples; a peer's speed is the mean of its latest bandwidth_window.",
    )
    op.create_index(
        "ix_bandwidth_samples_peer_latest", "bandwidth_samples", ["peer_id", "node_id", "at", "id"]
    )
    op.create_table(
        "upload_outcomes",
        sa.Column("id", Id, primary_key=True),
        sa.Column("peer_id", Id, nullable=False),
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("at", sa.Double(), nullable=False),
        sa.Column("success", sa.Boolean(), nullable=False),
        sa.Column("content_id", Id, nullable=True),
        sa.Column("bytes", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(
            ["peer_id"], ["peers.id"], name=op.f("fk_upload_outcomes_peer_id_peers"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["node_id"],
            ["tracker_nodes.id"],
            name=op.f("fk_upload_outcomes_node_id_tracker_nodes"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["content_id"],
            ["contents.id"],
            name=op.f("fk_upload_outcomes_content_id_contents"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_upload_outcomes")),
        comment="Raw upload outcomes, the events behind peer_stats counters and weights.",
    )
    op.create_index("ix_upload_outcomes_peer_at", "upload_outcomes", ["peer_id", "at"])
    op.create_table(
        "content_peers",
        sa.Column("content_id", Id, nullable=False),
        sa.Column("peer_id", Id, nullable=False),
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("available", sa.Boolean(), nullable=False),
        sa.Column("since", sa.Double(), nullable=False),
        sa.Column("last_confirmed", sa.Double(), nullable=False),
        sa.Column("changed_at", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(
            ["content_id"],
            ["contents.id"],
            name=op.f("fk_content_peers_content_id_contents"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["peer_id"], ["peers.id"], name=op.f("fk_content_peers_peer_id_peers"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["node_id"],
            ["tracker_nodes.id"],
            name=op.f("fk_content_peers_node_id_tracker_nodes"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("content_id", "peer_id", name=op.f("pk_content_peers")),
        comment="Who holds what. available=false rows are tombstones that stop stale announcements.",
    )
    op.create_index("ix_content_peers_peer", "content_peers", ["peer_id", "content_id"])


def downgrade() -> None:
    op.drop_index("ix_content_peers_peer", table_name="content_peers")
    op.drop_table("content_peers")
    op.drop_index("ix_upload_outcomes_peer_at", table_name="upload_outcomes")
    op.drop_table("upload_outcomes")
    op.drop_index("ix_bandwidth_samples_peer_latest", table_name="bandwidth_samples")
    op.drop_table("bandwidth_samples")
    op.drop_table("peer_stats")
    op.drop_table("contents")
    op.drop_table("peers")
    op.drop_index("uq_tracker_nodes_local", table_name="tracker_nodes")
    op.drop_table("tracker_nodes")

"""``peer_stats.samples_version`` and ``tracker_nodes.samples_clock``: which samples a neighbour holds.

Gossip sent every changed peer row with its origin's latest samples, so a heartbeat (which changes
the row, not its samples) cost the receiver a delete, ten inserts and a speed refresh per peer; at
100,000 peers a round did not fit in a round (docs/gossip.md). With this column a row carries its
samples only to a neighbour that may lack them: past that neighbour's samples clock of its origin.

Existing rows take their own version (their samples are at least that old); every samples clock
starts at 0, so the first deltas after the upgrade carry all samples, as before.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("peer_stats", sa.Column("samples_version", sa.BigInteger(), nullable=True))
    op.execute("UPDATE peer_stats SET samples_version = version")
    op.add_column(
        "tracker_nodes",
        sa.Column("samples_clock", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
    )


def downgrade() -> None:
    # Plain DROP COLUMN (SQLite 3.35+): a batch rebuild would lose the table's WITHOUT ROWID.
    op.execute("ALTER TABLE peer_stats DROP COLUMN samples_version")
    op.execute("ALTER TABLE tracker_nodes DROP COLUMN samples_clock")

"""``peer_stats.samples_version``: the version at which a row's bandwidth samples last changed.

Gossip sent every changed peer row with its origin's latest samples, so a heartbeat (which changes
the row, not its samples) cost the receiver a delete, ten inserts and a speed refresh per peer; at
100,000 peers a round did not fit in a round (docs/gossip.md). With this column a row carries its
samples only to a neighbour that may lack them.

Existing rows take their own version: their samples are at least that old, and a neighbour that holds
an older copy is found out by the merge (its stored samples version differs) and asks again.

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


def downgrade() -> None:
    # Plain DROP COLUMN (SQLite 3.35+): a batch rebuild would lose the table's WITHOUT ROWID.
    op.execute("ALTER TABLE peer_stats DROP COLUMN samples_version")

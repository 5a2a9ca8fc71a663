"""``tracker_nodes.owed_from`` and ``asked_upto``: asks for an origin's rows kept as a debt.

The sweeper, deleting mappings of an origin that never removed them, lowered this node's clock of
that origin at every deletion, so that gossip sent its rows again. Two sweeping trackers holding
the never-removed mapping of an origin gone for good asked each other, and each sent it back to
the other, every hour for good (QA round 34). An ask is now owed (``owed_from``: the lowest version
deleted) and paid when something of the origin came since the last one (``asked_upto``: the clock
then); see ``tracker/queries/asks.py``.

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


def upgrade() -> None:
    op.add_column("tracker_nodes", sa.Column("owed_from", sa.BigInteger(), nullable=True))
    op.add_column("tracker_nodes", sa.Column("asked_upto", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    op.drop_column("tracker_nodes", "asked_upto")
    op.drop_column("tracker_nodes", "owed_from")

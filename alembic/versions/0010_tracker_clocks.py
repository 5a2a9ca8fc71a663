"""``tracker_clocks``: the tracker's clock against elapsed time, kept per host boot.

A tracker tells its wall clock leaping ahead from time passing by comparing it with an elapsed-time
clock (tracker/clockleap.py), but a process only knew its own readings: a clock set a day ahead
while no tracker ran went unseen, and the first sweep of the next process (or one `tracker sweep`)
timed out every peer and deleted all their mappings. Elapsed time (``CLOCK_BOOTTIME``) keeps counting
across processes within one boot, so each tracker now stores its latest reading in step, keyed by
the kernel's boot id, and a process started later in the same boot resumes from it.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "tracker_clocks",
        sa.Column("boot_id", sa.String(64), nullable=False),
        sa.Column("wall", sa.Double(), nullable=False),
        sa.Column("elapsed", sa.Double(), nullable=False),
        sa.Column("held_since", sa.Double(), nullable=True),
        sa.Column("lag_s", sa.Double(), nullable=False),
        sa.Column("lag_until", sa.Double(), nullable=False),
        sa.Column("saved_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("boot_id", name="pk_tracker_clocks"),
        comment="Per host boot: the tracker's clock against elapsed time, so a process started later "
        "notices a clock that leapt while none ran (tracker/clockleap.py).",
    )


def downgrade() -> None:
    op.drop_table("tracker_clocks")

"""``peer_stats.own_seen`` and ``report_seen``: the peer's own events are ordered by its own latest time.

``last_seen`` is moved by the peer's own events and by downloaders' reports about it (a success, a
speed sample), which are dated at their receipt. A goodbye, dated by the peer's clock, lost to a
report taken before it but dated after it (requests crossing, a relay's batch), and the departed
peer stayed online and selected until ``peer_timeout`` (QA round 52). Ordered by the peer's own
latest time, the goodbye wins; reports still order among sightings by ``last_seen``.

``report_seen`` is the latest time of a report that counted as a sighting: ``own_seen`` orders the
peer's own events only while ``last_seen`` equals it. A process of the release before this one,
running beside it during the upgrade, moves ``last_seen`` alone; its write is then the peer's latest
own event, and the order is the one before this revision (QA round 55).

Existing rows keep null in both, which the write path reads as the order before this revision;
other origins' rows keep null for good (only the origin's events order them). Adding nullable
columns without a default rewrites nothing on either engine.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("peer_stats", sa.Column("own_seen", sa.Double(), nullable=True))
    op.add_column("peer_stats", sa.Column("report_seen", sa.Double(), nullable=True))


def downgrade() -> None:
    op.drop_column("peer_stats", "report_seen")
    op.drop_column("peer_stats", "own_seen")

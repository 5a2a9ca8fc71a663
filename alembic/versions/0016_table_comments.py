"""The table comments of ``peers``, ``contents`` and ``tracker_settings`` say what the tables hold now.

``\\dt+`` (docs/schema.md points operators to it) said "every peer ever seen" and "every content id
ever announced", though the sweeper forgets both since 2026-12-06 and contents come from upload
reports too; ``tracker_settings`` left out ``reliable_threshold`` and ``min_reputation`` (QA round
51). Comments only: PostgreSQL keeps them, SQLite has none.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: table: (this revision's comment, the one before)
_COMMENTS = {
    "peers": (
        "Peers seen or reported, by their external id, until the sweeper forgets them.",
        "Every peer ever seen, by its external id.",
    ),
    "contents": (
        "Content ids announced or named by upload reports, until the sweeper forgets them.",
        "Every content id ever announced.",
    ),
    "tracker_settings": (
        "Settings the analytics views read (peer_timeout_s, reputation.*, reliable_threshold, "
        "min_reputation, replication_target).",
        "Settings the analytics views read (peer_timeout_s, reputation.*, replication_target).",
    ),
}


def _comment(which: int) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, comments in _COMMENTS.items():
        op.create_table_comment(table, comments[which], existing_comment=comments[1 - which])


def upgrade() -> None:
    _comment(0)


def downgrade() -> None:
    _comment(1)

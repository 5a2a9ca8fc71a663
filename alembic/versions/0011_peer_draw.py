"""``peers.draw``: a number from the peer's key, for the weighted selection's random draw.

The weighted strategy hashed the surrogate ``peers.id`` with the seed, and ids differ between
databases: Postgres spends a sequence value on every key upsert that finds its key (``INSERT ... ON
CONFLICT``), and gossiping trackers number peers in the order they hear of them. One seed drew
different peers on SQLite and on Postgres for the same events (QA round 7). ``draw`` is the first
24 bits of the key's MD5, the same wherever the key is.

Added with a default (SQLite adds such a column in place: a NOT NULL column without one would
rebuild ``peers``, whose children cascade), then filled: on Postgres in SQL, on SQLite from Python,
which has no MD5 of its own.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op, util

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BATCH = 10_000


def upgrade() -> None:
    op.add_column("peers", sa.Column("draw", sa.Integer(), nullable=False, server_default=sa.text("0")))
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        # Of the key's UTF-8 bytes, as the write path hashes them: md5(text) hashes the database's
        # encoding (every non-ASCII key of a LATIN1 database drew apart; QA round 15).
        utf8_md5 = "md5(convert_to(peer_key, 'UTF8'))"
        op.execute(f"UPDATE peers SET draw = ('x' || substr({utf8_md5}, 1, 6))::bit(24)::int")
        return
    if context.is_offline_mode():
        # Offline (``alembic ... --sql``) there is no database to read: alembic failed with
        # "'NoneType' object has no attribute ..." and a traceback.
        raise util.CommandError(
            "revision 0011 computes every peer's draw in Python on SQLite, so it cannot be "
            "rendered as SQL (--sql): run it on the database (tracker db upgrade), or render only "
            "the revisions after it (0011:head)"
        )
    last = 0
    while True:
        rows = bind.execute(
            sa.text("SELECT id, peer_key FROM peers WHERE id > :last ORDER BY id LIMIT :n"),
            {"last": last, "n": _BATCH},
        ).all()
        if not rows:
            return
        bind.execute(
            sa.text("UPDATE peers SET draw = :draw WHERE id = :id"),
            [{"id": pid, "draw": _draw(key)} for pid, key in rows],
        )
        last = rows[-1][0]


def _draw(key: str) -> int:
    """As ``tracker.queries.writes.draw_of`` at this revision (a migration keeps its own copy)."""
    return int(hashlib.md5(key.encode(), usedforsecurity=False).hexdigest()[:6], 16)


def downgrade() -> None:
    # In place on both engines (SQLite >= 3.35): a batch rebuild of peers would drop the table, and
    # with foreign keys on every peer_stats, sample, outcome and mapping row with it.
    op.execute("ALTER TABLE peers DROP COLUMN draw")

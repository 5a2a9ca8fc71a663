"""``peers.draw`` from 31 bits of the key's MD5 instead of 24.

The weighted selection's random number ``u`` is a hash of (``draw``, seed), so two peers with one
``draw`` get one ``u`` for every seed: the one that sorts second was never drawn ahead of its twin,
and with n=1 never drawn at all while both were candidates. With 24 bits a swarm of 5,000 peers
likely holds such a pair, one of 100,000 about 300 (QA round 12); with 31 bits, the most a signed
32-bit column holds without a change of type, one of 100,000 about 2, and two peers of one
content's 2,000 holders about once in a thousand contents.

Filled as 0011 filled it: on Postgres in SQL, on SQLite from Python, which has no MD5 of its own;
in place, never rebuilding ``peers``, whose children cascade.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-05
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import sqlalchemy as sa
from alembic import context, op, util

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BATCH = 10_000


def upgrade() -> None:
    _fill(
        "('x' || substr(md5(convert_to(peer_key, 'UTF8')), 1, 8))::bit(32)::bit(31)::int",
        lambda digest: int(digest[:8], 16) >> 1,
    )


def downgrade() -> None:
    _fill(
        "('x' || substr(md5(convert_to(peer_key, 'UTF8')), 1, 6))::bit(24)::int",
        lambda digest: int(digest[:6], 16),
    )


def _fill(postgres: str, python: Callable[[str], int]) -> None:
    """Every peer's ``draw`` from its key's MD5: ``postgres`` in SQL, ``python`` of the hex digest
    on SQLite (as ``tracker.queries.writes.draw_of`` at each revision; a migration keeps its own).

    Of the key's UTF-8 bytes, as the write path hashes them: ``md5(text)`` hashes the database's
    encoding, which gave every non-ASCII key of a LATIN1 database another draw (QA round 15)."""
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        op.execute(f"UPDATE peers SET draw = {postgres}")
        return
    if context.is_offline_mode():
        # Offline (``alembic ... --sql``) there is no database to read: alembic failed with
        # "'NoneType' object has no attribute ..." and a traceback.
        raise util.CommandError(
            "revision 0013 computes every peer's draw in Python on SQLite, so it cannot be "
            "rendered as SQL (--sql): run it on the database (tracker db upgrade), or render only "
            "the revisions after it (0013:head)"
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
            [{"id": pid, "draw": python(_md5(key))} for pid, key in rows],
        )
        last = rows[-1][0]


def _md5(key: str) -> str:
    return hashlib.md5(key.encode(), usedforsecurity=False).hexdigest()

"""Analytics views: "now" per statement on Postgres, uptime never negative, ``min_reputation`` setting.

- Postgres: the views took "now" from ``now()``, the start of the *transaction*. A client that keeps a
  transaction open (psycopg and most notebooks do by default) saw time stand still: peers never timed
  out and leases never expired in its answers, and a peer that came online after the transaction
  began had a negative ``uptime_s``. They now use ``statement_timestamp()``, one instant for the
  whole statement, as before, but a new one for each. SQLite's ``julianday('now')`` already is.
- An open session dated ahead of the database's clock (an event within the tracker's accepted skew
  put ``online_since`` in the future) counts 0 instead of a negative time: ``uptime_s`` went
  negative, or lost that much of the closed sessions' uptime, and ``uptime_factor`` with it. The
  tracker's ranking and ``uptime`` count it the same way.
- ``chunks_served`` and ``chunks_failed`` are bigints on Postgres too (a ``SUM`` of bigints is
  ``numeric`` there, which drivers hand back as decimals).
- ``tracker_settings`` gains ``min_reputation`` (the selection's floor for proven peers), so
  queries for "peers selection leaves out" need not hard-code 0.3. Trackers write it on open.

The views are 0004's SQL with those two edits, applied to 0004's frozen text.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

VIEWS = ("under_replicated_content", "content_replication", "peer_scores")  # dependents first
MIN_REPUTATION = 0.3  # TrackerConfig's default; the tracker overwrites it with its own on open
NOW_0004 = "CAST(EXTRACT(EPOCH FROM now()) AS DOUBLE PRECISION)"
NOW = "CAST(EXTRACT(EPOCH FROM statement_timestamp()) AS DOUBLE PRECISION)"
UPTIME_0004 = """        MAX(ps.uptime_s + CASE WHEN ps.online THEN
            (CASE WHEN ps.last_seen >= k.now - s.peer_timeout_s THEN k.now ELSE ps.last_seen END)
            - ps.online_since ELSE 0.0 END) AS uptime_s,
"""
UPTIME = """        MAX(ps.uptime_s + CASE
            WHEN NOT ps.online THEN 0.0
            WHEN ps.last_seen < k.now - s.peer_timeout_s THEN
                CASE WHEN ps.last_seen > ps.online_since THEN ps.last_seen - ps.online_since ELSE 0.0 END
            WHEN k.now > ps.online_since THEN k.now - ps.online_since
            ELSE 0.0 END) AS uptime_s,
"""
COUNTERS = {
    "SUM(ps.served_count) AS chunks_served": "CAST(SUM(ps.served_count) AS BIGINT) AS chunks_served",
    "SUM(ps.failed_count) AS chunks_failed": "CAST(SUM(ps.failed_count) AS BIGINT) AS chunks_failed",
}


def _migration_0004() -> ModuleType:
    path = Path(__file__).with_name("0004_analytics_views.py")
    spec = importlib.util.spec_from_file_location("tracker_migration_0004", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def view_sql(dialect: str) -> list[str]:
    """0009's CREATE VIEW statements for ``dialect``, in dependency order."""
    statements: list[str] = _migration_0004().view_sql(dialect)
    peer_scores = statements[0]
    assert peer_scores.count(UPTIME_0004) == 1, "0004's uptime changed"
    peer_scores = peer_scores.replace(UPTIME_0004, UPTIME)
    for old, new in COUNTERS.items():
        assert peer_scores.count(old) == 1, "0004's counters changed"
        peer_scores = peer_scores.replace(old, new)
    if dialect == "postgresql":
        assert NOW_0004 in peer_scores, "0004's clock changed"
        peer_scores = peer_scores.replace(NOW_0004, NOW)
    return [peer_scores, *statements[1:]]


def _recreate(statements: list[str]) -> None:
    for view in VIEWS:
        op.execute(f"DROP VIEW {view}")
    for statement in statements:
        op.execute(statement)


def upgrade() -> None:
    _recreate(view_sql(op.get_bind().dialect.name))
    op.execute(
        "INSERT INTO tracker_settings (name, value) SELECT 'min_reputation', "
        f"{MIN_REPUTATION} WHERE NOT EXISTS (SELECT 1 FROM tracker_settings WHERE name = 'min_reputation')"
    )


def downgrade() -> None:
    _recreate(_migration_0004().view_sql(op.get_bind().dialect.name))
    op.execute("DELETE FROM tracker_settings WHERE name = 'min_reputation'")

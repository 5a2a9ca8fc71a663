"""Analytics: the tracker_settings table and the peer_scores, content_replication and
under_replicated_content views (documented in docs/analytics.md).

The views compute reputation exactly as the tracker does (tests/test_analytics.py holds them to the
library's answers on both engines), with the constants read from tracker_settings, which every tracker
writes on open. The SQL is frozen here on purpose: a migration must not change when the code does.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The defaults of TrackerConfig and ReputationParams; the tracker overwrites them with its own on open.
DEFAULT_SETTINGS = {
    "peer_timeout_s": 300.0,
    "reliable_threshold": 0.8,
    "replication_target": 3.0,
    "reputation.prior_successes": 1.0,
    "reputation.prior_failures": 1.0,
    "reputation.evidence_half_life_s": 3600.0,
    "reputation.uptime_floor": 0.8,
    "reputation.uptime_half_life_s": 1800.0,
    "reputation.min_outcomes": 5.0,
}

NOW = {
    "sqlite": "(julianday('now') - 2440587.5) * 86400.0",
    "postgresql": "CAST(EXTRACT(EPOCH FROM now()) AS DOUBLE PRECISION)",
}

# 2^-x with x clamped to [0, 500] (as tracker.reputation does: Postgres raises on float underflow).
_DECAY = (
    "POWER(CAST(2.0 AS DOUBLE PRECISION), -(CASE WHEN ({x}) <= 0 THEN 0.0 "
    "WHEN ({x}) >= 500.0 THEN 500.0 ELSE ({x}) END))"
)
# A decayed weight: weights under 1e-100 count as 0; no evidence time means nothing to decay.
_WEIGHT = (
    "COALESCE(CASE WHEN ps.{w} >= 1e-100 THEN ps.{w} ELSE 0.0 END * "
    + _DECAY.format(x="(k.now - ps.evidence_at) / s.evidence_half_life_s")
    + ", ps.{w})"
)

PEER_SCORES = """
CREATE VIEW peer_scores AS
WITH s AS (
    SELECT
        MAX(CASE WHEN name = 'peer_timeout_s' THEN value END) AS peer_timeout_s,
        MAX(CASE WHEN name = 'reliable_threshold' THEN value END) AS reliable_threshold,
        MAX(CASE WHEN name = 'reputation.prior_successes' THEN value END) AS prior_successes,
        MAX(CASE WHEN name = 'reputation.prior_failures' THEN value END) AS prior_failures,
        MAX(CASE WHEN name = 'reputation.evidence_half_life_s' THEN value END) AS evidence_half_life_s,
        MAX(CASE WHEN name = 'reputation.uptime_floor' THEN value END) AS uptime_floor,
        MAX(CASE WHEN name = 'reputation.uptime_half_life_s' THEN value END) AS uptime_half_life_s,
        MAX(CASE WHEN name = 'reputation.min_outcomes' THEN value END) AS min_outcomes
    FROM tracker_settings
),
k AS (SELECT {now} AS now),
merged AS (
    SELECT
        ps.peer_id,
        MAX(CASE WHEN ps.online AND ps.last_seen >= k.now - s.peer_timeout_s THEN 1 ELSE 0 END) AS online,
        MIN(CASE WHEN ps.online AND ps.last_seen >= k.now - s.peer_timeout_s THEN ps.online_since END)
            AS online_since,
        MAX(ps.last_seen) AS last_seen,
        MAX(ps.uptime_s + CASE WHEN ps.online THEN
            (CASE WHEN ps.last_seen >= k.now - s.peer_timeout_s THEN k.now ELSE ps.last_seen END)
            - ps.online_since ELSE 0.0 END) AS uptime_s,
        SUM(ps.served_count) AS chunks_served,
        SUM(ps.failed_count) AS chunks_failed,
        SUM({success_weight}) AS success_weight,
        SUM({failure_weight}) AS failure_weight,
        AVG(ps.speed_bps) AS download_bytes_per_sec
    FROM peer_stats AS ps CROSS JOIN s CROSS JOIN k
    GROUP BY ps.peer_id
),
scored AS (
    SELECT
        m.*,
        (m.success_weight + s.prior_successes)
            / (m.success_weight + m.failure_weight + s.prior_successes + s.prior_failures) AS success_rate,
        1.0 - (1.0 - s.uptime_floor) * {uptime_decay} AS uptime_factor,
        s.reliable_threshold,
        s.min_outcomes
    FROM merged AS m CROSS JOIN s
)
SELECT
    p.peer_key AS peer_id,
    sc.online = 1 AS online,
    p.first_seen,
    sc.last_seen,
    sc.online_since,
    sc.uptime_s,
    sc.chunks_served,
    sc.chunks_failed,
    sc.success_weight,
    sc.failure_weight,
    sc.success_rate,
    sc.uptime_factor,
    sc.success_rate * sc.uptime_factor AS reputation,
    sc.success_rate * sc.uptime_factor > sc.reliable_threshold AS reliable,
    sc.chunks_served + sc.chunks_failed >= sc.min_outcomes AS proven,
    sc.download_bytes_per_sec,
    (SELECT COUNT(*) FROM peer_leases AS l, k
     WHERE l.peer_id = p.id AND l.closed_at IS NULL AND l.expires_at > k.now) AS open_leases
FROM scored AS sc JOIN peers AS p ON p.id = sc.peer_id
"""

CONTENT_REPLICATION = """
CREATE VIEW content_replication AS
SELECT
    c.content_key AS cid,
    COUNT(sc.peer_id) AS holders,
    COALESCE(SUM(CASE WHEN sc.online THEN 1 ELSE 0 END), 0) AS online_holders,
    COALESCE(SUM(CASE WHEN sc.online AND sc.reliable THEN 1 ELSE 0 END), 0) AS reliable_holders,
    (SELECT MAX(CASE WHEN x.changed_at > x.last_confirmed THEN x.changed_at ELSE x.last_confirmed END)
     FROM content_peers AS x WHERE x.content_id = c.id) AS last_update
FROM contents AS c
LEFT JOIN content_peers AS cp ON cp.content_id = c.id AND cp.available
LEFT JOIN peers AS p ON p.id = cp.peer_id
LEFT JOIN peer_scores AS sc ON sc.peer_id = p.peer_key
GROUP BY c.id, c.content_key
"""

UNDER_REPLICATED = """
CREATE VIEW under_replicated_content AS
SELECT
    cr.cid, cr.holders, cr.online_holders, cr.reliable_holders, cr.last_update,
    t.value AS replication_target
FROM content_replication AS cr
CROSS JOIN (SELECT value FROM tracker_settings WHERE name = 'replication_target') AS t
WHERE cr.online_holders < t.value
"""


def view_sql(dialect: str) -> list[str]:
    """The three CREATE VIEW statements for ``dialect``, in dependency order."""
    peer_scores = PEER_SCORES.format(
        now=NOW[dialect],
        success_weight=_WEIGHT.format(w="success_weight"),
        failure_weight=_WEIGHT.format(w="failure_weight"),
        uptime_decay=_DECAY.format(x="m.uptime_s / s.uptime_half_life_s"),
    )
    return [peer_scores, CONTENT_REPLICATION, UNDER_REPLICATED]


def upgrade() -> None:
    settings = op.create_table(
        "tracker_settings",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("value", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_tracker_settings")),
        comment="Settings the analytics views read (peer_timeout_s, reputation.*, replication_target).",
    )
    op.bulk_insert(settings, [{"name": name, "value": value} for name, value in DEFAULT_SETTINGS.items()])
    for statement in view_sql(op.get_bind().dialect.name):
        op.execute(statement)


def downgrade() -> None:
    for view in ("under_replicated_content", "content_replication", "peer_scores"):
        op.execute(f"DROP VIEW {view}")
    op.drop_table("tracker_settings")

"""The settings the analytics views read, and the one view query the service needs (for /metrics).

The views themselves (peer_scores, content_replication, under_replicated_content) are created by
migration 0004 and documented in docs/analytics.md; they read their constants from ``tracker_settings``
so an operator's ad-hoc SQL ranks peers exactly as the tracker that wrote the settings does.
"""

from __future__ import annotations

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from ..config import TrackerConfig
from ..db import insert_for
from ..schema import settings


def settings_of(config: TrackerConfig) -> dict[str, float]:
    """The ``tracker_settings`` rows that describe ``config`` (names as the views read them)."""
    params = config.reputation
    return {
        "peer_timeout_s": config.peer_timeout,
        "reliable_threshold": config.reliable_threshold,
        "replication_target": float(config.replication_target),
        "min_reputation": config.min_reputation,
        "reputation.prior_successes": params.prior_successes,
        "reputation.prior_failures": params.prior_failures,
        "reputation.evidence_half_life_s": params.evidence_half_life_s,
        "reputation.uptime_floor": params.uptime_floor,
        "reputation.uptime_half_life_s": params.uptime_half_life_s,
        "reputation.min_outcomes": params.min_outcomes,
    }


async def write_settings(conn: AsyncConnection, config: TrackerConfig) -> None:
    """Upsert this tracker's settings, so the views compute what it computes (the last opener wins)."""
    stmt = insert_for(config.dialect, settings)
    stmt = stmt.on_conflict_do_update(index_elements=[settings.c.name], set_={"value": stmt.excluded.value})
    await conn.execute(stmt, [{"name": name, "value": value} for name, value in settings_of(config).items()])


async def under_replicated_count(conn: AsyncConnection) -> int:
    """How many contents have fewer online holders than ``replication_target``."""
    count = await conn.scalar(select(func.count()).select_from(text("under_replicated_content")))
    return int(count or 0)

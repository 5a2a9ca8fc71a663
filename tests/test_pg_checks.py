"""What a tracker checks of its PostgreSQL server when it opens (tracker/pg_checks.py)."""

from __future__ import annotations

import logging

import pytest
from sqlalchemy import text

from tracker import AvailabilityTracker, TrackerConfig


async def test_a_postgres_server_without_autovacuum_is_named_at_open(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing said so, and a soak's selections got three times slower as dead rows piled up (QA
    round 24). The warning follows the server's real setting (this machine kind runs without it)."""
    with caplog.at_level(logging.WARNING, logger="tracker.postgres"):
        async with AvailabilityTracker(TrackerConfig(database_url=db_url, run_sweeper=False)) as tracker:
            if tracker.config.dialect == "postgresql":
                async with tracker.engine.connect() as conn:
                    setting = (
                        await conn.execute(
                            text("SELECT current_setting('autovacuum'), current_setting('track_counts')")
                        )
                    ).one()
                expected = tuple(setting) != ("on", "on")
            else:
                expected = False
    warned = [r for r in caplog.records if getattr(r, "action", None) == "postgres_autovacuum_off"]
    assert bool(warned) == expected
    if warned:
        assert "autovacuum = " in warned[0].getMessage()

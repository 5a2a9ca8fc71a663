"""What a tracker checks of the PostgreSQL server it is given, when it opens: settings it cannot work
well without, said once in the log rather than found out from a slow swarm."""

from __future__ import annotations

import logging

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger("tracker.postgres")


async def warn_without_vacuum(engine: AsyncEngine) -> bool:
    """Log a warning when autovacuum cannot run on the server; whether it can.

    Every heartbeat rewrites its peer's row, so the tracker's tables make dead rows all the time.
    With autovacuum off nothing reclaims them: in QA round 24's soak ``peer_stats`` held 7,600 live
    rows and 391,000 dead ones after 25 minutes, the database tripled, and selections took three
    times as long until a manual VACUUM. A diagnosis only: a failure to ask is not the tracker's.
    """
    try:
        async with engine.connect() as conn:
            row = (
                await conn.execute(
                    text("SELECT current_setting('autovacuum'), current_setting('track_counts')")
                )
            ).one()
    except Exception:  # the server answered the migration; this is advice, not a requirement
        return True
    autovacuum, track_counts = (str(value).lower() for value in row)
    if autovacuum == "on" and track_counts == "on":
        return True
    log.warning(
        "autovacuum cannot run on this PostgreSQL server (autovacuum = %s, track_counts = %s): the "
        "tracker rewrites a peer's row at every heartbeat, and without vacuum the dead rows pile up, "
        "the tables grow and selections slow down. Turn both on (docs/operations.md, PostgreSQL), "
        "or VACUUM the tracker's tables often",
        autovacuum,
        track_counts,
        extra={"action": "postgres_autovacuum_off"},
    )
    return False

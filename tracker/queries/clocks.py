"""The tracker clock's stored state (``tracker_clocks``): one row per host boot."""

from __future__ import annotations

from sqlalchemy import delete, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from ..clockleap import ClockState
from ..db import insert_for
from ..schema import clocks

# Rows of other boots are of no use once their boot is over; a month covers any host still up.
STALE_BOOT_S = 30 * 86_400.0


async def load_clock_state(conn: AsyncConnection, boot_id: str) -> ClockState | None:
    """The state stored by this boot's latest tracker process, if any."""
    row = (await conn.execute(select(clocks).where(clocks.c.boot_id == boot_id))).one_or_none()
    if row is None:
        return None
    return ClockState(row.wall, row.elapsed, row.held_since, row.lag_s, row.lag_until)


async def save_clock_state(
    conn: AsyncConnection, dialect: str, boot_id: str, state: ClockState, now: float
) -> None:
    """Store this boot's state (the last writer wins: every process of a boot reads the same two
    clocks), and drop rows of boots not heard from for a month."""
    values = {
        "wall": state.wall,
        "elapsed": state.elapsed,
        "held_since": state.held_since,
        "lag_s": state.lag_s,
        "lag_until": state.lag_until,
        "saved_at": now,
    }
    stmt = insert_for(dialect, clocks).values(boot_id=boot_id, **values)
    await conn.execute(stmt.on_conflict_do_update(index_elements=[clocks.c.boot_id], set_=values))
    await conn.execute(
        delete(clocks).where(clocks.c.boot_id != boot_id, clocks.c.saved_at < now - STALE_BOOT_S)
    )


async def database_time(conn: AsyncConnection) -> float:
    """The Postgres server's clock now (not the transaction's start), Unix seconds."""
    value = await conn.scalar(text("SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"))
    return float(value)

"""The tracker clock's stored state (``tracker_clocks``): one row per host boot."""

from __future__ import annotations

from sqlalchemy import delete, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from ..clockleap import ClockState
from ..db import insert_for
from ..schema import clocks

# Rows kept: this boot's, and the most recently saved of the others (boots that ended, other hosts
# of a shared Postgres). By count, not age: ages would be read on one host's clock, which may be
# the wrong one (QA: a host 31 days ahead deleted every other host's row).
KEEP_BOOTS = 1000


async def load_clock_state(conn: AsyncConnection, boot_id: str) -> ClockState | None:
    """The state stored by this boot's latest tracker process, if any."""
    row = (await conn.execute(select(clocks).where(clocks.c.boot_id == boot_id))).one_or_none()
    if row is None:
        return None
    return ClockState(row.wall, row.elapsed, row.held_since, row.lag_s, row.lag_until)


async def save_clock_state(
    conn: AsyncConnection, dialect: str, boot_id: str, state: ClockState, now: float
) -> None:
    """Store this boot's state unless the stored one was read later in elapsed time.

    Every process of a boot reads the same two clocks, but not at once: one still holding a leap
    (its reading in step is from before it) must not overwrite one that has since accepted it (QA: a
    process opened next resumed the hold, and its first sweep took the sibling's correctly dated
    rows for future ones and moved them a day back). The latest reading in step is the best
    reference, and a hold under way keeps its reading, so the later ``elapsed`` wins.
    """
    values = {
        "wall": state.wall,
        "elapsed": state.elapsed,
        "held_since": state.held_since,
        "lag_s": state.lag_s,
        "lag_until": state.lag_until,
        "saved_at": now,
    }
    stmt = insert_for(dialect, clocks).values(boot_id=boot_id, **values)
    await conn.execute(
        stmt.on_conflict_do_update(
            index_elements=[clocks.c.boot_id], set_=values, where=stmt.excluded.elapsed >= clocks.c.elapsed
        )
    )
    newest = select(clocks.c.boot_id).order_by(clocks.c.saved_at.desc()).limit(KEEP_BOOTS)
    await conn.execute(delete(clocks).where(clocks.c.boot_id != boot_id, clocks.c.boot_id.not_in(newest)))


async def database_time(conn: AsyncConnection) -> float:
    """The Postgres server's clock now (not the transaction's start), Unix seconds."""
    value = await conn.scalar(text("SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"))
    return float(value)

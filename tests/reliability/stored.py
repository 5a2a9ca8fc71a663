"""What the database holds for one peer: the numbered outcomes stored and its own node's counter."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from tracker.schema import peer_stats, peers, upload_outcomes


async def stored_outcomes(conn: AsyncConnection, peer_key: str, node_id: int) -> tuple[set[int], int]:
    """(the ``bytes`` numbers of the peer's stored outcomes, ``served_count`` of ``node_id``'s row)."""
    numbers = await conn.scalars(
        select(upload_outcomes.c.bytes)
        .join(peers, peers.c.id == upload_outcomes.c.peer_id)
        .where(peers.c.peer_key == peer_key)
    )
    served = await conn.scalar(
        select(func.coalesce(func.sum(peer_stats.c.served_count), 0))
        .join(peers, peers.c.id == peer_stats.c.peer_id)
        .where(peers.c.peer_key == peer_key, peer_stats.c.node_id == node_id)
    )
    return set(numbers.all()), int(served or 0)

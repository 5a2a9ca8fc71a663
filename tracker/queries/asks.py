"""Asking an origin's rows again after the sweeper deleted some: a debt on ``tracker_nodes``, paid
by lowering this node's clock of that origin, so that gossip sends its rows from there on again.

The clock claims every row of the origin up to it, so a deleted row it still covered would never
come again: a tracker cut off from a live origin for longer than a departed peer's mappings take
deleted the origin's live mapping for good (QA round 30). Every deletion owes an ask, kept in the
database (an ask put off in memory was lost with the process, and the live mapping with it: QA
round 32), and never forgotten (a row asked for once and not again was lost after a second
partition, a relay that still held the old row, or a catch-up in slices: QA round 33).

An ask is paid at once unless nothing of the origin has come since the last one (``asked_upto``,
the clock then): a resend could then only bring back what was just deleted. Two sweeping trackers
holding the never-removed mapping of an origin gone for good asked each other, and each sent it
back to the other, every hour for good (QA round 34). The debt then waits for the origin's next
news (the merge pays it as the clock passes ``asked_upto``), which a live origin's heartbeats bring
within an exchange or two. An ask the merge pays sets no hold (``sweeper.ASKED_HOLD_S`` lives in
the sweeper's process): a pass during that catch-up may delete the mapping again before its peer's
new row came, which owes one more ask, paid when the catch-up brings news: a resend more, not a
loss.
"""

from __future__ import annotations

from sqlalchemy import case, or_, update
from sqlalchemy.ext.asyncio import AsyncConnection

from ..schema import nodes

#: A deleted mapping: its origin (``node_id``) and version (``None``: this node's, not stamped yet).
Deleted = tuple[int, int | None]


async def ask_again(conn: AsyncConnection, deleted: list[Deleted]) -> set[int]:
    """Owe each other origin of ``deleted`` mappings an ask from the lowest version deleted, in the
    deleting transaction, and pay what is due (``pay_owed_ask``); returns the origins asked.

    The sweeper leaves those origins' mappings alone for a while (``sweeper.ASKED_HOLD_S``): a
    catch-up longer than one exchange brings a mapping back (its version is old) before its peer's
    new row (heartbeats make it the newest), and a pass between deleted the mapping again and
    started the catch-up over, at every pass (QA round 33). This node's own clock is left be."""
    lowest: dict[int, int] = {}
    for node_id, version in deleted:
        if version is not None:
            lowest[node_id] = min(version, lowest.get(node_id, version))
    n, asked = nodes.c, set()
    for node_id, version in sorted(lowest.items()):  # one lock order for concurrent sweepers
        owed = case((or_(n.owed_from.is_(None), n.owed_from > version), version), else_=n.owed_from)
        await conn.execute(update(nodes).where(n.id == node_id, ~n.is_local).values(owed_from=owed))
        if await pay_owed_ask(conn, node_id):
            asked.add(node_id)
    return asked


async def pay_owed_ask(conn: AsyncConnection, node_id: int) -> bool:
    """Pay the ask owed to ``node_id``, if any and if something of it came since the last one: lower
    the clock below the lowest version owed, remember the clock it had (``asked_upto``); whether
    it paid."""
    n = nodes.c
    below = case((n.owed_from > 0, n.owed_from - 1), else_=0)
    paid = await conn.execute(
        update(nodes)
        .where(
            n.id == node_id,
            n.owed_from.is_not(None),
            or_(n.asked_upto.is_(None), n.clock > n.asked_upto),
        )
        .values(clock=case((n.clock > below, below), else_=n.clock), asked_upto=n.clock, owed_from=None)
        .returning(n.id)
    )
    return paid.first() is not None

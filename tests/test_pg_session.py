"""What a tracker's Postgres sessions run under, whatever the database's or role's defaults say (QA
round 76); on SQLite the same checks hold by construction, and run too."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from conftest import _admin
from sqlalchemy import text
from sqlalchemy.engine import make_url

from tracker import AvailabilityTracker, TrackerConfig
from tracker.events import ContentAvailable, PeerOnline, SpeedSample


@pytest.mark.parametrize("isolation", ["repeatable read", "serializable"])
async def test_the_lease_cap_holds_whatever_isolation_the_database_defaults_to(
    db_url: str, isolation: str
) -> None:
    """Under a database default of REPEATABLE READ a selection counted the leases of the peer it had
    just locked in its snapshot, missing those the lock's previous holder had committed: 30 callers
    got 2 leases of each of 8 peers whose capacity was 1."""
    if db_url.startswith("postgresql"):
        name = make_url(db_url).database
        await _admin(f"ALTER DATABASE \"{name}\" SET default_transaction_isolation = '{isolation}'")
    async with AvailabilityTracker(TrackerConfig(database_url=db_url)) as tracker:
        await tracker.record_batch(
            [
                event
                for i in range(8)
                for event in (
                    PeerOnline(f"p{i}"),
                    ContentAvailable("c", f"p{i}"),
                    SpeedSample(f"p{i}", 1_000 * (i + 1)),
                )
            ]
        )
        if tracker.config.dialect == "postgresql":
            async with tracker.engine.connect() as conn:
                said = (await conn.execute(text("SHOW transaction_isolation"))).scalar_one()
                assert said == "read committed"
        handed: Counter[str] = Counter()
        capacity: dict[str, int] = {}

        async def select() -> None:
            for peer in await tracker.select_best_peers("c", 2):
                handed[peer.peer_id] += 1
                capacity[peer.peer_id] = peer.capacity

        await asyncio.gather(*(select() for _ in range(30)))
        assert set(capacity.values()) == {1}  # unproven, in slow start: one lease each
        assert {peer: n for peer, n in handed.items() if n > capacity[peer]} == {}
        assert sum(handed.values()) == 8 == (await tracker.stats()).open_leases


async def test_the_sweep_lock_outlives_a_databases_idle_in_transaction_timeout(db_url: str) -> None:
    """The lock's transaction idles for the whole pass: a timeout of 100 ms set on the database ended
    its session mid-pass, and the lock with it (a second process could then sweep beside it)."""
    from tracker.sweeper import SWEEP_LOCK_KEY, _sweep_lock

    if db_url.startswith("postgresql"):
        name = make_url(db_url).database
        await _admin(f"ALTER DATABASE \"{name}\" SET idle_in_transaction_session_timeout = '100ms'")
    async with AvailabilityTracker(TrackerConfig(database_url=db_url)) as tracker:
        async with _sweep_lock(tracker.engine) as acquired:
            assert acquired
            await asyncio.sleep(0.4)  # the server's timeout, not ours: real time is what it counts
            if tracker.config.dialect == "postgresql":
                async with tracker.engine.connect() as other:
                    taken = f"SELECT pg_try_advisory_xact_lock({SWEEP_LOCK_KEY})"
                    assert (await other.execute(text(taken))).scalar_one() is False  # still held
        assert (await tracker.sweep()).ran

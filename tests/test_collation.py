"""Peer ids are ordered by code point everywhere, whatever a Postgres database's collation.

The write path sorts a batch's keys in Python (code point order) and locks their rows in that
order; a selection locks its chosen peers with ``ORDER BY peer_key``. On a database whose collation
is not "C" (ICU "en-US" puts "a" before "B") the two orders differed, and selections deadlocked
against batches (QA round 6: 15 deadlocks in 20 s with mixed-case ids). Ties in rankings differed
from SQLite's the same way.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from conftest import PG_URL, _dsn
from sqlalchemy.engine import make_url

from tracker import AvailabilityTracker, TrackerConfig
from tracker.events import ContentAvailable, PeerOnline, SpeedSample
from tracker.gossip.protocol import MappingState, OriginDelta
from tracker.queries import gossip as gq
from tracker.queries import lock_peers
from tracker.testing import ManualClock

KEYS = ["b", "B", "a", "A", "_z", "Z1", "é", "e"]


async def _holders(tracker: AvailabilityTracker) -> None:
    """Holders of one content that rank equal in everything but their ids."""
    events = []
    for key in KEYS:
        events += [PeerOnline(key), SpeedSample(key, 1_000_000), ContentAvailable("cid", key)]
    await tracker.record_batch(events)


@pytest.fixture
async def icu_url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """An empty Postgres database whose collation orders "a" before "B" (ICU en-US)."""
    request.getfixturevalue("pg_template")  # reachability / TRACKER_REQUIRE_POSTGRES, as every PG test
    name = f"tracker_t_icu_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(_dsn(PG_URL))
    try:
        await admin.execute(
            f"CREATE DATABASE \"{name}\" LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8' "
            "TEMPLATE template0"
        )
        yield make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_peers_are_locked_and_tied_in_code_point_order_under_an_icu_collation(
    icu_url: str, clock: ManualClock
) -> None:
    async with AvailabilityTracker(TrackerConfig(database_url=icu_url, clock=clock)) as tracker:
        await _holders(tracker)
        async with tracker.engine.begin() as conn:
            collated = await conn.exec_driver_sql("SELECT 'a' < 'B'")
            assert collated.scalar() is True  # the database does not order by code point
            assert await lock_peers(conn, "postgresql", KEYS) == sorted(KEYS)
        content = await tracker.get_content_availability("cid")
        assert content is not None
        assert [p.peer_id for p in content.peers] == sorted(KEYS)


async def test_ties_rank_in_code_point_order(tracker: AvailabilityTracker) -> None:
    await _holders(tracker)
    content = await tracker.get_content_availability("cid")
    assert content is not None
    assert [p.peer_id for p in content.peers] == sorted(KEYS)


async def test_listings_page_in_code_point_order_under_an_icu_collation(
    icu_url: str, clock: ManualClock
) -> None:
    """They paged in the collation's order, "a" before "B" on such a database and after it on
    SQLite (QA round 8); peers.peer_key is in C now (migration 0012), and still uses its index."""
    async with AvailabilityTracker(TrackerConfig(database_url=icu_url, clock=clock)) as tracker:
        await _holders(tracker)
        pages, after = [], None
        while page := await tracker.list_peers(limit=3, after=after):
            pages.append([p.peer_id for p in page])
            after = page[-1].peer_id
        assert [key for page in pages for key in page] == sorted(KEYS)
        assert await tracker.get_available_peers("cid") == sorted(KEYS)
        async with tracker.engine.begin() as conn:  # a handful of rows: make the index the only way
            await conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
            await conn.exec_driver_sql("SET LOCAL enable_sort = off")
            plan = "\n".join(
                row[0]
                for row in await conn.exec_driver_sql(
                    "EXPLAIN SELECT id FROM peers WHERE peer_key > 'a' ORDER BY peer_key LIMIT 3"
                )
            )
        assert "uq_peers_peer_key" in plan and "Sort" not in plan, plan


async def test_equal_times_go_to_the_larger_origin_key_by_code_point_under_an_icu_collation(
    icu_url: str, clock: ManualClock
) -> None:
    """Two origins' changes of one mapping at the same time: the larger origin key wins, "a1" over
    "B1" by code point as on SQLite; compared in the database's collation, "B1" won on Postgres, and
    nodes of the two engines kept different answers for good."""
    async with AvailabilityTracker(TrackerConfig(database_url=icu_url, clock=clock)) as tracker:
        now = tracker.now()
        await tracker.record_batch([PeerOnline("p")])
        for origin, available in (("a1", True), ("B1", False)):
            change = MappingState(
                cid="cid", peer="p", available=available, since=now, last_confirmed=now, changed_at=now,
                version=1,
            )  # fmt: skip
            async with tracker.engine.begin() as conn:
                delta = OriginDelta(origin=origin, base=0, upto=1, mappings=[change])
                await gq.merge(conn, "postgresql", tracker.node_key, [delta], 10, now)
        assert await tracker.get_available_peers("cid") == ["p"]


async def test_contents_sort_in_code_point_order_under_an_icu_collation(
    icu_url: str, tmp_path: Path, clock: ManualClock
) -> None:
    """The views and docs/analytics.md's queries sort by cid: Postgres put "a" before "B" where SQLite
    put it after (QA round 76); contents.content_key is in C now (migration 0018)."""
    query = "SELECT cid FROM content_replication ORDER BY cid"
    answers = []
    for url in (icu_url, f"sqlite+aiosqlite:///{tmp_path / 't.db'}"):
        async with AvailabilityTracker(TrackerConfig(database_url=url, clock=clock)) as tracker:
            await tracker.record_batch([ContentAvailable(cid, "p") for cid in KEYS])
            async with tracker.engine.connect() as conn:
                answers.append([row[0] for row in await conn.exec_driver_sql(query)])
    assert answers == [sorted(KEYS), sorted(KEYS)]

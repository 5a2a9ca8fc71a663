"""The tracker behind a real PgBouncer, as managed Postgres services put one in front of the server.

In session mode a client keeps one server connection, but PgBouncer refuses startup parameters it
does not know. In transaction mode each transaction may run on another server connection, shared
with other clients: prepared statements, session settings and session locks do not carry over
(``pg_transaction_pooling``). The pooler here has fewer server connections than the trackers have
clients, so they do share them.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from conftest import REQUIRE_PG, _dsn
from gossip_helpers import KEY, LocalNet, merged_view
from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from test_load_balancing import proven_peers

from benchmarks.pooler import PGBOUNCER, pgbouncer
from tracker import AvailabilityTracker, StorageError, TrackerConfig
from tracker.gossip.agent import GossipAgent
from tracker.gossip.config import GossipConfig
from tracker.sweeper import SWEEP_LOCK_KEY
from tracker.testing import ManualClock

Pooler = Callable[[str, str, int], AbstractAsyncContextManager[str]]


@pytest.fixture
def engine_name() -> str:
    return "postgresql"  # a pooler of Postgres: nothing to run on SQLite


@pytest.fixture
def pooler(pg_template: str) -> Pooler:
    """``async with pooler(db_url, mode, server_connections) as url``: a PgBouncer on loopback in
    front of the test database, and the tracker's URL through it."""
    if PGBOUNCER is None:
        if REQUIRE_PG:
            pytest.fail("TRACKER_REQUIRE_POSTGRES=1 but pgbouncer is not installed (.ci/run installs it)")
        # Justified skip: a newcomer without PgBouncer can run the rest; CI installs it and sets
        # TRACKER_REQUIRE_POSTGRES=1, which turns this into the failure above.
        pytest.skip("pgbouncer is not installed; set TRACKER_REQUIRE_POSTGRES=1 to make this fail")
    return pgbouncer


async def _settings_of_each_transaction(tracker: AvailabilityTracker, transactions: int) -> set[str]:
    async def one() -> str:
        async with tracker.engine.connect() as conn:
            seen = await conn.scalar(
                text("SELECT current_setting('jit') || ' ' || current_setting('lock_timeout')")
            )
            await asyncio.sleep(0.001)  # overlap the others, so they spread over server connections
            return str(seen)

    return set(await asyncio.gather(*(one() for _ in range(transactions))))


async def test_through_pgbouncer_in_session_mode_the_tracker_needs_no_setting(
    pooler: Pooler, config: TrackerConfig, clock: ManualClock
) -> None:
    """Failed before at connect: ``unsupported startup parameter: jit``."""
    async with pooler(config.database_url, "session", 20) as url:
        async with AvailabilityTracker(replace(config, database_url=url)) as tracker:
            await tracker.record_batch(proven_peers(["a", "b"], clock.now))
            picked = await tracker.select_best_peers("movie", 2)
            assert sorted(p.peer_id for p in picked) == ["a", "b"]
            clock.advance(config.peer_timeout + 1)
            report = await tracker.sweep()
            assert report.ran and report.peers_marked_offline == 2
            assert await _settings_of_each_transaction(tracker, 12) == {"off 30s"}


async def test_through_pgbouncer_in_transaction_mode_two_trackers_stay_exact(
    pooler: Pooler, config: TrackerConfig, clock: ManualClock, tmp_path: Path
) -> None:
    """Two trackers whose 2 x 6 pooled clients share three server connections: prepared statements
    (asyncpg's ``__asyncpg_stmt_<n>__`` names) failed with "does not exist" before the option."""
    settings = replace(
        config,
        pg_transaction_pooling=True,
        pool_size=3,
        max_load_per_peer=1,
        lease_ttl_s=3600,
        snapshot_dir=str(tmp_path),
        snapshot_interval_s=0,
    )
    async with pooler(config.database_url, "transaction", 3) as url:
        pooled = replace(settings, database_url=url)
        async with AvailabilityTracker(pooled) as a, AvailabilityTracker(pooled) as b:
            names = [f"p{i}" for i in range(12)]
            await a.record_batch(proven_peers(names, clock.now))

            async def writer(tracker: AvailabilityTracker) -> None:
                for i in range(40):
                    await tracker.record_upload_success(f"w{i % 4}")

            async def selector(tracker: AvailabilityTracker) -> list[str]:
                return [p.peer_id for p in await tracker.select_best_peers("movie", 1)]

            picks = [selector(t) for _ in range(15) for t in (a, b)]
            sweeps = [t.sweep() for _ in range(3) for t in (a, b)]
            *_, picked, reports = await asyncio.gather(
                *(writer(t) for _ in range(4) for t in (a, b)),
                asyncio.gather(*picks),
                asyncio.gather(*sweeps),
            )
            while more := await selector(a):  # the peers the concurrent ones left free
                picked.append(more)
            handed = Counter(peer for peers in picked for peer in peers)
            assert handed == Counter(names)  # cap 1: each peer handed out exactly once
            assert any(report.ran and report.snapshot_path for report in reports)  # streamed out
            for w in range(4):
                metrics = await b.get_peer_metrics(f"w{w}")
                assert metrics is not None and metrics.chunks_served == 8 * 10
            assert await _settings_of_each_transaction(a, 12) == {"off 30s"}

        # The sweep lock ended with its pass: none is left on a server connection the pooler keeps
        # (a session lock taken through it would be, unlocked on another connection or not at all).
        direct = await asyncpg.connect(_dsn(config.database_url))
        try:
            assert await direct.fetchval(f"SELECT pg_try_advisory_lock({SWEEP_LOCK_KEY})")
        finally:
            await direct.close()


@pytest.mark.timeout(300)
def test_the_pooler_benchmark_runs(pooler: Pooler) -> None:
    """Its smallest run, so it never rots unseen; nothing about speed."""
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.pooler", "--quick"],
        cwd=Path(__file__).parent.parent,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| selections x8 | per_s |" in result.stdout, result.stdout[-3000:]


async def test_without_the_option_a_transaction_pooler_fails_with_an_error_that_names_it(
    pooler: Pooler, config: TrackerConfig, clock: ManualClock
) -> None:
    """Two trackers name their prepared statements alike and share two server connections: one
    finds its statement missing, or another's under its name."""
    async with pooler(config.database_url, "transaction", 2) as url:
        with pytest.raises(StorageError, match="set pg_transaction_pooling"):
            pooled = replace(config, database_url=url, pool_size=3)
            async with AvailabilityTracker(pooled) as a, AvailabilityTracker(pooled) as b:
                await a.record_batch(proven_peers(["p"], clock.now))
                for _ in range(20):
                    await asyncio.gather(
                        *(t.record_upload_success("p") for t in (a, b) for _ in range(3)),
                        *(t.select_best_peers("movie", 1) for t in (a, b)),
                    )


async def test_settings_the_server_gives_by_default_are_not_set_again_in_each_transaction(
    pooler: Pooler, config: TrackerConfig, clock: ManualClock
) -> None:
    direct = await asyncpg.connect(_dsn(config.database_url))
    try:
        database = make_url(config.database_url).database
        await direct.execute(f'ALTER DATABASE "{database}" SET jit = off')
        await direct.execute(f"ALTER DATABASE \"{database}\" SET lock_timeout = '30s'")
    finally:
        await direct.close()
    async with pooler(config.database_url, "transaction", 2) as url:
        pooled = replace(config, database_url=url, pg_transaction_pooling=True)
        async with AvailabilityTracker(pooled) as tracker:
            setting: list[str] = []

            @event.listens_for(tracker.engine.sync_engine, "before_cursor_execute")
            def _seen(*args: Any) -> None:
                if args[2].startswith("SELECT set_config("):
                    setting.append(args[2])

            await tracker.record_batch(proven_peers(["a", "b"], clock.now))
            assert len(await tracker.select_best_peers("movie", 2)) == 2
            assert await _settings_of_each_transaction(tracker, 12) == {"off 30s"}
            assert setting == []


async def test_two_trackers_gossip_through_a_transaction_pooler_and_converge(
    pooler: Pooler, config: TrackerConfig, other_db_url: str, clock: ManualClock
) -> None:
    """The gossip stamper's cursor and advisory lock, the merge's statements: all within transactions."""
    names = ["http://a", "http://b"]
    net, agents = LocalNet(), []
    async with pooler(config.database_url, "transaction", 2) as url_a:
        url_b = make_url(url_a).set(database=make_url(other_db_url).database).render_as_string(False)
        try:
            for i, (name, url) in enumerate(zip(names, (url_a, url_b), strict=True)):
                tracker = await AvailabilityTracker.open(
                    replace(config, database_url=url, pg_transaction_pooling=True)
                )
                agent = GossipAgent(
                    tracker,
                    GossipConfig(keys=(KEY,), neighbors=tuple(n for n in names if n != name)),
                    transport=net.transport_for(name),
                    rng=random.Random(i),
                )
                net.agents[name] = agent
                agents.append(agent)
            for i, agent in enumerate(agents):
                await agent.tracker.record_batch(proven_peers([f"p{i}-{k}" for k in range(20)], clock.now))
                await agent.tracker.record_content_unavailable("movie", f"p{i}-0")
            for _ in range(3):
                await asyncio.gather(*(agent.round() for agent in agents))
            views = [await merged_view(agent.tracker, ["movie"]) for agent in agents]
            assert views[0] == views[1]
            available = await agents[0].tracker.get_available_peers("movie")
            assert len(available) == 38 and "p1-0" not in available and "p1-19" in available
        finally:
            for agent in agents:
                await agent.tracker.close()

"""What a tracker checks of its PostgreSQL server when it opens (tracker/pg_checks.py)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from conftest import PG_URL, _admin, _with_database
from gossip_helpers import KEY, LocalNet
from sqlalchemy import text
from typer.testing import CliRunner

from tracker import AvailabilityTracker, InvalidInput, StorageError, TrackerConfig
from tracker.cli import app as cli_app
from tracker.events import ContentAvailable, PeerOnline
from tracker.gossip.agent import GossipAgent
from tracker.gossip.config import GossipConfig
from tracker.service.app import create_app


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


@pytest.mark.parametrize("engine_name", ["postgresql"], indirect=True)
async def test_a_table_with_autovacuum_turned_off_is_named_at_open(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The server's setting said nothing of a table whose own storage parameters turn autovacuum
    off: its dead rows piled up unwarned. Such tables are named, whatever the server's setting."""
    config = TrackerConfig(database_url=db_url, run_sweeper=False)
    async with AvailabilityTracker(config) as tracker, tracker.engine.begin() as conn:
        await conn.execute(text("ALTER TABLE peer_stats SET (autovacuum_enabled = off)"))
        await conn.execute(text("ALTER TABLE content_peers SET (autovacuum_enabled = 'no')"))
        await conn.execute(text("ALTER TABLE peers SET (autovacuum_enabled = on, fillfactor = 90)"))
    with caplog.at_level(logging.WARNING, logger="tracker.postgres"):
        async with AvailabilityTracker(config) as tracker, tracker.engine.begin() as conn:
            await conn.execute(text("ALTER TABLE peer_stats RESET (autovacuum_enabled)"))
            await conn.execute(text("ALTER TABLE content_peers RESET (autovacuum_enabled)"))
    warned = [r for r in caplog.records if getattr(r, "action", None) == "postgres_autovacuum_off_tables"]
    assert len(warned) == 1 and warned[0].tables == ["content_peers", "peer_stats"]
    assert "content_peers, peer_stats" in warned[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tracker.postgres"):
        async with AvailabilityTracker(config):
            pass
    assert not [r for r in caplog.records if getattr(r, "action", None) == "postgres_autovacuum_off_tables"]


@pytest.fixture
async def latin1_url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """An empty Postgres database encoded LATIN1 (the tracker migrates it as it opens)."""
    request.getfixturevalue("pg_template")  # applies the reachability / TRACKER_REQUIRE_POSTGRES rule
    name = f"tracker_t_latin1_{uuid.uuid4().hex[:8]}"
    await _admin(
        f"CREATE DATABASE \"{name}\" ENCODING 'LATIN1' TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C'"
    )
    try:
        yield _with_database(PG_URL, name)
    finally:
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def test_an_id_a_non_utf8_database_cannot_hold_is_invalid_input_and_named_at_open(
    latin1_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A LATIN1 database refused the id 日本語 and the caller was told "the database is unavailable;
    retry later" (503), which no retry could change (QA round 40). Now: 422 (``InvalidInput``) and a
    warning when the tracker opens; the events beside it in the batches of other callers are stored."""
    with caplog.at_level(logging.WARNING, logger="tracker.postgres"):
        async with AvailabilityTracker(TrackerConfig(database_url=latin1_url, run_sweeper=False)) as tracker:
            results = await asyncio.gather(
                *(tracker.record_peer_online(peer) for peer in ("ok-1", "日本語", "café", "ok-2")),
                return_exceptions=True,
            )
            assert [type(r).__name__ for r in results] == [
                "NoneType",
                "UnstorableInput",
                "NoneType",
                "NoneType",
            ]
            error = results[1]
            assert isinstance(error, InvalidInput) and isinstance(error, StorageError)
            assert "ENCODING 'UTF8'" in str(error)
            assert sorted(p.peer_id for p in await tracker.list_peers()) == ["café", "ok-1", "ok-2"]
            app = create_app(tracker)
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1"
            ) as client:
                answer = await client.post("/v1/peers/online", json={"peer_id": "日本語"})
            assert answer.status_code == 422, answer.text
    warned = [r for r in caplog.records if getattr(r, "action", None) == "postgres_not_utf8"]
    assert len(warned) == 1 and "LATIN1" in warned[0].getMessage()


async def test_a_neighbours_id_a_non_utf8_database_cannot_hold_is_the_neighbours_failure(
    latin1_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Taken for this tracker's own database failing, it was retried every round without back-off,
    logged as a database failure, and the neighbour looked healthy (QA round 43)."""
    net = LocalNet()
    async with (
        AvailabilityTracker(TrackerConfig(database_url=latin1_url, run_sweeper=False)) as here,
        AvailabilityTracker(TrackerConfig(database_url=f"sqlite+aiosqlite:///{tmp_path / 'y.db'}")) as there,
    ):
        await there.record_peer_online("日本語")
        agent = GossipAgent(here, GossipConfig(keys=(KEY,), neighbors=("http://y",)), transport=net)
        net.agents["http://y"] = GossipAgent(there, GossipConfig(keys=(KEY,)), transport=net)
        with caplog.at_level(logging.WARNING, logger="tracker.gossip"):
            assert await agent.round() == 0
    assert [(n.url, n.consecutive_failures) for n in agent.neighbor_states()] == [("http://y", 1)]
    actions = {getattr(r, "action", None) for r in caplog.records}
    assert "gossip_failure" in actions and "gossip_local_failure" not in actions


async def test_the_cli_names_the_way_out_of_a_non_utf8_database(latin1_url: str) -> None:
    """The CLI printed the driver's sentence alone ("has no equivalent in encoding LATIN1"): the
    advice to create the database with ENCODING 'UTF8' that the tracker's error carries was lost
    (QA round 43)."""
    async with AvailabilityTracker(TrackerConfig(database_url=latin1_url, run_sweeper=False)):
        pass  # migrated
    result = await asyncio.to_thread(
        CliRunner().invoke, cli_app, ["peers", "show", "日本語"], env={"TRACKER_DATABASE_URL": latin1_url}
    )
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert 'no equivalent in encoding "LATIN1"' in lines[0]
    assert "create the tracker's database with ENCODING 'UTF8'" in lines[0]


@pytest.mark.parametrize("engine_name", ["postgresql"], indirect=True)
async def test_reads_prepared_before_another_processs_migration_are_prepared_again(db_url: str) -> None:
    """Statements a pooled connection prepared before another process migrated the tables under them
    failed once per connection: reads answered 503 (QA rounds 47, 49). Retried now."""
    from tracker.db import create_engine
    from tracker.migrations import migrate

    async with AvailabilityTracker(TrackerConfig(database_url=db_url, run_sweeper=False)) as tracker:
        await tracker.record_batch([PeerOnline("p0"), ContentAvailable("c", "p0")])
        other = create_engine(TrackerConfig(database_url=db_url))
        try:
            for downgrade in (True, False):  # 0012 changes peers.peer_key's collation, both ways
                await migrate(other, "0011" if downgrade else "head", downgrade=downgrade)
                for _ in range(4):
                    assert [p.peer_id for p in await tracker.list_peers()] == ["p0"]
                    assert await tracker.get_available_peers("c") == ["p0"]
        finally:
            await other.dispose()

"""The operator commands (db, peers, content, best, sweep, stats, gossip export) on both engines.

Tests are synchronous on purpose: each CLI command runs its own event loop (``asyncio.run``), as it does
from a shell. Data is seeded through the library on another loop first.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import make_url, text, update
from typer.testing import CliRunner, Result

from tracker import AvailabilityTracker, SchemaOutOfDate, TrackerConfig, drift
from tracker.cli import app
from tracker.clockleap import system_boot_id, system_elapsed
from tracker.db import create_engine
from tracker.migrations import head_revision
from tracker.schema import clocks

runner = CliRunner()


def _cli(db_url: str, *args: str) -> Result:
    return runner.invoke(app, [*args, "--database-url", db_url])


def _seed(db_url: str) -> None:
    async def seed() -> None:
        async with AvailabilityTracker(TrackerConfig(database_url=db_url)) as tracker:
            for i in range(5):
                peer = f"peer-{i}"
                await tracker.record_peer_online(peer)
                await tracker.record_content_available("cid-1", peer)
                await tracker.record_download_speed(peer, 1_000_000 * (i + 1))
                for _ in range(i * 3):
                    await tracker.record_upload_success(peer)
            await tracker.record_peer_offline("peer-4")

    asyncio.run(seed())


@pytest.fixture
def seeded(db_url: str) -> str:
    _seed(db_url)
    return db_url


def test_stats_count_the_swarm_as_json(seeded: str) -> None:
    result = _cli(seeded, "stats", "--json")
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert (stats["peers_total"], stats["peers_online"], stats["contents_total"]) == (5, 4, 1)
    assert (stats["mappings_available"], stats["open_leases"]) == (5, 0)
    assert stats["schema_revision"] == head_revision()


def test_peers_list_pages_in_id_order_and_filters_online(seeded: str) -> None:
    first = json.loads(_cli(seeded, "peers", "list", "--limit", "2", "--json").stdout)
    assert [p["peer_id"] for p in first["peers"]] == ["peer-0", "peer-1"]
    rest = json.loads(_cli(seeded, "peers", "list", "--after", first["next_after"], "--json").stdout)
    assert [p["peer_id"] for p in rest["peers"]] == ["peer-2", "peer-3", "peer-4"]
    assert rest["next_after"] is None
    online = json.loads(_cli(seeded, "peers", "list", "--online", "--json").stdout)
    assert "peer-4" not in [p["peer_id"] for p in online["peers"]]
    table = _cli(seeded, "peers", "list")
    assert table.exit_code == 0 and "peer-3" in table.stdout


def test_peers_show_gives_the_parts_of_the_score(seeded: str) -> None:
    shown = json.loads(_cli(seeded, "peers", "show", "peer-3", "--json").stdout)
    assert shown["chunks_served"] == 9 and shown["download_bytes_per_sec"] == 4_000_000
    assert shown["reputation"] == pytest.approx(shown["success_rate"] * shown["uptime_factor"])
    assert _cli(seeded, "peers", "show", "peer-3").exit_code == 0


def test_an_unknown_peer_or_content_is_one_line_and_exit_1(seeded: str) -> None:
    for args in (("peers", "show", "ghost"), ("content", "show", "ghost")):
        result = _cli(seeded, *args)
        assert result.exit_code == 1
        assert result.stderr.strip().splitlines() == [f"error: no {args[0].rstrip('s')} 'ghost' is known"]


def test_content_show_ranks_the_online_holders_without_taking_leases(seeded: str) -> None:
    shown = json.loads(_cli(seeded, "content", "show", "cid-1", "--json").stdout)
    assert shown["replication_factor"] == 4
    # ISO 8601 with a T, as peers show and the HTTP API write times ("2026-12-05 21:25:21+00:00" before)
    assert (
        datetime.fromisoformat(shown["last_updated"]).isoformat().replace("+00:00", "Z")
        == shown["last_updated"]
    )
    # As the HTTP API writes them: "Z" for UTC (isoformat()'s "+00:00" before, QA round 74).
    peer = json.loads(_cli(seeded, "peers", "show", "peer-3", "--json").stdout)
    assert all(peer[key].endswith("Z") for key in ("last_seen", "first_seen", "online_since"))
    assert shown["peers"][0]["peer_id"] == "peer-3"
    assert json.loads(_cli(seeded, "stats", "--json").stdout)["open_leases"] == 0


def test_content_show_lists_the_best_holders_up_to_its_limit_and_counts_them_all(seeded: str) -> None:
    """50,000 holders took 30 s and 368 MB to lay out as a table (QA round 59): the best 100 by
    default, ``--limit N`` (0: all); the count is always of every online holder."""
    from tracker.cli.content import SHOWN_HOLDERS

    assert SHOWN_HOLDERS == 100
    two = json.loads(_cli(seeded, "content", "show", "cid-1", "--limit", "2", "--json").stdout)
    assert two["replication_factor"] == 4 and [p["peer_id"] for p in two["peers"]] == ["peer-3", "peer-2"]
    every = json.loads(_cli(seeded, "content", "show", "cid-1", "--limit", "0", "--json").stdout)
    assert len(every["peers"]) == 4
    table = _cli(seeded, "content", "show", "cid-1", "--limit", "2")
    assert "cid-1: 4 online holders, the best 2 shown (--limit)" in table.stdout
    assert "4 online holders, the best" not in _cli(seeded, "content", "show", "cid-1").stdout
    assert _cli(seeded, "content", "show", "cid-1", "--limit", "-1").exit_code == 2


def test_best_picks_and_leases_and_rejects_an_unknown_strategy(seeded: str) -> None:
    best = json.loads(_cli(seeded, "best", "cid-1", "-n", "2", "--json").stdout)
    assert [p["peer_id"] for p in best["peers"]] == ["peer-3", "peer-2"]
    assert (best["strategy"], best["lease_ttl_s"]) == ("best", 60.0)  # as GET .../best answers
    assert all("T" in p["last_seen"] for p in best["peers"])
    assert json.loads(_cli(seeded, "stats", "--json").stdout)["open_leases"] == 2
    bad = _cli(seeded, "best", "cid-1", "--strategy", "cheapest")  # a usage error, like -n 0
    assert bad.exit_code == 2 and "'cheapest' is not one of" in " ".join(bad.stderr.split())
    assert "Traceback" not in bad.output
    assert json.loads(_cli(seeded, "stats", "--json").stdout)["open_leases"] == 2  # nothing selected
    weighted = json.loads(_cli(seeded, "best", "cid-1", "--strategy", "weighted", "--json").stdout)
    assert len(weighted["peers"]) == 3 and weighted["strategy"] == "weighted"


def test_sweep_reports_what_it_did(seeded: str) -> None:
    result = _cli(seeded, "sweep", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ran"] is True and report["peers_marked_offline"] == 0
    assert report["departed_mappings_removed"] == 0
    # Every field docs/sweeper.md lists (future_rows_clamped and now were left out, QA round 59).
    assert report["future_rows_clamped"] == 0
    # A time as every other (Unix seconds before, QA round 74), written as the HTTP API writes times.
    assert (
        report["now"].endswith("Z")
        and abs(datetime.fromisoformat(report["now"]).timestamp() - time.time()) < 600
    )


def test_sweep_whose_snapshot_cannot_be_written_still_expires_and_exits_1(
    seeded: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cron job sees the snapshot fail (exit 1, the reason on stderr), and the pass's other work
    stands."""
    blocker = tmp_path / "snapshots"
    blocker.write_text("a file where the snapshot directory should be")
    monkeypatch.setenv("TRACKER_SNAPSHOT_DIR", str(blocker))
    result = _cli(seeded, "sweep", "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["ran"] is True and str(blocker) in report["snapshot_error"]
    said = result.stderr.replace("\n", "")
    assert said.startswith(f"the snapshot was not written: {report['snapshot_error']}"), said
    assert "error:" not in said and "Exit" not in said, said  # the reason alone: no line for the exit
    # As a process, the sweeper's log line said it first, with a service's retry advice (QA round 59).
    process = subprocess.run(
        [sys.executable, "-m", "tracker", "sweep", "--database-url", seeded],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TRACKER_SNAPSHOT_DIR": str(blocker), "COLUMNS": "500"},
    )
    assert process.returncode == 1
    assert process.stderr.splitlines() == [f"the snapshot was not written: {report['snapshot_error']}"], (
        process.stderr
    )


def test_sweep_after_the_clock_leapt_while_no_tracker_ran_sweeps_on_elapsed_time(db_url: str) -> None:
    """The real clocks end to end: the state a tracker stored under this boot says the wall clock
    read a day less at this elapsed time, i.e. it has been set a day ahead since. Before, `tracker
    sweep` took the new clock at its word and timed out every peer (docs/operations.md, Clocks)."""
    boot = system_boot_id()
    if boot is None:
        # Only Linux names its boots; elsewhere the tracker stores no clock state, so nothing to test.
        pytest.skip("this platform names no boot (no /proc/sys/kernel/random/boot_id)")
    day = 86_400.0

    async def seed() -> None:
        async with AvailabilityTracker(TrackerConfig(database_url=db_url)) as tracker:
            at = time.time() - day  # the peers spoke just now by the clock the host had before
            for peer in ("a", "b"):
                await tracker.record_peer_online(peer, at=at)
                await tracker.record_content_available("cid-1", peer, at=at)
            async with tracker.engine.begin() as conn:
                elapsed = system_elapsed()
                await conn.execute(update(clocks).values(wall=time.time() - day, elapsed=elapsed))

    asyncio.run(seed())
    result = _cli(db_url, "sweep")
    assert result.exit_code == 0, result.output
    assert "0 peers marked offline" in result.stdout and "ahead of elapsed time" in result.stdout
    report = json.loads(_cli(db_url, "sweep", "--json").stdout)
    assert report["peers_marked_offline"] == 0 and report["clock_leap_s"] == pytest.approx(day, abs=30)


def test_gossip_export_writes_a_snapshot_file(seeded: str, tmp_path: Path) -> None:
    result = _cli(seeded, "gossip", "export", "--dir", str(tmp_path), "--json")
    assert result.exit_code == 0, result.output
    path = Path(json.loads(result.stdout)["snapshot"])
    assert path.parent == tmp_path
    lines = gzip.decompress(path.read_bytes()).decode().splitlines()
    assert sum('"peer-3"' in line for line in lines) >= 1


def test_gossip_export_creates_its_directory_as_the_sweeper_does_but_not_over_a_file(
    seeded: str, tmp_path: Path
) -> None:
    """A missing --dir was refused, while the sweeper's snapshot_dir is created (QA round 16)."""
    result = _cli(seeded, "gossip", "export", "--dir", str(tmp_path / "snaps" / "today"), "--json")
    assert result.exit_code == 0, result.output
    assert Path(json.loads(result.stdout)["snapshot"]).parent == tmp_path / "snaps" / "today"
    (tmp_path / "a-file").write_text("")
    refused = _cli(seeded, "gossip", "export", "--dir", str(tmp_path / "a-file"))
    assert refused.exit_code == 1 and "is not a directory" in refused.stderr


def test_db_commands_report_move_and_check_the_schema(empty_pg_url: str, tmp_path: Path) -> None:
    head = head_revision()
    for url in (f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}", empty_pg_url):
        assert _cli(url, "db", "upgrade").exit_code == 0
        assert json.loads(_cli(url, "db", "current", "--json").stdout) == {
            "current": head,
            "head": head,
            "up_to_date": True,
        }
        assert _cli(url, "db", "check").exit_code == 0
        # An upgrade never goes down; it said "schema at <head> (was <head>)" as if done (QA round 59).
        past = _cli(url, "db", "upgrade", "--revision", "0005")
        assert past.exit_code == 0
        assert f"schema at {head} (was {head}); already past 0005: `tracker db downgrade 0005`" in past.stdout
        assert _cli(url, "db", "downgrade", "0003").exit_code == 0
        behind = _cli(url, "db", "check")
        assert behind.exit_code == 1 and "run `tracker db upgrade`" in behind.stderr
        assert _cli(url, "db", "downgrade", "base").exit_code == 0
        assert json.loads(_cli(url, "db", "current", "--json").stdout)["current"] is None
        assert _cli(url, "db", "upgrade").exit_code == 0


def test_a_schema_a_newer_tracker_migrated_is_named_so_by_every_way_in(
    empty_pg_url: str, tmp_path: Path
) -> None:
    """The advice used to be `tracker db upgrade`, which failed ("Can't locate revision"): this
    version has nothing newer. Opening, migrating and checking now all say what happened."""
    for url in (f"sqlite+aiosqlite:///{tmp_path / 'newer.db'}", empty_pg_url):
        assert _cli(url, "db", "upgrade").exit_code == 0
        asyncio.run(_set_revision(url, "0099"))
        for args in (("db", "check"), ("db", "upgrade"), ("db", "downgrade", "0003"), ("stats",)):
            result = _cli(url, *args)
            assert result.exit_code == 1, (args, result.output)
            assert "revision 0099, which this version of the tracker does not know" in result.stderr
            assert "a newer version migrated it" in result.stderr and "Can't locate" not in result.stderr
        current = _cli(url, "db", "current")
        assert current.exit_code == 0 and "unknown to this tracker" in current.stdout
        for auto_migrate in (True, False):
            config = TrackerConfig(database_url=url, auto_migrate=auto_migrate)
            with pytest.raises(SchemaOutOfDate, match="a newer version migrated it"):
                asyncio.run(AvailabilityTracker.open(config))
        # Another application's Alembic history: no advice to downgrade with a newer tracker (QA round 62).
        asyncio.run(_set_revision(url, "3f2a9c1b7d4e"))
        for args in (("db", "check"), ("db", "upgrade"), ("stats",)):
            result = _cli(url, *args)
            assert result.exit_code == 1, (args, result.output)
            assert "3f2a9c1b7d4e, which is not a revision of the tracker" in result.stderr, result.stderr
            assert "another application's database" in result.stderr and "downgrade" not in result.stderr
        asyncio.run(_set_revision(url, head_revision()))
        assert _cli(url, "db", "check").exit_code == 0  # nothing else was touched


def test_the_trackers_tables_without_a_revision_are_not_taken_for_an_empty_database(
    empty_pg_url: str, tmp_path: Path
) -> None:
    """A partial restore or an `alembic stamp base`: "empty (no schema)", and an upgrade failed on
    "table tracker_nodes already exists" (QA round 62). Every way in now says what is wrong."""
    for url in (f"sqlite+aiosqlite:///{tmp_path / 'unstamped.db'}", empty_pg_url):
        assert _cli(url, "db", "upgrade").exit_code == 0
        asyncio.run(_delete_revision(url))
        for args in (("db", "current"), ("db", "check"), ("db", "upgrade"), ("stats",)):
            result = _cli(url, *args)
            assert result.exit_code == 1, (args, result.output)
            assert "holds tables named as the tracker's (" in result.stderr, (args, result.stderr)
            assert "but no schema revision" in result.stderr and "already exists" not in result.stderr
        with pytest.raises(SchemaOutOfDate, match="alembic stamp REVISION"):
            asyncio.run(AvailabilityTracker.open(TrackerConfig(database_url=url)))
        asyncio.run(_delete_revision(url, restore=head_revision()))  # what `alembic stamp` does
        assert _cli(url, "db", "check").exit_code == 0


async def _delete_revision(url: str, *, restore: str | None = None) -> None:
    engine = create_engine(TrackerConfig(database_url=url))
    try:
        async with engine.begin() as conn:
            await conn.execute(text("DELETE FROM alembic_version"))
            if restore is not None:
                await conn.execute(text("INSERT INTO alembic_version VALUES (:r)"), {"r": restore})
    finally:
        await engine.dispose()


def test_db_check_names_a_schema_changed_by_hand_at_the_newest_revision(
    empty_pg_url: str, tmp_path: Path
) -> None:
    """An index dropped, a column added NOT NULL: the revision stayed at head and `db check` said "up
    to date" while every insert failed, and the storage error's advice pointed to `db check` (QA
    round 62). An index of the operator's own is no difference."""
    for url in (f"sqlite+aiosqlite:///{tmp_path / 'altered.db'}", empty_pg_url):
        assert _cli(url, "db", "upgrade").exit_code == 0
        asyncio.run(
            _execute(
                url,
                "CREATE INDEX ix_operators_own ON peers (first_seen)",
                "DROP INDEX ix_content_peers_peer",
                "ALTER TABLE peers ADD COLUMN region INTEGER NOT NULL DEFAULT 0",
                "DROP VIEW under_replicated_content",
                # QA round 65: a partial unique index without its condition, an operator's unique
                # index: each refuses rows the tracker writes, and `db check` said "up to date".
                "DROP INDEX uq_tracker_nodes_local",
                "CREATE UNIQUE INDEX uq_tracker_nodes_local ON tracker_nodes (is_local)",
                "CREATE UNIQUE INDEX ops_one_per_node ON peer_stats (node_id)",
                *(
                    [
                        "ALTER TABLE peers ALTER COLUMN draw SET DEFAULT 1",
                        "ALTER TABLE peers ADD CONSTRAINT ops_no_rows CHECK (false) NOT VALID",
                    ]
                    if "postgresql" in url
                    else []
                ),
            )
        )
        result = _cli(url, "db", "check")
        assert result.exit_code == 1, result.output
        line = result.stderr.strip()
        assert line.startswith(
            f"error: schema at {head_revision()}, but not the schema {head_revision()} makes: "
        )
        for difference in (
            "index ix_content_peers_peer on content_peers is missing",
            "column peers.region is not the tracker's",
            "view under_replicated_content is missing",
            "index uq_tracker_nodes_local on tracker_nodes: condition none, the tracker's is_local",
            "unique index ops_one_per_node on peer_stats is not the tracker's",
        ):
            assert difference in result.stderr, result.stderr
        if "postgresql" in url:
            for difference in (
                "column peers.draw: default 1, the tracker's 0",
                "check constraint ops_no_rows on peers is not the tracker's",
            ):
                assert difference in result.stderr, result.stderr
        assert "Warning" not in result.stderr, result.stderr
        assert "ix_operators_own" not in line and "\n" not in line


def test_db_check_names_a_key_column_put_back_in_the_databases_collation(empty_pg_url: str) -> None:
    """Alembic compares no collation it reflects as the database's default: content_key put back in
    it (by hand, a revision stamped rather than run) passed the check while cids sorted as before
    0018 (QA round 77)."""
    assert _cli(empty_pg_url, "db", "upgrade").exit_code == 0
    asyncio.run(
        _execute(
            empty_pg_url,
            "DROP VIEW under_replicated_content",
            "DROP VIEW content_replication",
            'ALTER TABLE contents ALTER COLUMN content_key TYPE varchar(256) COLLATE "default"',
        )
    )
    result = _cli(empty_pg_url, "db", "check")
    assert result.exit_code == 1, result.output
    assert (
        'column contents.content_key is in collation the database default, not "C": its ids sort by '
        "the database's rules, not by code point"
    ) in result.stderr, result.stderr
    assert "peer_key" not in result.stderr


def test_db_check_names_an_analytics_view_whose_definition_was_changed(
    empty_pg_url: str, tmp_path: Path
) -> None:
    """A view replaced by hand (`peer_scores` counting differently, say) passed `db check`, while
    operators' analytics read it (QA round 65). The same definition written out differently (line
    breaks, case) is no difference."""
    for url in (f"sqlite+aiosqlite:///{tmp_path / 'views.db'}", empty_pg_url):
        assert _cli(url, "db", "upgrade").exit_code == 0
        dialect = "postgresql" if "postgresql" in url else "sqlite"
        statement = dict(drift._view_statements(dialect))["under_replicated_content"]
        rewritten = " ".join(statement.split()).replace("SELECT", "select").replace("FROM", "\n  from")
        asyncio.run(_execute(url, "DROP VIEW under_replicated_content", rewritten))
        result = _cli(url, "db", "check")
        assert result.exit_code == 0, result.output
        assert result.stdout.strip() == f"schema at {head_revision()}: up to date"
        changed = statement.replace("WHERE cr.online_holders < t.value", "WHERE cr.online_holders <= t.value")
        assert changed != statement
        asyncio.run(_execute(url, "DROP VIEW under_replicated_content", changed))
        result = _cli(url, "db", "check")
        assert result.exit_code == 1, result.output
        assert "view under_replicated_content: not the definition the migrations make" in result.stderr
        assert "peer_scores" not in result.stderr and "content_replication:" not in result.stderr


def test_db_check_without_the_temporary_privilege_checks_the_rest_and_says_the_views_were_not(
    empty_pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Postgres compares views through temporary ones: a role that may not make them still gets the
    rest of the check, and a warning, not an error."""
    assert _cli(empty_pg_url, "db", "upgrade").exit_code == 0
    role = f"tracker_notemp_{uuid.uuid4().hex[:8]}"
    database = make_url(empty_pg_url).database
    asyncio.run(
        _execute(
            empty_pg_url,
            f'REVOKE TEMPORARY ON DATABASE "{database}" FROM PUBLIC',
            f"CREATE ROLE {role} LOGIN",
            f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}",
        )
    )
    try:
        as_role = make_url(empty_pg_url).set(username=role).render_as_string(hide_password=False)
        result = _cli(as_role, "db", "check")
        assert result.exit_code == 0, result.output
        assert result.stdout.strip() == f"schema at {head_revision()}: up to date"
        assert "the analytics views' definitions were not compared: permission denied" in caplog.text
        asyncio.run(_execute(empty_pg_url, "DROP INDEX ix_content_peers_peer"))
        result = _cli(as_role, "db", "check")
        assert (
            result.exit_code == 1
            and "index ix_content_peers_peer on content_peers is missing" in result.stderr
        )
    finally:
        asyncio.run(_execute(empty_pg_url, f"DROP OWNED BY {role}", f"DROP ROLE {role}"))


async def _execute(url: str, *statements: str) -> None:
    engine = create_engine(TrackerConfig(database_url=url))
    try:
        async with engine.begin() as conn:
            for statement in statements:
                await conn.execute(text(statement))
    finally:
        await engine.dispose()


async def _set_revision(url: str, revision: str | None) -> None:
    engine = create_engine(TrackerConfig(database_url=url))
    try:
        async with engine.begin() as conn:
            await conn.execute(text("UPDATE alembic_version SET version_num = :r"), {"r": revision})
    finally:
        await engine.dispose()


def test_downgrade_needs_an_explicit_revision(tmp_path: Path) -> None:
    result = _cli(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}", "db", "downgrade")
    assert result.exit_code == 2
    assert "Missing argument" in result.output


def test_read_commands_do_not_create_a_missing_sqlite_file(tmp_path: Path) -> None:
    missing = tmp_path / "typo.db"
    for args in (("stats",), ("peers", "list"), ("best", "cid"), ("db", "check")):
        result = _cli(f"sqlite+aiosqlite:///{missing}", *args)
        assert result.exit_code == 1, args
        assert "no database at" in result.stderr
    assert not missing.exists()


def test_best_runs_as_a_real_process(seeded: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tracker", "best", "cid-1", "-n", "1", "--json", "--database-url", seeded],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert [p["peer_id"] for p in json.loads(result.stdout)["peers"]] == ["peer-3"]


def test_tables_keep_whole_peer_ids_when_stdout_is_a_pipe(db_url: str) -> None:
    long_id = "peer-" + "x" * 200  # Rich cut this to "peer-xx…" at its default 80 columns

    async def seed() -> None:
        async with AvailabilityTracker(TrackerConfig(database_url=db_url)) as tracker:
            await tracker.record_peer_online(long_id)
            await tracker.record_content_available("cid-long", long_id)

    asyncio.run(seed())
    env = {key: value for key, value in os.environ.items() if key != "COLUMNS"}
    for command in (["peers", "list"], ["content", "show", "cid-long"]):
        result = subprocess.run(
            [sys.executable, "-m", "tracker", *command, "--database-url", db_url],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert result.returncode == 0, result.stderr
        assert long_id in result.stdout, result.stdout


def test_the_demo_table_keeps_every_column_when_stdout_is_a_pipe(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key != "COLUMNS"}
    swarm = ["--peers", "50", "--contents", "10", "--show", "1", "--database", str(tmp_path / "demo.db")]
    result = subprocess.run(
        [sys.executable, "-m", "tracker", "demo", *swarm],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    header = next(line for line in result.stdout.splitlines() if "Rank" in line)
    assert header.rstrip().endswith("┃") and "Load" in header, result.stdout  # not cut at 80 columns


def test_commands_leave_the_settings_the_serving_tracker_published(db_url: str) -> None:
    """The analytics views compute with tracker_settings; a CLI call with another configuration (here
    the defaults) rewrote them, so the views disagreed with the running server until it restarted."""

    async def serve_and_read() -> dict[str, float]:
        config = TrackerConfig(
            database_url=db_url, peer_timeout=900, replication_target=5, min_reputation=0.4
        )
        async with AvailabilityTracker(config) as tracker:
            await tracker.record_peer_online("p")
            await tracker.record_content_available("c", "p")
        return await read()

    async def read() -> dict[str, float]:
        async with AvailabilityTracker(TrackerConfig(database_url=db_url), publish_settings=False) as tracker:
            async with tracker.engine.connect() as conn:
                rows = await conn.execute(text("SELECT name, value FROM tracker_settings"))
                return {name: value for name, value in rows}

    published = asyncio.run(serve_and_read())
    assert (published["peer_timeout_s"], published["replication_target"]) == (900, 5)
    assert published["min_reputation"] == 0.4
    for command in (
        ["stats"],
        ["peers", "list"],
        ["content", "show", "c"],
        ["best", "c"],
        ["sweep"],
    ):
        result = _cli(db_url, *command)
        assert result.exit_code == 0, (command, result.output)
    assert asyncio.run(read()) == published

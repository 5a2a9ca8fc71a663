"""``tracker demo``: the command line, its output, its errors, and the synthetic swarm behind it."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from tracker import AvailabilityTracker, TrackerConfig
from tracker.cli import app, format_speed
from tracker.demo import SwarmSpec, plan_swarm
from tracker.errors import InvalidInput
from tracker.events import ContentAvailable, PeerOffline

SMALL = ["--peers", "50", "--contents", "100"]
NOW = 1_800_000_000.0


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(app, list(args), env=env)


def run_json(database: Path, *args: str) -> dict[str, Any]:
    result = run("demo", "--database", str(database), *SMALL, "--json", *args)
    assert result.exit_code == 0, result.output
    payload: dict[str, Any] = json.loads(result.stdout)
    return payload


def ranking(payload: dict[str, Any]) -> list[tuple[str, list[tuple[int, str]]]]:
    """What a seed determines: which peers rank where (timestamps and timings follow the real clock)."""
    return [(c["cid"], [(p["rank"], p["peer_id"]) for p in c["peers"]]) for c in payload["contents"]]


def count_rows(database: Path, table: str) -> int:
    with closing(sqlite3.connect(database)) as conn:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


# -- the command ----------------------------------------------------------------------------------


def test_tracker_lists_demo_as_a_subcommand() -> None:
    result = run("--help")
    assert result.exit_code == 0
    assert "demo" in result.stdout


def test_version_names_the_installed_package() -> None:
    from tracker import __version__

    result = run("--version")
    assert result.exit_code == 0 and result.stdout == f"peer-tracker {__version__}\n"
    assert __version__ != "0+unknown"  # installed (pip install -e .), not a bare checkout


@pytest.mark.parametrize("port", ["70000", "-1"])
def test_a_port_out_of_range_is_a_usage_error_like_any_mistyped_value(port: str) -> None:
    """It exited 1 from the service's own check, where README says mistyped values exit 2 (QA 59)."""
    result = run("serve", "--port", port)
    assert result.exit_code == 2 and "Invalid value for '--port'" in result.output


def test_demo_help_shows_an_example() -> None:
    result = run("demo", "--help")
    assert result.exit_code == 0
    assert "tracker demo --peers" in result.stdout


def test_demo_prints_a_table_of_ranked_peers_per_content(tmp_path: Path) -> None:
    database = tmp_path / "demo.db"
    result = run("demo", "--database", str(database), *SMALL, "--show", "2", "-n", "3")
    assert result.exit_code == 0, result.output
    out = result.stdout
    for header in ("Rank", "Peer", "Reputation", "Success", "Uptime", "Speed", "Evidence"):
        assert header in out
    assert "cid-00000: best" in out and "cid-00001: best" in out and "cid-00002" not in out
    assert "│    1 │ peer-" in out
    assert "B/s" in out
    assert "50 peers, 100 contents, 500 mappings" in out
    assert database.exists()


def test_demo_loads_a_peer_holding_more_contents_than_a_batch_may_name_of_one_peer(tmp_path: Path) -> None:
    """One peer's 2,000 announcements in a batch of 5,000 were refused once a batch held at most
    max_events_per_peer (1,000) events of one peer (QA round 58): the demo cuts its batches there."""
    result = run(
        "demo", "--database", str(tmp_path / "d.db"), "--peers", "1", "--contents", "2000", "--holders", "1"
    )
    assert result.exit_code == 0, result.output
    assert "1 peers, 2,000 contents, 2,000 mappings: 2,015 events recorded" in result.stdout


@pytest.mark.parametrize("option", ["--peers", "--contents"])
def test_demo_refuses_a_swarm_larger_than_it_can_plan_in_memory(tmp_path: Path, option: str) -> None:
    """``--peers 2000000000`` planned the swarm in memory until the kernel's OOM killer ended it at
    23.6 GB, with other processes (QA round 59): a usage error now, before any planning."""
    result = run("demo", "--database", str(tmp_path / "d.db"), option, "1000001")
    assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output
    assert not (tmp_path / "d.db").exists()


def test_demo_refuses_more_mappings_than_it_can_plan_in_memory(tmp_path: Path) -> None:
    """A million contents of 1,000 holders each passed the per-option bounds: ~143 GB (QA round 61)."""
    result = run(
        "demo",
        "--database",
        str(tmp_path / "d.db"),
        "--peers",
        "1000",
        "--contents",
        "1000000",
        "--holders",
        "1000",
    )
    assert result.exit_code == 2 and "1,000,000,000 mappings" in " ".join(result.output.split())
    assert not (tmp_path / "d.db").exists()


def test_demo_json_gives_n_peers_per_content_best_first(tmp_path: Path) -> None:
    payload = run_json(tmp_path / "demo.db", "--holders", "8", "--show", "5", "-n", "3")
    summary = payload["summary"]
    assert (summary["peers"], summary["contents"], summary["mappings"]) == (50, 100, 800)
    assert summary["events"] > summary["mappings"] and summary["events_per_sec"] > 0
    assert [c["cid"] for c in payload["contents"]] == [f"cid-{i:05d}" for i in range(5)]
    for content in payload["contents"]:
        peers = content["peers"]
        assert [p["rank"] for p in peers] == [1, 2, 3]
        reputations = [p["reputation"] for p in peers]
        assert reputations == sorted(reputations, reverse=True)
        assert len({p["peer_id"] for p in peers}) == 3
        assert content["holders_online"] >= 3
        assert all(0.0 <= p["reputation"] <= 1.0 and p["download_bytes_per_sec"] > 0 for p in peers)


def test_demo_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    first = run_json(tmp_path / "a.db", "--seed", "7")
    second = run_json(tmp_path / "b.db", "--seed", "7")
    other = run_json(tmp_path / "c.db", "--seed", "8")
    assert ranking(first) == ranking(second)
    assert first["summary"]["events"] == second["summary"]["events"]
    assert ranking(first) != ranking(other)


def test_demo_recreates_the_database_on_every_run(tmp_path: Path) -> None:
    database = tmp_path / "demo.db"
    run_json(database)
    samples = count_rows(database, "bandwidth_samples")
    Path(f"{database}-wal").write_bytes(b"stale")  # a leftover of a crashed run must not be replayed
    run_json(database)
    assert count_rows(database, "bandwidth_samples") == samples
    assert count_rows(database, "peers") == 50


def test_demo_shows_a_progress_bar_on_a_terminal_and_keeps_stdout_clean(tmp_path: Path) -> None:
    result = run(
        "demo", "--database", str(tmp_path / "demo.db"), *SMALL, "--json", env={"TTY_COMPATIBLE": "1"}
    )
    assert result.exit_code == 0, result.output
    assert "Recording events" in result.stderr
    assert json.loads(result.stdout)["summary"]["peers"] == 50


# -- errors ----------------------------------------------------------------------------------------


def test_invalid_input_is_one_line_on_stderr_and_exit_code_1(tmp_path: Path) -> None:
    result = run("demo", "--database", str(tmp_path / "demo.db"), "--peers", "3", "--holders", "5")
    assert result.exit_code == 1
    assert result.stdout == ""
    message = "error: holders (5) cannot exceed peers (3): each content needs distinct holders"
    assert result.stderr.splitlines() == [message]


def test_debug_lets_the_error_through_with_its_traceback(tmp_path: Path) -> None:
    result = run("demo", "--database", str(tmp_path / "demo.db"), "--peers", "3", "--holders", "5", "--debug")
    assert result.exit_code == 1
    assert isinstance(result.exception, InvalidInput)


def test_demo_refuses_to_replace_a_file_that_is_not_sqlite(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("precious\n")
    result = run("demo", "--database", str(notes), *SMALL)
    assert result.exit_code == 1
    assert "not an SQLite database" in result.stderr
    assert notes.read_text() == "precious\n"


def test_demo_refuses_to_replace_a_database_it_did_not_create(tmp_path: Path) -> None:
    """A tracker's own database is SQLite too: the demo deleted it, WAL included (QA round 6)."""
    database = tmp_path / "tracker.db"

    async def write() -> None:
        config = TrackerConfig(database_url=f"sqlite+aiosqlite:///{database}")
        async with AvailabilityTracker(config) as tracker:
            await tracker.record_peer_online("keep-me")

    asyncio.run(write())
    result = run("demo", "--database", str(database), *SMALL)
    assert result.exit_code == 1
    assert "the demo did not create" in result.stderr
    assert count_rows(database, "peers") == 1


_HOLD_OPEN = """
import asyncio, sys
from tracker import AvailabilityTracker, TrackerConfig

async def main() -> None:
    async with AvailabilityTracker(TrackerConfig(database_url=sys.argv[1])) as tracker:
        await tracker.record_peer_online("written-by-the-service")
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)

asyncio.run(main())
"""


def test_demo_refuses_to_replace_its_database_while_another_process_has_it_open(tmp_path: Path) -> None:
    """Deleted under a running ``tracker serve``, the file lived on in that process, which answered
    reads from it and wrote into the new demo's file (QA round 74); two demos at once did the same."""
    database = tmp_path / "demo.db"
    assert run("demo", "--database", str(database), *SMALL).exit_code == 0
    with subprocess.Popen(
        [sys.executable, "-c", _HOLD_OPEN, f"sqlite+aiosqlite:///{database}"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as holder:
        assert holder.stdin is not None and holder.stdout is not None
        try:
            assert holder.stdout.readline().strip() == "ready"
            result = run("demo", "--database", str(database), *SMALL)
            assert result.exit_code == 1
            assert "another process has it open" in " ".join(result.stderr.split())
            assert count_rows(database, "peers") == 51  # the demo's 50 and the service's one, in place
        finally:
            holder.stdin.close()
            assert holder.wait(timeout=30) == 0
    assert run("demo", "--database", str(database), *SMALL).exit_code == 0  # closed: replaced
    assert count_rows(database, "peers") == 50


def test_demo_replaces_its_own_damaged_database(tmp_path: Path) -> None:
    """Its check for other processes read SQLite's "malformed" as an error and refused to rebuild the
    file, which it replaced before that check came (QA round 75)."""
    database = tmp_path / "demo.db"
    assert run("demo", "--database", str(database), *SMALL).exit_code == 0
    damaged = bytearray(database.read_bytes())
    damaged[100:4096] = b"\xff" * (4096 - 100)  # page 1 past the header (and its application id)
    database.write_bytes(bytes(damaged))
    result = run("demo", "--database", str(database), *SMALL)
    assert result.exit_code == 0, result.output
    assert count_rows(database, "peers") == 50


def test_demo_names_a_missing_directory(tmp_path: Path) -> None:
    result = run("demo", "--database", str(tmp_path / "missing" / "demo.db"), *SMALL)
    assert result.exit_code == 1
    assert "does not exist" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_python_m_tracker_demo_runs_in_a_real_process(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "tracker", "demo", "--peers", "30", "--contents", "50", "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    payload = json.loads(completed.stdout)
    assert payload["summary"]["peers"] == 30
    assert payload["contents"] and all(c["peers"] for c in payload["contents"])
    assert (tmp_path / "tracker-demo.db").exists()


# -- the pieces ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bytes_per_sec", "shown"),
    [(0, "0 B/s"), (640, "640 B/s"), (999_990, "1.0 MB/s"), (2_500_000, "2.5 MB/s"), (3e9, "3.0 GB/s")],
)
def test_format_speed_uses_decimal_units(bytes_per_sec: float, shown: str) -> None:
    assert format_speed(bytes_per_sec) == shown


def test_planned_swarm_is_oldest_first_within_the_last_hour() -> None:
    spec = SwarmSpec(peers=40, contents=60, holders=4, seed=3)
    events = plan_swarm(spec, NOW).events
    times = [e.at for e in events]
    assert all(t is not None and NOW - spec.history_s <= t <= NOW for t in times)
    assert times == sorted(times)  # type: ignore[type-var]


def test_planned_swarm_never_revives_a_peer_after_its_goodbye() -> None:
    events = plan_swarm(SwarmSpec(peers=100, contents=200, holders=5, seed=11), NOW).events
    gone = [e.peer_id for e in events if isinstance(e, PeerOffline)]
    assert len(gone) == 10
    for peer in gone:
        own = [e for e in events if e.peer_id == peer]
        assert isinstance(own[-1], PeerOffline)


def test_planned_swarm_gives_each_content_distinct_holders() -> None:
    swarm = plan_swarm(SwarmSpec(peers=10, contents=30, holders=10, seed=5), NOW)
    assert swarm.mappings == 300
    holders: dict[str, set[str]] = {}
    for event in swarm.events:
        if isinstance(event, ContentAvailable):
            holders.setdefault(event.cid, set()).add(event.peer_id)
    assert len(holders) == 30 and all(len(h) == 10 for h in holders.values())


def test_swarm_spec_rejects_more_holders_than_peers() -> None:
    with pytest.raises(InvalidInput, match="holders"):
        SwarmSpec(peers=2, holders=3)

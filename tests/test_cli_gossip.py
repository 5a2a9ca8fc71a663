"""``tracker gossip import`` and ``tracker gossip push``, by the runner and against a real server."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from pathlib import Path

import httpx
import pytest
from gossip_helpers import KEY
from test_cli_commands import _cli, runner
from test_serve import Server

from tracker import AvailabilityTracker, TrackerConfig
from tracker.cli import app
from tracker.gossip import importer
from tracker.state_export import write_state_snapshot


def _seed(url: str, prefix: str, successes: int) -> None:
    async def seed() -> None:
        async with AvailabilityTracker(TrackerConfig(database_url=url)) as tracker:
            for i in range(3):
                peer = f"{prefix}-{i}"
                await tracker.record_peer_online(peer)
                await tracker.record_content_available("cid-1", peer)
                await tracker.record_download_speed(peer, 1_000_000 * (i + 1))
                for _ in range(successes):
                    await tracker.record_upload_success(peer)

    asyncio.run(seed())


def _served(url: str, peer: str) -> int | None:
    async def read() -> int | None:
        async with AvailabilityTracker(TrackerConfig(database_url=url)) as tracker:
            metrics = await tracker.get_peer_metrics(peer)
            return None if metrics is None else metrics.chunks_served

    return asyncio.run(read())


def test_import_merges_a_snapshot_once_and_refuses_a_truncated_one(db_url: str, tmp_path: Path) -> None:
    source = f"sqlite+aiosqlite:///{tmp_path / 'source.db'}"
    _seed(source, "src", 4)
    exported = _cli(source, "gossip", "export", "--dir", str(tmp_path), "--json")
    path = Path(json.loads(exported.stdout)["snapshot"])

    first = _cli(db_url, "gossip", "import", str(path), "--json")
    assert first.exit_code == 0, first.output
    report = json.loads(first.stdout)
    assert (report["peers_read"], report["peers_applied"], report["mappings_applied"]) == (3, 3, 3)
    assert _served(db_url, "src-2") == 4
    again = json.loads(_cli(db_url, "gossip", "import", str(path), "--json").stdout)
    assert (again["peers_applied"], again["mappings_applied"]) == (0, 0)
    plain = _cli(db_url, "gossip", "import", str(path))  # no bar, nor a blank line, outside a terminal
    assert plain.exit_code == 0 and plain.stderr == "" and plain.stdout.startswith("read 3 peer rows")

    lines = gzip.decompress(path.read_bytes()).splitlines(keepends=True)
    truncated = tmp_path / "truncated.jsonl.gz"
    truncated.write_bytes(gzip.compress(b"".join(lines[:-1])))
    _seed(f"sqlite+aiosqlite:///{tmp_path / 'other.db'}", "other", 1)
    bad = _cli(f"sqlite+aiosqlite:///{tmp_path / 'other.db'}", "gossip", "import", str(truncated))
    assert bad.exit_code == 1 and "truncated" in bad.output and "Traceback" not in bad.output
    assert _served(f"sqlite+aiosqlite:///{tmp_path / 'other.db'}", "src-0") is None


def test_push_exchanges_both_ways_with_a_running_server(db_url: str, tmp_path: Path) -> None:
    remote = f"sqlite+aiosqlite:///{tmp_path / 'remote.db'}"
    _seed(remote, "remote", 2)
    _seed(db_url, "local", 5)
    server = Server(remote, tmp_path / "serve.log", env={"TRACKER_GOSSIP_KEYS": KEY})
    try:
        server.wait_ready()
        missing = runner.invoke(app, ["gossip", "push", server.base_url, "--database-url", db_url])
        assert missing.exit_code == 1 and "TRACKER_GOSSIP_KEYS" in missing.output
        result = runner.invoke(
            app,
            ["gossip", "push", server.base_url, "--database-url", db_url, "--json"],
            env={"TRACKER_GOSSIP_KEYS": KEY},
        )
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["rows_applied"] >= 3 and report["rows_sent"] >= 3
        assert _served(db_url, "remote-1") == 2  # pulled
        peer = httpx.get(f"{server.base_url}/v1/peers/local-1", timeout=5)
        assert peer.status_code == 200, peer.text  # pushed
        wrong = runner.invoke(
            app,
            ["gossip", "push", server.base_url, "--database-url", db_url],
            env={"TRACKER_GOSSIP_KEYS": "not-the-shared-key-at-all"},
        )
        assert wrong.exit_code == 1 and "401" in wrong.output
    finally:
        assert server.stop() == 0


def test_import_refuses_a_snapshot_with_rows_from_the_future_and_imports_nothing(
    db_url: str, tmp_path: Path
) -> None:
    source = f"sqlite+aiosqlite:///{tmp_path / 'source.db'}"
    _seed(source, "src", 2)
    exported = _cli(source, "gossip", "export", "--dir", str(tmp_path), "--json")
    path = Path(json.loads(exported.stdout)["snapshot"])
    records = [json.loads(line) for line in gzip.decompress(path.read_bytes()).splitlines()]
    for record in records:
        if record.get("t") == "peer" and record["peer"] == "src-1":
            record["last_seen"] = 1e12  # what a glitched exporter (or a hand edit) writes
    future = tmp_path / "future.jsonl.gz"
    future.write_bytes(gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in records)))

    refused = _cli(db_url, "gossip", "import", str(future))
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert "peer src-1" in refused.output and "ahead of this tracker's clock" in refused.output
    assert _served(db_url, "src-0") is None  # nothing of the file, not even the valid rows


def test_import_refuses_a_snapshot_older_than_removals_are_remembered_unless_accepted(
    db_url: str, tmp_path: Path
) -> None:
    """A mapping removed after the snapshot was taken, its removal forgotten since, came back as held
    (QA round 14); such a snapshot is now refused unless the operator accepts it."""
    source = f"sqlite+aiosqlite:///{tmp_path / 'source.db'}"
    _seed(source, "src", 1)
    exported = _cli(source, "gossip", "export", "--dir", str(tmp_path), "--json")
    path = Path(json.loads(exported.stdout)["snapshot"])
    records = [json.loads(line) for line in gzip.decompress(path.read_bytes()).splitlines()]
    keep_s = TrackerConfig(database_url=db_url).tombstone_keep_s
    records[0]["taken_at"] = time.time() - keep_s - 3600  # the header: a backup kept too long
    old = tmp_path / "old.jsonl.gz"
    old.write_bytes(gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in records)))

    refused = _cli(db_url, "gossip", "import", str(old))
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert "longer ago than removals are remembered" in refused.output and "--accept-old" in refused.output
    assert _served(db_url, "src-0") is None

    accepted = _cli(db_url, "gossip", "import", str(old), "--accept-old", "--json")
    assert accepted.exit_code == 0, accepted.output
    assert json.loads(accepted.stdout)["mappings_applied"] == 3
    assert _served(db_url, "src-0") == 1


def test_a_refused_snapshot_leaves_no_new_database_behind(tmp_path: Path) -> None:
    """``gossip import`` creates and migrates the database it imports into; it did so before it read
    the file, so a snapshot refused as too old, or a file that is no snapshot, left a new empty
    database behind (QA round 56). The file is checked first now."""
    source = f"sqlite+aiosqlite:///{tmp_path / 'source.db'}"
    _seed(source, "src", 1)
    exported = _cli(source, "gossip", "export", "--dir", str(tmp_path), "--json")
    records = [
        json.loads(line)
        for line in gzip.decompress(Path(json.loads(exported.stdout)["snapshot"]).read_bytes()).splitlines()
    ]
    records[0]["taken_at"] = time.time() - TrackerConfig().tombstone_keep_s - 3600
    old = tmp_path / "old.jsonl.gz"
    old.write_bytes(gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in records)))
    not_one = tmp_path / "notes.jsonl.gz"
    not_one.write_bytes(gzip.compress(b'{"hello": "world"}\n'))
    for path, said in ((old, "longer ago than removals are remembered"), (not_one, "snapshot")):
        target = tmp_path / f"new-{path.stem}.db"
        refused = _cli(f"sqlite+aiosqlite:///{target}", "gossip", "import", str(path))
        assert refused.exit_code == 1 and said in refused.output and "Traceback" not in refused.output
        assert not target.exists(), path


async def test_an_import_merged_in_parts_gives_what_merged_whole_gives(
    db_url: str, other_db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An origin's rows are merged MERGE_ROWS at a time, in one transaction (whole, they held the
    event loop for seconds: QA round 20); the result must not depend on the size of the parts."""
    source = f"sqlite+aiosqlite:///{tmp_path / 'source.db'}"
    async with AvailabilityTracker(TrackerConfig(database_url=source)) as tracker:
        for i in range(7):
            await tracker.record_peer_online(f"p{i}")
            await tracker.record_download_speed(f"p{i}", 1_000 * (i + 1))
            for cid in ("c1", "c2"):
                await tracker.record_content_available(cid, f"p{i}")
            await tracker.record_upload_success(f"p{i}") if i % 2 else await tracker.record_upload_failure(
                f"p{i}"
            )
        await tracker.record_content_unavailable("c2", "p3")
        path = await write_state_snapshot(tracker, tmp_path / "snaps", tracker.now())

    async def imported(
        url: str, part: int
    ) -> tuple[list[list[object]], list[str], list[str], list[tuple[int, int]]]:
        monkeypatch.setattr(importer, "MERGE_ROWS", part)
        parts: list[tuple[int, int]] = []
        async with AvailabilityTracker(TrackerConfig(database_url=url)) as tracker:
            await importer.import_snapshot(tracker, path, lambda done, total: parts.append((done, total)))
            fields = ("peer_id", "first_seen", "last_seen", "online_since", "download_speed", "online")
            peers = [  # what does not move with the time of reading
                [getattr(p, name) for name in (*fields, "chunks_served", "chunks_failed")]
                for p in await tracker.list_peers(limit=100)
            ]
            return (
                peers,
                await tracker.get_available_peers("c1"),
                await tracker.get_available_peers("c2"),
                parts,
            )

    in_parts, whole = await imported(db_url, 2), await imported(other_db_url, 5_000)
    assert in_parts[:3] == whole[:3] and len(in_parts[0]) == 7
    # Progress counts the 28 records read (7 peers, 7 samples, 14 mappings), then the 7 peers merged:
    # 2 at a time, 14 parts read and 4 merged; whole, one of each.
    assert (len(in_parts[3]), len(whole[3])) == (18, 2)
    assert in_parts[3][-1] == whole[3][-1] == (35, 35) and whole[3][0] == (28, 35)


def test_import_reads_gossips_skew_and_no_other_gossip_setting(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading every gossip setting, an import refused to run for one it does not use (neighbours
    without a key, a bad fanout), though restoring a backup needs none (QA round 48)."""
    source = f"sqlite+aiosqlite:///{tmp_path / 'source.db'}"
    _seed(source, "src", 1)
    exported = _cli(source, "gossip", "export", "--dir", str(tmp_path), "--json")
    path = Path(json.loads(exported.stdout)["snapshot"])
    monkeypatch.setenv("TRACKER_GOSSIP_NEIGHBORS", "http://127.0.0.1:9")
    monkeypatch.setenv("TRACKER_GOSSIP_FANOUT", "0")
    assert _cli(db_url, "gossip", "import", str(path), "--json").exit_code == 0
    monkeypatch.setenv("TRACKER_GOSSIP_MAX_SKEW_S", "soon")
    refused = _cli(db_url, "gossip", "import", str(path))
    assert refused.exit_code == 1 and "TRACKER_GOSSIP_MAX_SKEW_S='soon' is not valid" in refused.output

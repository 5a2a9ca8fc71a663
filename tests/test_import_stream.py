"""The streamed snapshot import: the state a whole-file import left, in memory that does not grow with
the file, on both engines; whatever the order of the file's records; nothing applied from a file that
fails at its very end."""

from __future__ import annotations

import asyncio
import gzip
import json
import math
import random
import threading
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from tracker import AvailabilityTracker, InvalidInput, TrackerConfig, db
from tracker.events import ContentAvailable, ContentUnavailable, PeerOnline, SpeedSample, UploadOutcome
from tracker.gossip import import_reader, importer
from tracker.gossip.files import count_records, read_snapshot, write_snapshot
from tracker.gossip.protocol import MappingState, OriginDelta, PeerState
from tracker.gossip.snapshot import (
    MappingRecord,
    PeerRecord,
    Record,
    SampleRecord,
    SnapshotError,
    SnapshotHeader,
)
from tracker.queries import gossip as q
from tracker.queries.gossip import stash
from tracker.schema import bandwidth_samples, content_peers, contents, nodes, peer_stats, peers
from tracker.state_export import write_state_snapshot
from tracker.testing import ManualClock

T0 = 1_800_000_000.0
SELF = "importing-node"  # the importing trackers' own node key: its rows in a snapshot are skipped


# -- the reference: the whole-file import this module replaced (as of 89a3d51) ---------------------


async def _whole_file_import(tracker: AvailabilityTracker, path: Path) -> importer.ImportReport:
    """Read the whole file, build every state, merge them per origin in one transaction."""
    snap = await read_snapshot(path)
    samples: dict[tuple[str, str], list[tuple[float, int]]] = {}
    for s in snap.samples:
        samples.setdefault((s.origin, s.peer), []).append((s.at, s.bytes_per_sec))
    deltas: dict[str, tuple[list[PeerState], list[MappingState]]] = {}
    window = tracker.config.bandwidth_window
    for p in snap.peers:
        fields = {name: getattr(p, name) for name in stash.PEER_COLUMNS[1:]}
        states = sorted(samples.get((p.origin, p.peer), []), reverse=True)[:window]
        deltas.setdefault(p.origin, ([], []))[0].append(PeerState(**fields, version=0, samples=states))
    for m in snap.mappings:
        deltas.setdefault(m.origin, ([], []))[1].append(import_reader._mapping_state(m))

    async def work(conn: AsyncConnection) -> q.MergeCounts:
        counts = q.MergeCounts()
        for origin, (p, m) in sorted(deltas.items()):
            delta = OriginDelta(origin=origin, base=0, upto=0, peers=p, mappings=m)
            applied = await q.merge(
                conn, tracker.config.dialect, tracker.node_key, [delta], window, tracker.now()
            )
            counts.peers += applied.peers
            counts.mappings += applied.mappings
        return counts

    counts = await db.run_write(tracker.engine, work, tracker.config.write_retries)
    return importer.ImportReport(
        snap.header.node, len(snap.peers), len(snap.mappings), counts.peers, counts.mappings
    )


# -- databases ----------------------------------------------------------------------------------


@asynccontextmanager
async def _importing(url: str) -> AsyncIterator[AvailabilityTracker]:
    """A tracker whose node key is ``SELF``, holding state of its own and of a gossip neighbour that
    the snapshot's rows must merge with (lose to, win over, fill in)."""
    async with AvailabilityTracker(TrackerConfig(database_url=url, clock=ManualClock(T0))) as tracker:
        async with tracker.engine.begin() as conn:
            await conn.execute(update(nodes).where(nodes.c.is_local).values(node_key=SELF))
    async with AvailabilityTracker(TrackerConfig(database_url=url, clock=ManualClock(T0))) as tracker:
        assert tracker.node_key == SELF
        await tracker.record_batch(
            [
                PeerOnline("p0", at=T0 - 50),
                SpeedSample("p0", 7_000, at=T0 - 49),
                ContentAvailable("c0", "p0", at=T0 - 48),
            ]
        )
        await _merge(tracker, "remote-a", 3, ["p1", "p2"], ["c1"], T0 - 30)
        yield tracker


def _peer_state(peer: str, version: int, at: float, samples: int) -> PeerState:
    return PeerState(
        peer=peer,
        first_seen=at - 500,
        online=version % 2 == 0,
        online_since=at - 100 if version % 2 == 0 else None,
        last_seen=at,
        uptime_s=100.0 + version,
        served=3 * version,
        failed=version,
        success_weight=1.5 * version,
        failure_weight=0.25,
        evidence_at=at - 1,
        updated_at=at,
        version=version,
        samples=[(at - k, 1_000 * (k + version)) for k in range(samples)],
    )


async def _merge(
    tracker: AvailabilityTracker, origin: str, version: int, peer_keys: list[str], cids: list[str], at: float
) -> None:
    """Rows of ``origin`` at ``version``, as gossip brings them."""
    mappings = [
        MappingState(
            cid=cid,
            peer=peer,
            available=(i + version) % 3 != 0,  # some removals: tombstones travel too
            since=at - 200,
            last_confirmed=at,
            changed_at=at - i,
            version=version,
        )
        for i, (cid, peer) in enumerate((c, p) for c in cids for p in peer_keys)
    ]
    delta = OriginDelta(
        origin=origin,
        base=0,
        upto=version,
        peers=[_peer_state(p, version, at, samples=3 + version) for p in peer_keys],
        mappings=mappings,
    )
    config = tracker.config

    async def work(conn: AsyncConnection) -> None:
        await q.merge(conn, config.dialect, tracker.node_key, [delta], config.bandwidth_window, tracker.now())

    await db.run_write(tracker.engine, work, config.write_retries)


async def _swarm_snapshot(url: str, directory: Path) -> Path:
    """A source tracker's export: its own origin, two neighbours' and the importing node's rows;
    more samples than the window, removed mappings, outcomes."""
    async with AvailabilityTracker(TrackerConfig(database_url=url, clock=ManualClock(T0))) as tracker:
        events: list[Any] = []
        for i in range(12):
            peer, t = f"p{i}", T0 - 400 + i
            events += [PeerOnline(peer, at=t), ContentAvailable(f"c{i % 4}", peer, at=t)]
            events += [SpeedSample(peer, 1_000 * (k + i), at=t + k) for k in range(14)]
            events += [UploadOutcome(peer, k % 3 != 0, at=t + 20 + k) for k in range(4)]
        await tracker.record_batch(events)
        await tracker.record_batch([ContentUnavailable("c1", "p1", at=T0 - 100)])
        await _merge(tracker, "remote-a", 5, ["p1", "p3", "p20"], ["c1", "c9"], T0 - 20)  # wins over v3
        await _merge(tracker, "remote-a", 1, ["p2"], ["c1"], T0 - 10)  # loses to the importer's v3
        await _merge(tracker, "remote-b", 2, ["p4", "p21", "p22"], ["c0", "c2"], T0 - 60)
        await _merge(tracker, SELF, 4, ["p0", "p5"], ["c0"], T0 - 5)  # the importer's own: skipped
        return await write_state_snapshot(tracker, directory, T0)


async def _dump(tracker: AvailabilityTracker) -> dict[str, list[tuple[Any, ...]]]:
    """Every row an import may touch, by keys instead of ids (ids depend on the order of inserts)."""
    async with tracker.engine.connect() as conn:
        keys = {
            "node_id": await _keys(conn, nodes.c.id, nodes.c.node_key),
            "peer_id": await _keys(conn, peers.c.id, peers.c.peer_key),
            "content_id": await _keys(conn, contents.c.id, contents.c.content_key),
        }
        dump = {}
        for table in (nodes, peers, contents, peer_stats, bandwidth_samples, content_peers):
            rows = (
                await conn.execute(select(table).order_by(table.c.id if "id" in table.c else None))
            ).mappings()
            named = [
                tuple((name, keys[name][v] if name in keys else v) for name, v in row.items() if name != "id")
                for row in rows
            ]
            # Samples by peer in the order they were stored: among equal times, the order ranks them.
            dump[table.name] = (
                sorted(named, key=lambda row: row[:2]) if table is bandwidth_samples else sorted(named)
            )
    return dump


async def _keys(conn: AsyncConnection, id_column: Any, key_column: Any) -> dict[int, str]:
    return {int(i): str(k) for i, k in (await conn.execute(select(id_column, key_column))).all()}


def _lines(path: Path) -> list[bytes]:
    return gzip.decompress(path.read_bytes()).splitlines(keepends=True)


def _rewrite(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(gzip.compress(b"".join(lines)))
    return path


async def _compare(db_url: str, other_db_url: str, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Import ``path`` whole (the reference) into one database and streamed into the other, in
    parts of 3 (many parts, records split across them): same report, same rows."""
    async with _importing(db_url) as tracker:
        before = await _dump(tracker)
        expected = await _whole_file_import(tracker, path)
        whole = await _dump(tracker)
    monkeypatch.setattr(importer, "MERGE_ROWS", 3)
    async with _importing(other_db_url) as tracker:
        assert await _dump(tracker) == before
        report = await importer.import_snapshot(tracker, path)
        streamed = await _dump(tracker)
    assert report == expected
    assert report.peers_applied > 0 and report.mappings_applied > 0
    assert streamed == whole != before


async def test_a_streamed_import_leaves_the_rows_a_whole_file_import_left(
    db_url: str, other_db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = await _swarm_snapshot(f"sqlite+aiosqlite:///{tmp_path / 'source.db'}", tmp_path / "snaps")
    await _compare(db_url, other_db_url, path, monkeypatch)


async def test_records_in_any_order_import_like_the_exporters_order(
    db_url: str, other_db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Samples before their peer, interleaved, more than the window, equal times: the file's order
    is not assumed (a snapshot of another writer, or of a later exporter)."""
    path = await _swarm_snapshot(f"sqlite+aiosqlite:///{tmp_path / 'source.db'}", tmp_path / "snaps")
    header, *records, trailer = _lines(path)
    extra = [
        json.dumps(
            {"t": "sample", "origin": "remote-b", "peer": "p21", "at": T0 - (k + 1) // 2, "bytes_per_sec": k}
        )
        for k in range(25)  # pairs of equal times, one across the window's edge: the higher speed first
    ]
    records += [line.encode() + b"\n" for line in extra]
    random.Random(7).shuffle(records)
    counts = json.loads(trailer)
    counts["samples"] += len(extra)
    shuffled = _rewrite(
        tmp_path / "shuffled.jsonl.gz", [header, *records, json.dumps(counts).encode() + b"\n"]
    )
    await _compare(db_url, other_db_url, shuffled, monkeypatch)


def _future_last(lines: list[bytes]) -> list[bytes]:
    last = json.loads(lines[-2])
    last["last_confirmed"] = T0 + 3600  # the last mapping, after every other row has been merged
    return [*lines[:-2], json.dumps(last).encode() + b"\n", lines[-1]]


def _future_orphan_sample(lines: list[bytes]) -> list[bytes]:
    """A sample dated ahead, of a peer the file has no row for (the whole-file import ignored it)."""
    sample = next(json.loads(line) for line in lines if json.loads(line).get("t") == "sample")
    sample.update(peer="no-such-peer", at=T0 + 3600)
    trailer = json.loads(lines[-1])
    trailer["samples"] += 1
    return [*lines[:-1], json.dumps(sample).encode() + b"\n", json.dumps(trailer).encode() + b"\n"]


def _bad_trailer(lines: list[bytes]) -> list[bytes]:
    trailer = json.loads(lines[-1])
    trailer["mappings"] += 1
    return [*lines[:-1], json.dumps(trailer).encode() + b"\n"]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda lines: lines[:-1], "truncated"),
        (_bad_trailer, "the trailer counts"),
        (_future_last, "ahead of this tracker's clock"),
        (lambda lines: [*lines, b"{}\n"], "data after the end trailer"),
        (_future_orphan_sample, "a speed sample of peer no-such-peer is dated"),
    ],
    ids=["no-trailer", "bad-trailer", "future-row-last", "data-after-trailer", "future-orphan-sample"],
)
async def test_a_file_failing_at_its_end_changes_nothing_though_parts_were_merged(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: Any, message: str
) -> None:
    path = await _swarm_snapshot(f"sqlite+aiosqlite:///{tmp_path / 'source.db'}", tmp_path / "snaps")
    bad = _rewrite(tmp_path / "bad.jsonl.gz", damage(_lines(path)))
    monkeypatch.setattr(importer, "MERGE_ROWS", 2)
    async with _importing(db_url) as tracker:
        before = await _dump(tracker)
        with pytest.raises(SnapshotError, match=message):
            await importer.import_snapshot(tracker, bad)
        assert await _dump(tracker) == before
        # Nothing of the failed attempt is left in the way (its temporary tables went with it).
        assert (await importer.import_snapshot(tracker, path)).peers_applied > 0


async def test_rows_ahead_within_gossips_skew_are_imported_and_beyond_it_refused(
    db_url: str, tmp_path: Path
) -> None:
    """A snapshot's rows are gossip's, which gossip applies up to its max_skew_s (120 s) ahead; the
    import allowed max_clock_skew_s (60 s): a row that gossip had brought from an origin 90 s ahead
    got the relaying tracker's every snapshot refused whole (QA round 42)."""
    path = await _swarm_snapshot(f"sqlite+aiosqlite:///{tmp_path / 'source.db'}", tmp_path / "snaps")

    def last_mapping_at(lines: list[bytes], at: float) -> list[bytes]:
        last = json.loads(lines[-2])
        last["last_confirmed"] = at
        return [*lines[:-2], json.dumps(last).encode() + b"\n", lines[-1]]

    within = _rewrite(tmp_path / "within.jsonl.gz", last_mapping_at(_lines(path), T0 + 90))
    beyond = _rewrite(tmp_path / "beyond.jsonl.gz", last_mapping_at(_lines(path), T0 + 121))
    async with _importing(db_url) as tracker:
        before = await _dump(tracker)
        with pytest.raises(SnapshotError, match=r"dated 121 s ahead .*allowed 120 s, max_skew_s"):
            await importer.import_snapshot(tracker, beyond)
        assert await _dump(tracker) == before
        with pytest.raises(SnapshotError, match=r"allowed 80 s"):
            await importer.import_snapshot(tracker, within, max_skew_s=80)
        for bad in (math.inf, math.nan, -1.0, True):
            with pytest.raises(InvalidInput, match="max_skew_s must be a finite number"):
                await importer.import_snapshot(tracker, within, max_skew_s=bad)
        assert await _dump(tracker) == before
        assert (await importer.import_snapshot(tracker, within)).mappings_applied > 0


async def test_a_corrupt_gzip_file_is_refused_naming_it_even_when_progress_counts_it_first(
    tracker: AvailabilityTracker, tmp_path: Path
) -> None:
    """The count for progress is an estimate and stays quiet; decoding refuses the file."""
    path = await _swarm_snapshot(f"sqlite+aiosqlite:///{tmp_path / 'source.db'}", tmp_path / "snaps")
    records, peers = count_records(path)
    lines = _lines(path)
    assert (records, peers) == (len(lines) - 2, sum(json.loads(line).get("t") == "peer" for line in lines))
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert count_records(cut)[0] < records
    calls: list[tuple[int, int]] = []
    with pytest.raises(SnapshotError, match=r"cut\.jsonl\.gz: .*corrupt gzip data"):
        await importer.import_snapshot(tracker, cut, lambda done, total: calls.append((done, total)))


# -- memory ---------------------------------------------------------------------------------------


def _records(n_peers: int, tag: str) -> Iterator[Record]:
    """A swarm in this tracker's export order (peers, samples, mappings), never held whole."""
    origins = ("o-1", "o-2", "o-3")
    for i in range(n_peers):
        yield PeerRecord(
            origin=origins[i % 3],
            peer=f"{tag}-peer-{i}",
            first_seen=T0 - 900,
            online=True,
            online_since=T0 - 800,
            last_seen=T0 - 10,
            uptime_s=800.0,
            served=i,
            failed=1,
            success_weight=2.0,
            failure_weight=0.5,
            evidence_at=T0 - 20,
            speed_bps=None,
            updated_at=T0 - 10,
        )
    for i in range(n_peers):
        for k in range(12):  # more than the window
            yield SampleRecord(
                origin=origins[i % 3], peer=f"{tag}-peer-{i}", at=T0 - 100 + k, bytes_per_sec=1000 + k
            )
    for i in range(n_peers):
        for k in range(4):
            yield MappingRecord(
                origin=origins[i % 3],
                cid=f"{tag}-content-{(i + k) % 500}",
                peer=f"{tag}-peer-{i}",
                available=k != 3,
                since=T0 - 500,
                last_confirmed=T0 - 50,
                changed_at=T0 - 50,
            )


async def _peak_bytes(tracker: AvailabilityTracker, path: Path) -> int:
    tracemalloc.start()
    try:
        await importer.import_snapshot(tracker, path)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


async def test_the_memory_an_import_takes_does_not_grow_with_the_file(
    tracker: AvailabilityTracker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Peak traced memory importing 400 and then 2,000 peers (17 records each) in parts of 200: a
    file five times the size may not take more than half as much again (the whole-file import
    took ~5 times as much: it held every record and every state)."""
    monkeypatch.setattr(importer, "MERGE_ROWS", 200)
    header = SnapshotHeader(node="exporter", taken_at=T0)
    paths = {
        n: await write_snapshot(tmp_path / str(n), header, _records(n, f"n{n}"), keep=1)
        for n in (40, 400, 2000)
    }
    await importer.import_snapshot(tracker, paths[40])  # statements compiled and cached, pools filled
    small = await _peak_bytes(tracker, paths[400])
    big = await _peak_bytes(tracker, paths[2000])
    assert big < 1.5 * small, (small, big)


@pytest.mark.parametrize("how", ["error", "cancel"])
async def test_an_import_stopped_midway_changes_nothing_and_leaves_nothing_in_the_way(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """Stopped while a part is being written and the next one decoded (a failing statement, a
    cancelled task): the transaction rolls back, the reading thread is let finish and the file
    closed, and the next import runs as if nothing had happened."""
    path = await _swarm_snapshot(f"sqlite+aiosqlite:///{tmp_path / 'source.db'}", tmp_path / "snaps")
    monkeypatch.setattr(importer, "MERGE_ROWS", 2)

    def stop(done: int, total: int) -> None:
        if done >= 6:
            if how == "cancel":
                task = asyncio.current_task()
                assert task is not None
                task.cancel()
            else:
                raise RuntimeError("the database went away")

    async with _importing(db_url) as tracker:
        before = await _dump(tracker)
        with pytest.raises(asyncio.CancelledError if how == "cancel" else RuntimeError):
            await asyncio.ensure_future(importer.import_snapshot(tracker, path, stop))
        assert await _dump(tracker) == before
        assert (await importer.import_snapshot(tracker, path)).peers_applied > 0


async def test_an_import_whose_caller_gives_up_imports_nothing(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The transaction runs on without its cancelled caller (db.to_completion): it went on reading
    the file and committed the whole import seconds after the caller was told it was cancelled (QA
    round 25: a `wait_for` deadline, and Ctrl-C of `tracker gossip import`)."""
    path = await _swarm_snapshot(f"sqlite+aiosqlite:///{tmp_path / 'source.db'}", tmp_path / "snaps")
    monkeypatch.setattr(importer, "MERGE_ROWS", 2)
    parts = 0

    def count(done: int, total: int) -> None:
        nonlocal parts
        parts += 1

    async with _importing(db_url) as tracker:
        before = await _dump(tracker)
        importing = asyncio.ensure_future(importer.import_snapshot(tracker, path, count))
        while parts < 3:  # well inside the transaction
            await asyncio.sleep(0)
        importing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await importing
        await db.settle(tracker.engine, 30)  # the transaction, left to end on its own
        assert await _dump(tracker) == before
        assert (await importer.import_snapshot(tracker, path)).peers_applied > 0


async def test_an_import_decodes_and_builds_off_the_event_loop_and_reads_the_clock_on_it(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decoding and building states is per-row Python (seconds for a big file); the clock's
    readings change its state, which is the loop's alone (QA round 23)."""
    path = await _swarm_snapshot(f"sqlite+aiosqlite:///{tmp_path / 'source.db'}", tmp_path / "snaps")
    threads: dict[str, set[int]] = {}

    def spy(name: str, function: Any) -> Any:
        def spied(*args: Any, **kwargs: Any) -> Any:
            threads.setdefault(name, set()).add(threading.get_ident())
            return function(*args, **kwargs)

        return spied

    monkeypatch.setattr(importer, "MERGE_ROWS", 5)
    monkeypatch.setattr(import_reader.Sorter, "part", spy("part", import_reader.Sorter.part))
    monkeypatch.setattr(importer, "_peer_deltas", spy("_peer_deltas", importer._peer_deltas))
    monkeypatch.setattr(ManualClock, "__call__", spy("clock", ManualClock.__call__))
    async with _importing(db_url) as tracker:
        assert (await importer.import_snapshot(tracker, path)).peers_applied > 0
    loop = threading.get_ident()
    assert set(threads) == {"part", "_peer_deltas", "clock"}, threads
    assert threads["clock"] == {loop}
    assert loop not in threads["part"] | threads["_peer_deltas"]


async def test_a_newer_snapshot_of_an_origin_replaces_what_an_older_one_brought(
    db_url: str, tmp_path: Path
) -> None:
    """Snapshot rows all carry version 0, and a row replaced a stored one only at a higher version:
    the first snapshot of an origin imported stayed for good, and a newer backup of it changed none
    of its peers (QA round 72). An older one imported after changes nothing."""
    clock = ManualClock(T0)
    source = TrackerConfig(database_url=f"sqlite+aiosqlite:///{tmp_path / 'source.db'}", clock=clock)
    async with AvailabilityTracker(source) as tracker:
        await tracker.record_batch([PeerOnline("p"), SpeedSample("p", 1_000), UploadOutcome("p", True)])
        older = await write_state_snapshot(tracker, tmp_path / "a", clock.now)
        clock.advance(400)  # the peer timed out at the source since; it says so, then comes back
        await tracker.record_batch([PeerOnline("p"), SpeedSample("p", 3_000), UploadOutcome("p", False)])
        await tracker.record_upload_success("p")
        newer = await write_state_snapshot(tracker, tmp_path / "b", clock.now)

    async with AvailabilityTracker(
        TrackerConfig(database_url=db_url, clock=ManualClock(T0 + 410))
    ) as tracker:

        async def seen() -> tuple[int, int, float | None, bool]:
            metrics = await tracker.get_peer_metrics("p")
            assert metrics is not None
            return metrics.chunks_served, metrics.chunks_failed, metrics.download_speed, metrics.online

        assert (await importer.import_snapshot(tracker, older, accept_old=True)).peers_applied == 1
        assert await seen() == (1, 0, 1_000, False)  # its last sighting is 410 s old here
        assert (await importer.import_snapshot(tracker, newer)).peers_applied == 1
        assert await seen() == (2, 1, 2_000, True)
        assert (await importer.import_snapshot(tracker, older, accept_old=True)).peers_applied == 0
        assert (await importer.import_snapshot(tracker, newer)).peers_applied == 0
        assert await seen() == (2, 1, 2_000, True)


async def test_a_snapshot_dated_ahead_of_the_clock_is_refused_whatever_its_rows(
    db_url: str, tmp_path: Path
) -> None:
    """Its age read negative and passed the age check, even without accept_old: an old backup under
    an edited header was imported (QA round 74)."""
    path = await _swarm_snapshot(f"sqlite+aiosqlite:///{tmp_path / 'source.db'}", tmp_path / "snaps")
    lines = _lines(path)
    header = json.loads(lines[0])

    def dated(at: float, name: str) -> Path:
        return _rewrite(
            tmp_path / name, [json.dumps({**header, "taken_at": at}).encode() + b"\n", *lines[1:]]
        )

    async with _importing(db_url) as tracker:
        before = await _dump(tracker)
        for accept_old in (False, True):
            with pytest.raises(
                SnapshotError, match=r"dated 1e\+09 s ahead of this tracker's clock \(allowed 120 s"
            ):
                await importer.import_snapshot(
                    tracker, dated(T0 + 1e9, "ahead.jsonl.gz"), accept_old=accept_old
                )
        with pytest.raises(SnapshotError, match=r"dated 121 s ahead .*allowed 120 s"):
            importer.check_snapshot(dated(T0 + 121, "a121.jsonl.gz"), tracker.config, T0)
        assert await _dump(tracker) == before
        assert (await importer.import_snapshot(tracker, dated(T0 + 120, "a120.jsonl.gz"))).peers_applied > 0

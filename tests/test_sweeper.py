"""The sweeper on both engines: expiry, retention, the advisory lock, and the background task."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import func, select, text

from tracker import AvailabilityTracker, StorageError, TrackerConfig, state_export, sweeper
from tracker.events import ContentAvailable, Event, PeerOnline, SpeedSample, UploadOutcome
from tracker.gossip import files
from tracker.queries import sweep as sweep_queries
from tracker.schema import bandwidth_samples, content_peers, peer_stats, upload_outcomes
from tracker.sweeper import SWEEP_LOCK_KEY
from tracker.testing import ManualClock


async def _count(tracker: AvailabilityTracker, table: object, *where: object) -> int:
    async with tracker.engine.connect() as conn:
        stmt = select(func.count()).select_from(table).where(*where)  # type: ignore[arg-type]
        return int((await conn.execute(stmt)).scalar_one())


async def test_seed_timeout_sweep_marks_the_peer_offline_with_uptime_up_to_last_seen(
    tracker: AvailabilityTracker, clock: ManualClock
) -> None:
    start = clock.now
    await tracker.record_peer_online("p")
    clock.advance(120)
    await tracker.record_peer_online("p")
    clock.advance(tracker.config.peer_timeout + 1)
    report = await tracker.sweep()
    assert report.ran and report.peers_marked_offline == 1
    assert await _count(tracker, peer_stats, peer_stats.c.online) == 0
    metrics = await tracker.get_peer_metrics("p")
    assert metrics is not None and not metrics.online
    assert metrics.uptime == timedelta(seconds=120)
    assert metrics.last_seen is not None and metrics.last_seen.timestamp() == start + 120
    # Idempotent: a second pass finds nothing more to do and changes nothing.
    again = await tracker.sweep()
    assert again.peers_marked_offline == 0
    assert (await tracker.get_peer_metrics("p")) == metrics


async def test_seen_exactly_peer_timeout_ago_is_online_everywhere_and_a_moment_later_offline(
    tracker: AvailabilityTracker, clock: ManualClock
) -> None:
    """The boundary, as documented: offline once unseen for more than ``peer_timeout``. The reads and
    the sweeper agree on it, with or without a sweep."""
    await tracker.record_batch([PeerOnline("p"), ContentAvailable("c", "p")])
    clock.advance(tracker.config.peer_timeout)
    assert (await tracker.sweep()).peers_marked_offline == 0
    metrics = await tracker.get_peer_metrics("p")
    assert metrics is not None and metrics.online
    assert [p.peer_id for p in await tracker.select_best_peers("c", 1)] == ["p"]
    clock.advance(0.001)
    metrics = await tracker.get_peer_metrics("p")
    assert metrics is not None and not metrics.online  # before any sweep
    assert await tracker.select_best_peers("c", 1) == []
    assert (await tracker.sweep()).peers_marked_offline == 1


async def test_a_sweep_given_a_now_ahead_of_the_clock_sweeps_as_of_the_clock(
    config: TrackerConfig, clock: ManualClock
) -> None:
    """``sweep(now=...)`` up to ``max_clock_skew_s`` ahead deleted a lease granted a moment before
    (TTL 60 s), and the next selection handed the peer out past ``max_load_per_peer``; it took a peer
    seen 250 s before offline too (QA round 72)."""
    async with AvailabilityTracker(replace(config, max_load_per_peer=1)) as tracker:
        await tracker.record_batch([PeerOnline("p"), ContentAvailable("c", "p"), PeerOnline("q")])
        clock.advance(250)
        await tracker.record_peer_online("p")
        assert [peer.peer_id for peer in await tracker.select_best_peers("c", 1)] == ["p"]
        assert await tracker.select_best_peers("c", 1) == []
        report = await tracker.sweep(now=clock.now + tracker.config.max_clock_skew_s)
        assert report.now == clock.now and report.pruned["peer_leases"] == 0
        assert report.peers_marked_offline == 0
        assert await tracker.select_best_peers("c", 1) == []  # still leased: the cap holds
        assert (await tracker.stats()).open_leases == 1
        q = await tracker.get_peer_metrics("q")
        assert q is not None and q.online and q.uptime == timedelta(seconds=250)
        # Behind the clock, a sweep is as of the time given: nothing is stale then.
        assert (await tracker.sweep(now=clock.now - 100)).now == clock.now - 100


@pytest.mark.parametrize("swept", [False, True])
async def test_a_late_event_finds_a_timed_out_session_alike_whether_or_not_a_sweep_closed_it(
    tracker: AvailabilityTracker, clock: ManualClock, swept: bool
) -> None:
    """p timed out (last seen at +100, now +500); then a heartbeat sent at +200 arrives late, and a
    fresh one. Unswept, the late one continues the session (it was within peer_timeout of +100);
    a sweep run first made it start a new one at +200, for good: uptime 400 s instead of 500 and a
    lower score (QA round 8). A late goodbye likewise ended the session at the sweep's +100."""
    start = clock.now
    for peer in ("p", "q"):
        await tracker.record_peer_online(peer, at=start)
    clock.advance(100)
    for peer in ("p", "q"):
        await tracker.record_peer_online(peer)
    clock.advance(400)
    if swept:
        assert (await tracker.sweep()).peers_marked_offline == 2
    await tracker.record_peer_online("p", at=start + 200)
    await tracker.record_peer_online("p")
    await tracker.record_peer_offline("q", at=start + 250)
    p, q = await tracker.get_peer_metrics("p"), await tracker.get_peer_metrics("q")
    assert p is not None and p.online and p.online_since is not None
    assert (p.online_since.timestamp(), p.uptime) == (start, timedelta(seconds=500))
    assert q is not None and not q.online and q.uptime == timedelta(seconds=250)
    clock.advance(400)
    await tracker.sweep()
    p = await tracker.get_peer_metrics("p")
    assert p is not None and not p.online and p.uptime == timedelta(seconds=500)


async def test_a_heartbeating_peer_stays_online_through_many_sweeps(
    tracker: AvailabilityTracker, clock: ManualClock
) -> None:
    await tracker.record_batch([PeerOnline("p"), ContentAvailable("c", "p")])
    for _ in range(20):
        clock.advance(tracker.config.peer_timeout * 0.9)
        await tracker.record_peer_online("p")
        report = await tracker.sweep()
        assert report.peers_marked_offline == 0
    metrics = await tracker.get_peer_metrics("p")
    assert metrics is not None and metrics.online
    assert metrics.uptime == timedelta(seconds=20 * tracker.config.peer_timeout * 0.9)
    assert await tracker.get_available_peers("c") == ["p"]


async def test_retention_prunes_old_rows_and_keeps_what_queries_need(
    tracker: AvailabilityTracker, clock: ManualClock
) -> None:
    config = tracker.config
    t0 = clock.now
    events: list[Event] = [SpeedSample("p", 1000 * (k + 1), at=t0 + k) for k in range(30)]
    events += [UploadOutcome("p", k % 4 != 0, at=t0 + k) for k in range(40)]
    await tracker.record_batch(events)
    before = await tracker.get_peer_metrics("p")
    assert before is not None

    # Still within retention: nothing beyond the window goes yet.
    clock.advance(60)
    report = await tracker.sweep()
    assert report.pruned["bandwidth_samples"] == 0 and report.pruned["upload_outcomes"] == 0

    clock.now = t0 + max(config.sample_retention_s, config.outcome_retention_s) + 100
    report = await tracker.sweep()
    assert report.pruned["bandwidth_samples"] == 30 - config.bandwidth_window
    assert report.pruned["upload_outcomes"] == 40
    assert await _count(tracker, bandwidth_samples) == config.bandwidth_window
    assert await _count(tracker, upload_outcomes) == 0

    after = await tracker.get_peer_metrics("p")
    assert after is not None
    assert after.download_speed == before.download_speed
    assert (after.chunks_served, after.chunks_failed) == (before.chunks_served, before.chunks_failed)
    # A late sample is still averaged against the latest window that was kept.
    await tracker.record_download_speed("p", 999_000)
    latest = await tracker.get_peer_metrics("p")
    assert latest is not None
    assert latest.download_speed == (sum(range(22, 31)) * 1000 + 999_000) // 10


async def test_tombstones_and_departed_peers_mappings_expire(
    tracker: AvailabilityTracker, clock: ManualClock
) -> None:
    config = tracker.config
    t0 = clock.now
    await tracker.record_batch(
        [
            PeerOnline("gone", at=t0),
            ContentAvailable("c", "gone", at=t0),
            PeerOnline("stays", at=t0),
            ContentAvailable("c", "stays", at=t0),
            ContentAvailable("d", "stays", at=t0),
        ]
    )
    await tracker.record_content_unavailable("d", "stays", at=t0 + 1)
    assert await _count(tracker, content_peers) == 3

    horizon = max(config.tombstone_keep_s, config.offline_mapping_retention_s) + 10
    for step in range(0, int(horizon), 280):  # "stays" keeps sending heartbeats, "gone" does not
        clock.now = t0 + step
        await tracker.record_peer_online("stays")
    clock.now = t0 + horizon
    await tracker.record_peer_online("stays")
    report = await tracker.sweep()
    assert report.pruned["content_peers"] == 1  # the tombstone (d, stays)
    assert report.departed_mappings_removed == 1  # (c, gone): now this node's removal
    assert await tracker.get_available_peers("c") == ["stays"]
    assert await _count(tracker, content_peers) == 2
    # The departed peer's removal ages out like any other.
    clock.now += config.tombstone_keep_s + 1
    await tracker.record_peer_online("stays")
    report = await tracker.sweep()
    assert report.pruned["content_peers"] == 1 and report.departed_mappings_removed == 0
    assert await _count(tracker, content_peers) == 1


async def test_a_removal_outlives_every_announcement_old_enough_to_predate_it(
    tracker: AvailabilityTracker, clock: ManualClock
) -> None:
    """Tombstones expired after ``tombstone_ttl_s`` (1 day) while events up to ``max_event_age_s``
    old (7 days) were accepted: an announcement sent before a removal and delivered two days
    later brought the mapping back (QA round 12)."""
    config = tracker.config
    t0 = clock.now
    await tracker.record_batch([PeerOnline("a", at=t0), ContentAvailable("movie", "a", at=t0)])
    await tracker.record_content_unavailable("movie", "a", at=t0 + 10)
    clock.now = t0 + 2 * 86_400
    assert config.tombstone_ttl_s < clock.now - t0 < config.event_age_limit
    await tracker.sweep()
    await tracker.record_peer_online("a")
    await tracker.record_content_available("movie", "a", at=t0 + 5)  # sent before the removal
    assert await tracker.get_available_peers("movie") == []
    clock.now = t0 + 10 + config.tombstone_keep_s + 1
    await tracker.record_peer_online("a")
    assert (await tracker.sweep()).pruned["content_peers"] == 1  # then it goes


@pytest.mark.parametrize("written", ["without removed_at", "revived and removed again"])
async def test_tombstones_a_process_of_the_release_before_0015_wrote_are_pruned_in_time(
    tracker: AvailabilityTracker, clock: ManualClock, written: str
) -> None:
    """A process of the earlier release, still running on a database upgraded under it, writes
    tombstones without ``removed_at`` (never pruned, QA round 34), and flips one back and forth
    without touching it (pruned by a stale one): pruned ``tombstone_keep_s`` after the pass that
    first saw them, and never before their own date's keep."""
    keep, t0 = tracker.config.tombstone_keep_s, clock.now
    await tracker.record_batch([PeerOnline("a"), ContentAvailable("movie", "a")])
    await tracker.record_content_unavailable("movie", "a")
    clock.now += 3 * 86_400
    # What the earlier release's upsert does: it knows no removed_at and leaves it as it is.
    stale = "NULL" if written == "without removed_at" else str(t0)
    async with tracker.engine.begin() as conn:
        await conn.execute(
            text(f"UPDATE content_peers SET changed_at = :at, removed_at = {stale}"), {"at": clock.now}
        )
    await tracker.record_peer_online("a")
    first = clock.now
    assert (await tracker.sweep()).pruned["content_peers"] == 0
    clock.now = first + keep - 60
    await tracker.record_peer_online("a")
    assert (await tracker.sweep()).pruned["content_peers"] == 0
    clock.now = first + keep + 60
    await tracker.record_peer_online("a")
    assert (await tracker.sweep()).pruned["content_peers"] == 1


@pytest.mark.parametrize("engine_name", ["postgresql"], indirect=True)  # the race is Postgres's row locks
async def test_a_departed_peers_removal_waiting_for_a_row_spares_an_announcement_committed_meanwhile(
    tracker: AvailabilityTracker, clock: ManualClock, db_url: str
) -> None:
    """Under READ COMMITTED, Postgres checks a row it waited for against the statement's own
    conditions, not a subquery's: the removal, which chose its victims in a subquery, turned the
    returning peer's announcement committed while it waited into a removal dated at the old
    sighting (QA round 36)."""
    config = tracker.config
    await tracker.record_batch([PeerOnline("p"), ContentAvailable("movie", "p")])
    clock.now += config.offline_mapping_retention_s + 10
    async with tracker.engine.connect() as conn:
        node_id = await conn.scalar(text("SELECT id FROM tracker_nodes WHERE is_local"))
    locker = await asyncpg.connect(db_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        holding = locker.transaction()
        await holding.start()
        await locker.execute("SELECT * FROM content_peers FOR UPDATE")
        now = clock.now

        async def remove() -> int:
            async with tracker.engine.begin() as conn:
                cutoff = now - config.offline_mapping_retention_s
                return await sweep_queries.remove_departed_mappings(conn, node_id, cutoff, now, 100)

        removing = asyncio.create_task(remove())
        await asyncio.sleep(0.5)  # the removal waits for the row
        await locker.execute(
            "UPDATE content_peers SET changed_at = $1, last_confirmed = $1, version = NULL", now
        )  # p came back and announced again, in the transaction holding the row
        await holding.commit()
        assert await removing == 0
    finally:
        await locker.close()
    assert await _count(tracker, content_peers, content_peers.c.available) == 1


async def test_two_trackers_sweeping_one_database_mark_each_stale_peer_exactly_once(
    config: TrackerConfig, clock: ManualClock
) -> None:
    async with AvailabilityTracker(config) as a, AvailabilityTracker(config) as b:
        await a.record_batch([PeerOnline(f"p{i}") for i in range(300)])
        clock.advance(config.peer_timeout + 1)
        reports = await asyncio.gather(*(t.sweep() for _ in range(5) for t in (a, b)))
        assert sum(r.peers_marked_offline for r in reports) == 300
        assert any(r.ran for r in reports)
        assert await _count(a, peer_stats, peer_stats.c.online) == 0


async def test_a_sweep_skips_while_another_tracker_holds_the_postgres_lock(
    tracker: AvailabilityTracker, clock: ManualClock, engine_name: str
) -> None:
    await tracker.record_peer_online("p")
    clock.advance(tracker.config.peer_timeout + 1)
    if engine_name != "postgresql":
        assert (await tracker.sweep()).ran  # SQLite has no advisory lock; passes are idempotent
        return
    async with tracker.engine.connect() as holder:
        assert await holder.scalar(text(f"SELECT pg_try_advisory_lock({SWEEP_LOCK_KEY})"))
        skipped = await tracker.sweep()
        assert not skipped.ran and skipped.peers_marked_offline == 0
        await holder.scalar(text(f"SELECT pg_advisory_unlock({SWEEP_LOCK_KEY})"))
    assert (await tracker.sweep()).peers_marked_offline == 1


async def test_a_pass_whose_lock_session_ends_under_it_stands(
    tracker: AvailabilityTracker,
    clock: ManualClock,
    engine_name: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The lock is a transaction's, kept open for the pass: a server that ends that session (an
    idle_in_transaction_session_timeout, say) ends the lock, not the pass, whose steps committed on
    connections of their own. Failed before: the lost rollback raised from a pass that had done its work."""
    await tracker.record_peer_online("p")
    clock.advance(tracker.config.peer_timeout + 1)
    drain, ended = sweeper._drain, []

    async def ending_the_lock_session(*args: Any) -> int:
        if engine_name == "postgresql" and not ended:
            async with tracker.engine.connect() as conn:
                ended.append(
                    await conn.scalar(
                        text(
                            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
                            f"AND objid = {SWEEP_LOCK_KEY} AND granted"
                        )
                    )
                )
        return await drain(*args)

    monkeypatch.setattr(sweeper, "_drain", ending_the_lock_session)
    report = await tracker.sweep()
    assert report.ran and report.peers_marked_offline == 1
    assert await _count(tracker, peer_stats, peer_stats.c.online) == 0
    if engine_name == "postgresql":  # SQLite has no lock to lose
        assert ended == [True]
        assert any(r.__dict__.get("action") == "sweep_lock_lost" for r in caplog.records)
        assert (await tracker.sweep()).ran  # nothing left behind


async def test_sweeping_while_writers_write_makes_no_writer_fail(
    tracker: AvailabilityTracker, clock: ManualClock
) -> None:
    await tracker.record_batch([PeerOnline(f"old{i}") for i in range(200)])
    clock.advance(tracker.config.peer_timeout + 1)

    async def writer(k: int) -> None:
        for i in range(40):
            await tracker.record_batch([PeerOnline(f"w{k}-{i}"), UploadOutcome(f"w{k}-{i}", True)])

    async def sweeper() -> int:
        return sum([(await tracker.sweep()).peers_marked_offline for _ in range(10)])

    *_, marked = await asyncio.gather(*(writer(k) for k in range(5)), sweeper())
    assert marked == 200
    assert await _count(tracker, peer_stats, peer_stats.c.online) == 200


async def _wait_for(condition: object, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


async def test_the_background_sweeper_survives_a_failing_pass_and_stops_promptly(
    config: TrackerConfig, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    faults = [StorageError("the database went away")] * 2
    expire = sweeper._expire

    async def failing_expire(*args: Any) -> int:
        if faults:
            raise faults.pop()
        return await expire(*args)

    monkeypatch.setattr(sweeper, "_expire", failing_expire)
    fast = replace(config, update_interval=0.02, run_sweeper=True)
    async with AvailabilityTracker(fast) as tracker:
        state = tracker.sweeper_state
        await _wait_for(lambda: state.failures >= 1)
        assert state.last_error == "StorageError: the database went away"
        # The fault goes away; the task must still be there to notice (after its back-off).
        await _wait_for(lambda: state.passes >= 1, timeout_s=15)
        assert state.last_report is not None and state.last_report.ran
        started = time.monotonic()
    assert time.monotonic() - started < 1.0
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "peer-tracker-sweeper"]


async def test_the_sweepers_report_of_a_schema_changed_under_it_says_what_to_run(
    config: TrackerConfig, clock: ManualClock
) -> None:
    """Its log line and /readyz's last_error named the missing column alone, not that the database
    was downgraded under it and what to run (QA round 47)."""
    async with AvailabilityTracker(replace(config, update_interval=0.02, run_sweeper=True)) as tracker:
        async with tracker.engine.begin() as conn:  # what `tracker db downgrade 0014` drops
            await conn.exec_driver_sql("DROP INDEX IF EXISTS ix_content_peers_tombstones")
            await conn.exec_driver_sql("ALTER TABLE content_peers DROP COLUMN removed_at")
        state = tracker.sweeper_state
        await _wait_for(lambda: state.failures >= 1)
        assert state.last_error is not None and "removed_at" in state.last_error, state.last_error
        assert "tracker db check" in state.last_error, state.last_error


async def test_a_sweep_writes_a_snapshot_that_decodes_back_to_the_state(
    config: TrackerConfig, clock: ManualClock, tmp_path: Path
) -> None:
    from tracker.gossip.files import read_snapshot

    directory = tmp_path / "snapshots"
    with_snapshots = replace(config, snapshot_dir=str(directory), snapshot_keep=2, snapshot_interval_s=0)
    async with AvailabilityTracker(with_snapshots) as tracker:
        t = clock.now - 100
        events: list[Event] = []
        for peer in ("a", "b", "c"):
            events += [PeerOnline(peer, at=t), ContentAvailable("movie", peer, at=t)]
            events += [SpeedSample(peer, 1_000 * k, at=t + k) for k in range(1, 13)]
            events += [UploadOutcome(peer, k % 3 != 0, at=t + 20 + k) for k in range(6)]
        await tracker.record_batch(events)
        await tracker.record_content_unavailable("movie", "c", at=t + 50)

        paths = []
        for _ in range(3):
            clock.advance(1)
            paths.append((await tracker.sweep()).snapshot_path)
        assert all(p is not None for p in paths)
        assert sorted(directory.iterdir()) == sorted(p for p in paths[1:] if p is not None)
        assert not [p for p in directory.iterdir() if p.name.endswith(".tmp")]

        state = await read_snapshot(paths[-1])  # type: ignore[arg-type]
        assert state.header.node == tracker.node_key and state.header.taken_at == clock.now
        by_peer = {r.peer: r for r in state.peers}
        assert sorted(by_peer) == ["a", "b", "c"]
        for peer, record in by_peer.items():
            metrics = await tracker.get_peer_metrics(peer)
            assert metrics is not None
            assert record.origin == tracker.node_key
            assert (record.served, record.failed) == (metrics.chunks_served, metrics.chunks_failed)
            assert round(record.speed_bps or 0) == metrics.download_speed
        assert len(state.samples) == 3 * tracker.config.bandwidth_window
        assert {(m.cid, m.peer, m.available) for m in state.mappings} == {
            ("movie", "a", True),
            ("movie", "b", True),
            ("movie", "c", False),
        }


async def test_snapshots_go_on_at_their_interval_after_the_clock_is_set_back(
    config: TrackerConfig, clock: ManualClock, tmp_path: Path
) -> None:
    """Named by a clock a day ahead, the newest file looked a day "young" once the clock was set
    right: no snapshot was written for a day, and latest_snapshot named the stale one (QA round 7)."""
    directory = tmp_path / "snapshots"
    every_5_min = replace(config, snapshot_dir=str(directory), snapshot_interval_s=300, snapshot_keep=2)
    clock.advance(86_400)
    async with AvailabilityTracker(every_5_min) as tracker:
        await tracker.record_peer_online("p")
        stale = (await tracker.sweep()).snapshot_path
        assert stale is not None
        clock.leap(-86_400)
        clock.advance(60)
        await tracker.record_peer_online("q")
        fresh = (await tracker.sweep()).snapshot_path
        assert fresh is not None and fresh != stale
        assert await files.latest_snapshot(directory, tracker.node_key, now=clock.now) == fresh
        clock.advance(60)
        assert (await tracker.sweep()).snapshot_path is None  # the interval counts from the fresh one
        clock.advance(240)
        assert (await tracker.sweep()).snapshot_path is not None
    assert not stale.exists()  # kept 2: the two written since the clock was set right


async def test_after_a_small_step_back_one_snapshot_catches_up_and_the_interval_holds(
    config: TrackerConfig, clock: ManualClock, tmp_path: Path
) -> None:
    """A step back of 100 s (within the 120 s a name may lie ahead and still count as newest):
    every pass wrote a snapshot until the clock reached the newest file's name (QA round 9)."""
    directory = tmp_path / "snapshots"
    hourly = replace(config, snapshot_dir=str(directory), snapshot_interval_s=3600)
    async with AvailabilityTracker(hourly) as tracker:
        assert (await tracker.sweep()).snapshot_path is not None
        clock.leap(-100)
        written = []
        for _ in range(4):
            clock.advance(20)
            written.append((await tracker.sweep()).snapshot_path is not None)
        assert written == [True, False, False, False]


async def test_snapshots_are_written_once_per_interval_whoever_sweeps(
    config: TrackerConfig, clock: ManualClock, tmp_path: Path
) -> None:
    directory = tmp_path / "snapshots"
    every_minute = replace(config, snapshot_dir=str(directory), snapshot_interval_s=60)
    async with AvailabilityTracker(every_minute) as tracker:
        await tracker.record_peer_online("p")
        written = [(await tracker.sweep()).snapshot_path is not None]  # none yet: due
        for _ in range(3):
            clock.advance(30)
            written.append((await tracker.sweep()).snapshot_path is not None)
        assert written == [True, False, True, False]
    # A restarted process keeps the cadence: it reads the newest snapshot's time from its name.
    async with AvailabilityTracker(every_minute) as tracker:
        assert (await tracker.sweep()).snapshot_path is None
        clock.advance(29)
        assert (await tracker.sweep()).snapshot_path is None
        clock.advance(1)
        assert (await tracker.sweep()).snapshot_path is not None
    assert len(list(directory.glob("snapshot-*.jsonl.gz"))) == 3


async def test_the_records_an_export_builds_unchecked_are_those_the_checks_would_build(
    config: TrackerConfig, clock: ManualClock
) -> None:
    """Exported records skip the checks (snapshot.trusted: a third of an export's CPU, QA round 20):
    each must equal the record its own constructor, which checks and normalizes, builds."""
    import dataclasses

    from tracker.state_export import state_records

    async with AvailabilityTracker(config) as tracker:
        t = clock.now - 100
        await tracker.record_batch(
            [PeerOnline("a", at=t), SpeedSample("a", 5, at=t + 1), UploadOutcome("a", False, at=t + 2)]
        )
        await tracker.record_batch([ContentAvailable("m", "b", at=t), ContentAvailable("m", "a", at=t)])
        await tracker.record_content_unavailable("m", "b", at=t + 3)
        await tracker.record_peer_offline("b", at=t + 4)
        async with tracker.engine.connect() as conn:
            records = [r async for r in state_records(conn, tracker.config.bandwidth_window)]
    assert {type(r).__name__ for r in records} == {"PeerRecord", "SampleRecord", "MappingRecord"}
    for record in records:
        checked = type(record)(**{f.name: getattr(record, f.name) for f in dataclasses.fields(record)})
        assert checked == record
        assert [type(getattr(checked, f.name)) for f in dataclasses.fields(record)] == [
            type(getattr(record, f.name)) for f in dataclasses.fields(record)
        ]


async def test_a_peers_many_samples_are_pruned_a_batch_at_a_time_with_the_same_result(
    config: TrackerConfig, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer's million samples of a day went in one statement, which held SQLite's write lock for
    2.4 s (QA round 57), and then in chunks that each ranked them again (QA round 58): read once,
    then deleted by id, at most ``sweep_batch_size`` a statement."""
    deleted: list[int] = []
    delete = sweep_queries.delete_samples

    async def counted(*args: Any, **kwargs: Any) -> int:
        deleted.append(await delete(*args, **kwargs))
        return deleted[-1]

    monkeypatch.setattr(sweep_queries, "delete_samples", counted)
    async with AvailabilityTracker(replace(config, sweep_batch_size=4)) as tracker:
        t0 = clock.now
        await tracker.record_batch(
            [SpeedSample(peer, 1000 * (k + 1), at=t0 + k) for peer in ("p", "q") for k in range(25)]
        )
        before = {peer: await tracker.get_peer_metrics(peer) for peer in ("p", "q")}
        clock.now = t0 + tracker.config.sample_retention_s + 100
        report = await tracker.sweep()
        window = tracker.config.bandwidth_window
        assert report.pruned["bandwidth_samples"] == 2 * (25 - window) == sum(deleted)
        assert max(deleted) == 4 and len(deleted) >= 2 * (25 - window) // 4
        assert await _count(tracker, bandwidth_samples) == 2 * window
        for peer in ("p", "q"):
            after, earlier = await tracker.get_peer_metrics(peer), before[peer]
            assert after is not None and earlier is not None
            assert after.download_speed == earlier.download_speed  # the window is kept


@pytest.mark.parametrize("batch", [1, 2, 3, 5_000])
async def test_stale_sessions_are_closed_a_slice_at_a_time_with_the_same_result(
    config: TrackerConfig, clock: ManualClock, batch: int
) -> None:
    """One UPDATE over a million peers held SQLite's write lock for seconds (QA round 20): the pass
    goes through peer_stats ``sweep_batch_size`` rows at a time; any slicing closes the same sessions."""
    async with AvailabilityTracker(replace(config, sweep_batch_size=batch)) as tracker:
        stale = clock.now - tracker.config.peer_timeout - 10
        await tracker.record_batch(
            [PeerOnline(f"p{i}", at=stale if i % 3 else clock.now - 1) for i in range(7)]
        )
        report = await tracker.sweep()
        assert report.peers_marked_offline == 4
        online = {p.peer_id for p in await tracker.list_peers(limit=100) if p.online}
        assert online == {"p0", "p3", "p6"}
        for i in (1, 2, 4, 5):
            metrics = await tracker.get_peer_metrics(f"p{i}")
            assert metrics is not None and metrics.uptime == timedelta(0)
        assert (await tracker.sweep()).peers_marked_offline == 0


async def test_a_snapshot_that_cannot_be_written_leaves_the_rest_of_the_pass_and_no_back_off(
    config: TrackerConfig, clock: ManualClock, tmp_path: Path
) -> None:
    """A snapshot directory that became unwritable after open failed every pass, and the back-off
    (up to ten intervals) held back the expiry of stale peers as long (QA round 23)."""
    blocker = tmp_path / "snapshots"
    async with AvailabilityTracker(
        replace(config, snapshot_dir=str(blocker), snapshot_interval_s=0)
    ) as tracker:
        blocker.write_text("a file where the snapshot directory should be")  # passes are called here
        await tracker.record_peer_online("stale")
        clock.advance(config.peer_timeout + 1)
        report = await tracker.sweep()
        assert report.ran and report.peers_marked_offline == 1 and report.snapshot_path is None
        assert report.snapshot_error is not None and str(blocker) in report.snapshot_error
        state = tracker.sweeper_state
        assert (state.snapshot_failures, state.failures) == (1, 0)
        blocker.unlink()
        clock.advance(1)  # not at once: each attempt reads the whole state first (QA round 25)
        report = await tracker.sweep()
        assert (report.snapshot_error, report.snapshot_path, state.snapshot_failures) == (None, None, 1)
        clock.advance(config.update_interval)  # the fault gone, the next attempt writes it
        report = await tracker.sweep()
        assert report.snapshot_error is None and report.snapshot_path is not None
        assert report.snapshot_path.parent == blocker
        assert state.snapshot_failures == 1


async def test_a_quiet_pass_closes_nothing_and_takes_no_write_for_it(
    config: TrackerConfig, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass went through every peer a slice at a time, each slice a write transaction, though
    nothing was stale (0.6-0.8 s of SQLite's write lock per pass at 100,000 peers); samples were
    examined for every peer active in the last day at every pass (0.8-1.6 s). Now stale sessions
    are found by a read first, and samples are pruned at most every SAMPLE_PRUNE_EVERY_S."""
    calls: dict[str, int] = {"mark_stale_offline": 0, "sample_prune_candidates": 0}
    for name in calls:
        original = getattr(sweeper.q, name)

        async def counted(*args: Any, _name: str = name, _original: Any = original, **kw: Any) -> Any:
            calls[_name] += 1
            return await _original(*args, **kw)

        monkeypatch.setattr(sweeper.q, name, counted)
    async with AvailabilityTracker(replace(config, sweep_batch_size=2)) as tracker:
        await tracker.record_batch(
            [e for i in range(20) for e in (PeerOnline(f"p{i}"), SpeedSample(f"p{i}", 1_000 + i))]
        )
        # A process's first pass examines every peer's samples: slices of 2 // 10 -> 1 peer, and
        # the empty one that ends the walk.
        await tracker.sweep()
        assert calls == {"mark_stale_offline": 0, "sample_prune_candidates": 21}
        clock.advance(30)
        report = await tracker.sweep()
        assert report.peers_marked_offline == 0 and report.pruned["bandwidth_samples"] == 0
        assert calls == {"mark_stale_offline": 0, "sample_prune_candidates": 21}
        clock.advance(sweeper.SAMPLE_PRUNE_EVERY_S)  # due again; and now all 20 are stale
        report = await tracker.sweep()
        assert report.peers_marked_offline == 20
        assert calls == {"mark_stale_offline": 20 // 2, "sample_prune_candidates": 2 * 21}


async def test_a_peer_heard_from_after_its_slice_was_found_stays_online(
    config: TrackerConfig, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found stale by the read, closed by the write after it: a heartbeat in between keeps its
    session (the write checks again)."""
    async with AvailabilityTracker(config) as tracker:
        await tracker.record_batch([PeerOnline("early"), PeerOnline("late")])
        clock.advance(config.peer_timeout + 1)
        find = sweeper.q.stale_sessions

        async def heartbeat_after_find(*args: Any) -> list[int]:
            found = await find(*args)
            await tracker.record_peer_online("late")  # after the read, before the close
            return found

        monkeypatch.setattr(sweeper.q, "stale_sessions", heartbeat_after_find)
        report = await tracker.sweep()
        assert report.peers_marked_offline == 1
        online = {p.peer_id for p in await tracker.list_peers() if p.online}
        assert online == {"late"}


@pytest.mark.parametrize(
    "error",
    [
        ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 5432)"),
        OSError(113, "Connect call failed: no route to host"),
    ],
    ids=["refused", "unreachable"],
)
async def test_a_database_outage_while_the_snapshot_is_read_fails_the_pass_not_the_directory(
    config: TrackerConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: OSError
) -> None:
    """A driver's connection errors are OSErrors: they were counted as a snapshot-directory failure,
    the pass as done and the log named the directory (QA rounds 25 and 26)."""

    async def unreachable(*args: Any) -> Path:
        raise error

    monkeypatch.setattr(state_export, "write_state_snapshot", unreachable)
    snapshots = replace(config, snapshot_dir=str(tmp_path / "snapshots"), snapshot_interval_s=0)
    async with AvailabilityTracker(snapshots) as tracker:
        with pytest.raises(OSError):
            await tracker.sweep()
        assert tracker.sweeper_state.snapshot_failures == 0


async def test_a_snapshot_that_failed_while_the_clock_was_ahead_is_tried_again_once_it_is_set_back(
    config: TrackerConfig, clock: ManualClock, tmp_path: Path
) -> None:
    """The next attempt was held until the clock came back to the failed one's time plus the wait:
    a day without snapshots after a clock a day ahead was set right (QA round 26)."""
    blocker = tmp_path / "snapshots"
    async with AvailabilityTracker(replace(config, snapshot_dir=str(blocker))) as tracker:
        blocker.write_text("a file where the snapshot directory should be")
        clock.advance(86_400)
        assert (await tracker.sweep()).snapshot_error is not None
        blocker.unlink()
        clock.advance(-86_400 + 60)  # set right
        report = await tracker.sweep()
        assert report.snapshot_error is None and report.snapshot_path is not None

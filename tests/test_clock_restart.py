"""A clock that leapt while no tracker ran: the next process of the same boot resumes the stored state.

Before, a process's first reading had nothing to compare with: a clock set a day ahead while the
tracker was down went unseen, and the first sweep of the next process (or one `tracker sweep`) timed
out every peer and deleted all their mappings.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest
from conftest import _dsn
from prometheus_client import generate_latest
from sqlalchemy import select
from sqlalchemy.engine import make_url
from test_clock_leap import DAY, _stored

from tracker import AvailabilityTracker, TrackerConfig
from tracker.clockleap import system_boot_id, system_elapsed
from tracker.errors import ConfigError, StorageError
from tracker.events import ContentAvailable, PeerOnline
from tracker.schema import clocks
from tracker.service.metrics import ServiceMetrics
from tracker.testing import ManualClock


@pytest.fixture
def booted(config: TrackerConfig, clock: ManualClock) -> TrackerConfig:
    """Trackers of one boot of a host: elapsed time from the ManualClock, under one boot id."""
    return replace(config, monotonic=clock.monotonic, boot_id="boot-1")


async def _swarm(config: TrackerConfig) -> None:
    """a, b and c online, each holding "movie"; then one sweep (which stores the clock's state)."""
    async with AvailabilityTracker(config) as tracker:
        await tracker.record_batch(
            [e for p in ("a", "b", "c") for e in (PeerOnline(p), ContentAvailable("movie", p))]
        )
        await tracker.sweep()


async def test_a_leap_while_no_tracker_ran_is_seen_by_the_next_process_of_the_boot(
    booted: TrackerConfig, clock: ManualClock
) -> None:
    start = clock.now
    await _swarm(booted)
    clock.advance(60)
    clock.leap(DAY)  # set a day ahead while the tracker was down
    async with AvailabilityTracker(booted) as tracker:
        assert tracker.now() == pytest.approx(start + 60)
        report = await tracker.sweep()
        assert report.clock_leap_s == pytest.approx(DAY) and report.peers_marked_offline == 0
        assert await _stored(tracker) == (3, 3)
        assert sorted(await tracker.get_available_peers("movie")) == ["a", "b", "c"]


async def test_without_a_state_of_this_boot_the_leap_goes_unseen(
    booted: TrackerConfig, clock: ManualClock
) -> None:
    """What the stored state prevents, and where it cannot help: after a reboot (another boot id,
    elapsed time from zero) the new clock is all there is."""
    await _swarm(booted)
    clock.leap(DAY + 60)
    clock.elapsed = 0.0  # rebooted
    async with AvailabilityTracker(replace(booted, boot_id="boot-2")) as tracker:
        assert tracker.now() == clock.now
        report = await tracker.sweep()
        assert report.clock_leap_s is None and report.peers_marked_offline == 3
        assert await _stored(tracker) == (0, 0)


async def test_a_state_from_a_later_elapsed_time_is_not_of_this_clock_and_is_ignored(
    booted: TrackerConfig, clock: ManualClock
) -> None:
    """Same boot id, elapsed time behind the stored one (a time namespace, say): comparing would be
    meaningless, so the process starts afresh rather than holding the clock on a wrong reference."""
    await _swarm(booted)
    clock.elapsed -= 1000
    clock.advance(10)
    async with AvailabilityTracker(booted) as tracker:
        assert tracker.now() == clock.now and tracker.now.leap_s == 0.0


async def test_a_leap_under_way_keeps_its_start_across_restarts(
    booted: TrackerConfig, clock: ManualClock
) -> None:
    """A tracker restarted more often than peer_timeout would otherwise hold a real correction for ever."""
    start = clock.now
    await _swarm(booted)
    clock.advance(10)
    clock.leap(DAY)
    async with AvailabilityTracker(booted) as tracker:
        assert (await tracker.sweep()).clock_leap_s == pytest.approx(DAY)  # held since elapsed 10
    clock.advance(booted.peer_timeout - 20)
    async with AvailabilityTracker(booted) as tracker:
        assert tracker.now() == pytest.approx(start + booted.peer_timeout - 10)  # still held
        clock.advance(25)
        assert tracker.now() == clock.now  # held since elapsed 10, for 305 s in all: accepted
        assert tracker.now.accepted == 1


async def test_an_accepted_leap_keeps_the_sweeper_behind_it_in_the_next_process(
    booted: TrackerConfig, clock: ManualClock
) -> None:
    """Rows stamped before the acceptance are dated by the old clock; a process restarted within the
    lag window swept on the new clock and deleted the mappings of a peer silent for only 300 s."""
    await _swarm(booted)
    clock.leap(DAY)
    async with AvailabilityTracker(booted) as tracker:
        for _ in range(5):  # a and b heartbeat every minute; c has gone quiet
            clock.advance(60)
            await tracker.record_batch([PeerOnline("a"), PeerOnline("b")])
        assert tracker.now.accepted == 1 and tracker.now.lag() == pytest.approx(DAY)
        await tracker.sweep()  # stores the lag
    clock.advance(1)
    async with AvailabilityTracker(booted) as tracker:
        assert tracker.now.lag() == pytest.approx(DAY)
        assert (await tracker.sweep()).peers_marked_offline == 1  # c, silent for 301 s
        assert await _stored(tracker) == (2, 3)  # c's mapping stays: it left 301 s ago, not a day


async def test_a_step_back_while_no_tracker_ran_is_counted(booted: TrackerConfig, clock: ManualClock) -> None:
    await _swarm(booted)
    clock.advance(5)
    clock.leap(-DAY)
    async with AvailabilityTracker(booted) as tracker:
        assert tracker.now() == clock.now
        assert tracker.now.steps_back == 1 and tracker.now.stepped_back_to == clock.now


async def test_the_system_clock_stores_its_state_under_the_kernels_boot_id(db_url: str) -> None:
    boot = system_boot_id()
    if boot is None:
        # Only Linux names its boots; elsewhere the tracker stores no clock state, so nothing to test.
        pytest.skip("this platform names no boot (no /proc/sys/kernel/random/boot_id)")
    before = time.time()
    async with AvailabilityTracker(TrackerConfig(database_url=db_url)) as tracker:
        async with tracker.engine.connect() as conn:
            rows = (await conn.execute(select(clocks))).all()
    assert [row.boot_id for row in rows] == [boot]
    assert before <= rows[0].wall <= time.time() and rows[0].elapsed <= system_elapsed()
    assert rows[0].held_since is None


async def _boots(config: TrackerConfig) -> list[str]:
    async with AvailabilityTracker(replace(config, boot_id=None)) as tracker:  # stores nothing
        async with tracker.engine.connect() as conn:
            return sorted((await conn.execute(select(clocks.c.boot_id))).scalars().all())


async def test_rows_of_other_boots_are_kept_by_count_not_by_one_hosts_clock(
    booted: TrackerConfig, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QA: pruned by age on this host's clock, a host 31 days ahead deleted every other host's row,
    and the next leap on those hosts went unseen. Injected clocks without a boot id store nothing."""
    await _swarm(replace(booted, boot_id="host-x"))
    ahead = ManualClock(clock.now + 31 * DAY, elapsed=clock.elapsed)
    await _swarm(replace(booted, clock=ahead, monotonic=ahead.monotonic, boot_id="host-y"))
    assert await _boots(booted) == ["host-x", "host-y"]
    monkeypatch.setattr("tracker.queries.clocks.KEEP_BOOTS", 2)
    clock.advance(60)
    await _swarm(booted)  # the most recently saved other boot stays, with this one's own row
    assert await _boots(booted) == ["boot-1", "host-y"]


async def test_a_restart_right_after_an_acceptance_neither_accepts_again_nor_moves_leases_again(
    booted: TrackerConfig, clock: ManualClock
) -> None:
    """QA: the acceptance was stored only by the next sweep, so a process opened before it resumed
    the hold, accepted the same leap again and moved a lease already lapsed on the correct clock a
    day ahead: a peer at its cap of 1 could not be selected for a day."""
    config = replace(booted, max_load_per_peer=1, slow_start_s=0.001)
    await _swarm(config)
    clock.advance(10)
    clock.leap(DAY)
    async with AvailabilityTracker(config) as tracker:
        await tracker.sweep()  # sees the leap; the hold is stored
        clock.advance(301)
        await tracker.record_peer_online("a")  # accepted, and stored with it
        assert [p.peer_id for p in await tracker.select_best_peers("movie", 1)] == ["a"]
    clock.advance(80)  # its lease (60 s) has lapsed
    async with AvailabilityTracker(config) as tracker:
        assert tracker.now() == clock.now and tracker.now.accepted == 0
        assert [p.peer_id for p in await tracker.select_best_peers("movie", 1)] == ["a"]


async def test_a_sibling_still_holding_does_not_overwrite_an_acceptance(
    booted: TrackerConfig, clock: ManualClock
) -> None:
    """QA: with the latest writer winning, a process opened next resumed a sibling's hold, ran a day
    behind, and its first sweep took correctly dated rows for future ones and moved them a day back."""
    async with AvailabilityTracker(booted) as first, AvailabilityTracker(booted) as second:
        await first.record_batch([PeerOnline("a"), ContentAvailable("movie", "a")])
        clock.advance(5)
        clock.leap(DAY)
        await first.sweep()
        clock.advance(20)
        await second.sweep()  # holding too, since 20 s later
        clock.advance(285)
        await first.record_peer_online("a")  # first accepts; second has not read the clock since
        await second.sweep()  # still holding (since 25 s): its state must not overwrite the acceptance
        async with AvailabilityTracker(booted) as third:
            assert third.now() == clock.now
            assert (await third.sweep()).future_rows_clamped == 0
        metrics = await first.get_peer_metrics("a")
        assert metrics is not None and metrics.last_seen is not None
        assert metrics.last_seen.timestamp() == clock.now  # not moved a day back


async def test_a_resumed_hold_does_not_move_another_hosts_correct_rows_back(
    booted: TrackerConfig, clock: ManualClock
) -> None:
    """QA round 2: host A's clock ran an hour behind (stored), NTP set it right while no tracker ran
    there; the next process on A resumed the hold, and its first pass took host B's heartbeats,
    correctly dated, for future rows and moved them an hour back: B's peers went offline."""
    hour = 3600.0
    behind = ManualClock(clock.now - hour, elapsed=clock.elapsed)
    host_a = replace(booted, clock=behind, monotonic=behind.monotonic, boot_id="host-a")
    host_b = replace(booted, boot_id="host-b")
    async with AvailabilityTracker(host_a) as tracker:
        await tracker.sweep()
    for each in (clock, behind):
        each.advance(60)
    behind.leap(hour)
    async with AvailabilityTracker(host_b) as b:
        await b.record_batch([e for p in ("p", "q") for e in (PeerOnline(p), ContentAvailable("movie", p))])
        for each in (clock, behind):
            each.advance(10)
        async with AvailabilityTracker(host_a) as a:
            report = await a.sweep()
            assert report.clock_leap_s == pytest.approx(hour) and report.future_rows_clamped == 0
        assert (await b.sweep()).peers_marked_offline == 0
        assert await b.get_available_peers("movie") == ["p", "q"]


async def _hand_out(tracker: AvailabilityTracker) -> list[str]:
    """Who a selection of one holder of "movie" hands out now (after a heartbeat of "a")."""
    await tracker.record_peer_online("a")
    return [p.peer_id for p in await tracker.select_best_peers("movie", 1)]


@pytest.mark.parametrize("accepted_by", ["sweep", "open"])
async def test_a_leap_accepted_by_a_sweep_or_an_opening_moves_the_held_leases_with_it(
    booted: TrackerConfig, clock: ManualClock, accepted_by: str
) -> None:
    """QA round 2: only writes and selections moved the leases; a sweep (or a process opening, like
    `tracker stats`) that saw the acceptance stored it without them, so no process ever moved them
    and a peer at its cap of 1 was handed out again while its lease was open."""
    config = replace(booted, max_load_per_peer=1, slow_start_s=0.001)
    await _swarm(config)
    clock.advance(10)
    clock.leap(DAY)
    async with AvailabilityTracker(config) as tracker:
        await tracker.sweep()  # holds
        clock.advance(260)
        assert await _hand_out(tracker) == ["a"]  # a lease dated by the held clock
        clock.advance(45)  # the hold has lasted peer_timeout
        if accepted_by == "sweep":
            await tracker.sweep()
    if accepted_by == "open":
        async with AvailabilityTracker(config, publish_settings=False) as looker:  # like `tracker stats`
            assert looker.now.accepted == 1
    clock.advance(2)
    async with AvailabilityTracker(config) as tracker:
        assert tracker.now() == clock.now
        assert await _hand_out(tracker) == []  # a's lease has 13 s left by elapsed time
        clock.advance(15)
        assert await _hand_out(tracker) == ["a"]


async def test_held_leases_still_open_by_the_new_clock_are_moved_too(
    booted: TrackerConfig, clock: ManualClock
) -> None:
    """QA round 2: with lease_ttl_s beyond the leap, a lease granted by the held clock was still
    open at the acceptance and was left where it was: it lapsed the leap early, and its peer (cap 1)
    was handed out again with 95 s of it left."""
    config = replace(booted, max_load_per_peer=1, lease_ttl_s=300, slow_start_s=0.001)
    await _swarm(config)
    async with AvailabilityTracker(config) as tracker:
        clock.advance(100)
        await tracker.sweep()
        clock.leap(100)
        await tracker.sweep()  # holds
        clock.advance(290)
        assert await _hand_out(tracker) == ["a"]
        clock.advance(11)
        await tracker.record_peer_online("a")  # accepted: the lease has 289 s left by elapsed time
        assert tracker.now.accepted == 1
        clock.advance(205 - 11)
        assert await _hand_out(tracker) == []  # 95 s left
        clock.advance(100)
        assert await _hand_out(tracker) == ["a"]


async def test_a_failure_to_store_the_state_is_logged_and_the_pass_still_runs(
    booted: TrackerConfig,
    clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """QA: the state was stored before the pass, and a failure there cost the pass its timeouts."""
    await _swarm(booted)

    async def refuse(*args: object) -> None:
        raise StorageError("the row is locked")

    async with AvailabilityTracker(booted) as tracker:
        monkeypatch.setattr("tracker.queries.save_clock_state", refuse)
        clock.advance(booted.peer_timeout + 1)
        report = await tracker.sweep()
    assert report.ran and report.peers_marked_offline == 3
    assert [
        r.getMessage() for r in caplog.records if getattr(r, "action", None) == "clock_state_not_saved"
    ] == ["could not store the clock's state: StorageError: the row is locked"]


def test_a_time_namespace_shifting_boottime_names_its_own_clock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QA: elapsed times of a process whose CLOCK_BOOTTIME is shifted do not compare with the host's."""
    boot, offsets = tmp_path / "boot_id", tmp_path / "timens_offsets"
    boot.write_text("6c1b2a90-0000-4000-8000-000000000001\n")
    monkeypatch.setattr("tracker.clockleap.BOOT_ID_PATH", boot)
    monkeypatch.setattr("tracker.clockleap.TIMENS_OFFSETS_PATH", offsets)
    assert system_boot_id() == "6c1b2a90-0000-4000-8000-000000000001"  # no namespaces here
    offsets.write_text("monotonic           0         0\nboottime            0         0\n")
    assert system_boot_id() == "6c1b2a90-0000-4000-8000-000000000001"
    offsets.write_text("monotonic        -600         0\nboottime        -3600    500000\n")
    assert system_boot_id() == "6c1b2a90-0000-4000-8000-000000000001@-3600.000500000"
    boot.write_text("")
    assert system_boot_id() is None


@pytest.mark.parametrize("boot_id", ["", "x" * 65, 7])
def test_a_bad_boot_id_is_refused(boot_id: object) -> None:
    with pytest.raises(ConfigError, match="boot_id"):
        TrackerConfig(boot_id=boot_id)  # type: ignore[arg-type]


async def test_on_postgres_each_sweep_measures_the_database_servers_clock(
    db_url: str, engine_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Hosts sharing one Postgres stamp by their own clocks; the server's is the one they share, so
    the offset from it tells a host that is off (SQLite has no clock of its own)."""
    async with AvailabilityTracker(TrackerConfig(database_url=db_url)) as tracker:
        report = await tracker.sweep()
    if engine_name == "sqlite":
        assert report.database_clock_offset_s is None
        return
    assert report.database_clock_offset_s is not None and abs(report.database_clock_offset_s) < 5
    assert "database_clock_offset" not in [getattr(r, "action", None) for r in caplog.records]

    clock = ManualClock(time.time() + 3600)  # this host an hour ahead
    async with AvailabilityTracker(TrackerConfig(database_url=db_url, clock=clock)) as tracker:
        metrics = ServiceMetrics(tracker)
        assert b"tracker_database_clock_offset_seconds" not in generate_latest(metrics.registry)
        first, second = await tracker.sweep(), await tracker.sweep()
        assert first.database_clock_offset_s == pytest.approx(-3600, abs=5)
        assert tracker.sweeper_state.database_clock_offset_s == second.database_clock_offset_s
        assert b"tracker_database_clock_offset_seconds -3" in generate_latest(metrics.registry)
    warned = [r for r in caplog.records if getattr(r, "action", None) == "database_clock_offset"]
    assert len(warned) == 1 and "s behind this tracker's time" in warned[0].getMessage()
    assert getattr(warned[0], "offset_s", None) == pytest.approx(-3600, abs=5)


@pytest.mark.parametrize("engine_name", ["postgresql"], indirect=True)
async def test_a_sweep_whose_offset_read_finds_the_database_gone_raises_storage_error(db_url: str) -> None:
    """The offset read is a sweep's first statement: with the server refusing, the pass fails as
    every storage call does, with StorageError, not the driver's bare error (which callers of
    ``tracker.sweep()`` and `tracker sweep` would not know to catch)."""
    name = make_url(db_url).database
    async with AvailabilityTracker(TrackerConfig(database_url=db_url, run_sweeper=False)) as tracker:
        admin = await asyncpg.connect(_dsn(db_url, "postgres"))
        try:
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
            )
            with pytest.raises(StorageError):
                await tracker.sweep()
        finally:
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            await admin.close()

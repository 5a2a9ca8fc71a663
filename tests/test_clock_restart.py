"""A clock that leapt while no tracker ran: the next process of the same boot resumes the stored state.

Before, a process's first reading had nothing to compare with: a clock set a day ahead while the
tracker was down went unseen, and the first sweep of the next process (or one `tracker sweep`) timed
out every peer and deleted all their mappings.
"""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
from prometheus_client import generate_latest
from sqlalchemy import select
from test_clock_leap import DAY, _stored

from tracker import AvailabilityTracker, TrackerConfig
from tracker.clockleap import system_boot_id, system_elapsed
from tracker.errors import ConfigError
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
        pytest.skip("this platform names no boot (no /proc/sys/kernel/random/boot_id)")
    before = time.time()
    async with AvailabilityTracker(TrackerConfig(database_url=db_url)) as tracker:
        async with tracker.engine.connect() as conn:
            rows = (await conn.execute(select(clocks))).all()
    assert [row.boot_id for row in rows] == [boot]
    assert before <= rows[0].wall <= time.time() and rows[0].elapsed <= system_elapsed()
    assert rows[0].held_since is None


async def test_old_boots_are_pruned_and_injected_clocks_store_nothing_without_a_boot_id(
    booted: TrackerConfig, clock: ManualClock
) -> None:
    await _swarm(replace(booted, boot_id="old-boot"))
    clock.advance(31 * DAY)
    async with AvailabilityTracker(replace(booted, boot_id=None)) as tracker:  # stores nothing
        async with tracker.engine.connect() as conn:
            assert (await conn.execute(select(clocks.c.boot_id))).scalars().all() == ["old-boot"]
    async with AvailabilityTracker(booted) as tracker:
        async with tracker.engine.connect() as conn:
            assert (await conn.execute(select(clocks.c.boot_id))).scalars().all() == ["boot-1"]


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

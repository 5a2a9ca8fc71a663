"""The sweeper and its own clock leaping ahead: held passes, the correction, a leap that stays.

Before the guard, one pass with the clock a day ahead timed out every peer and deleted all their
mappings, and correcting the clock brought none of them back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from sqlalchemy import func, select

from tracker import AvailabilityTracker, TrackerConfig
from tracker.clockleap import system_elapsed
from tracker.errors import InvalidInput
from tracker.events import ContentAvailable, PeerOnline
from tracker.schema import content_peers, peer_stats
from tracker.testing import ManualClock

DAY = 86_400.0


@pytest.fixture
async def guarded(config: TrackerConfig, clock: ManualClock) -> AsyncIterator[AvailabilityTracker]:
    """A tracker whose ManualClock also tells elapsed time, so a leap can be told from time passing."""
    async with AvailabilityTracker(replace(config, monotonic=clock.monotonic)) as tracker:
        await tracker.record_batch(
            [e for p in ("a", "b", "c") for e in (PeerOnline(p), ContentAvailable("movie", p))]
        )
        yield tracker


async def _stored(tracker: AvailabilityTracker) -> tuple[int, int]:
    """(peers stored online, mappings stored): what a pass would change for good."""
    async with tracker.engine.connect() as conn:
        online = await conn.scalar(select(func.count()).select_from(peer_stats).where(peer_stats.c.online))
        mapped = await conn.scalar(select(func.count()).select_from(content_peers))
    return int(online or 0), int(mapped or 0)


async def test_a_leap_ahead_that_is_corrected_changes_nothing(
    guarded: AvailabilityTracker, clock: ManualClock
) -> None:
    assert (await guarded.sweep()).ran  # the reference pass
    clock.advance(30)
    clock.leap(DAY)  # a bad NTP source; offline_mapping_retention_s is a day too
    held = await guarded.sweep()
    assert not held.ran and held.clock_leap_s == pytest.approx(DAY)
    clock.advance(30)
    assert (await guarded.sweep()).clock_leap_s == pytest.approx(DAY)  # still out of step: still held
    assert await _stored(guarded) == (3, 3)

    clock.leap(-DAY)  # corrected
    clock.advance(30)
    back = await guarded.sweep()
    assert back.ran and back.clock_leap_s is None and back.peers_marked_offline == 0
    assert await _stored(guarded) == (3, 3)
    assert sorted(await guarded.get_available_peers("movie")) == ["a", "b", "c"]


async def test_a_leap_that_persists_for_peer_timeout_is_taken_as_a_correction(
    guarded: AvailabilityTracker, clock: ManualClock
) -> None:
    await guarded.sweep()
    clock.leap(3600)  # the clock was an hour behind, and NTP set it right
    assert (await guarded.sweep()).clock_leap_s == pytest.approx(3600)
    clock.advance(guarded.config.peer_timeout - 1)
    assert not (await guarded.sweep()).ran
    clock.advance(1)
    accepted = await guarded.sweep()
    assert accepted.ran and accepted.peers_marked_offline == 3  # silent for over an hour by the clock
    clock.advance(30)
    assert (await guarded.sweep()).ran  # the new time is the reference now


async def test_small_steps_and_steps_back_are_not_leaps(
    guarded: AvailabilityTracker, clock: ManualClock
) -> None:
    await guarded.sweep()
    clock.advance(30)
    clock.leap(guarded.config.max_clock_skew_s)  # within the allowed skew
    assert (await guarded.sweep()).ran
    clock.leap(-3600)
    assert (await guarded.sweep()).ran
    assert await _stored(guarded) == (3, 3)


async def test_an_injected_clock_without_elapsed_time_is_not_guarded_and_the_system_clock_is(
    tracker: AvailabilityTracker, clock: ManualClock
) -> None:
    await tracker.record_peer_online("p")
    await tracker.sweep()
    clock.leap(DAY)  # without monotonic=, a leap is indistinguishable from time passing
    assert (await tracker.sweep()).peers_marked_offline == 1
    system = tracker.sweeper_state.__class__().leap_guard(TrackerConfig())
    assert system is not None and system.elapsed is system_elapsed


async def test_sweep_refuses_a_now_ahead_of_the_clock_by_more_than_the_skew(
    guarded: AvailabilityTracker, clock: ManualClock
) -> None:
    with pytest.raises(InvalidInput, match="now is 86400 s ahead of the tracker's clock; the limit is 60 s"):
        await guarded.sweep(now=clock.now + DAY)
    assert await _stored(guarded) == (3, 3)
    assert (await guarded.sweep(now=clock.now + guarded.config.max_clock_skew_s)).ran


async def test_the_background_sweeper_counts_held_passes(config: TrackerConfig, clock: ManualClock) -> None:
    fast = replace(config, monotonic=clock.monotonic, update_interval=0.02, run_sweeper=True)
    async with AvailabilityTracker(fast) as tracker:
        await tracker.record_peer_online("p")
        state = tracker.sweeper_state
        deadline = time.monotonic() + 10
        while state.passes < 1:
            assert time.monotonic() < deadline, "no pass"
            await asyncio.sleep(0.005)
        clock.leap(DAY)
        while state.held < 2:
            assert time.monotonic() < deadline, "no held pass"
            await asyncio.sleep(0.005)
        assert state.last_report is not None and state.last_report.clock_leap_s == pytest.approx(DAY)
        assert await _stored(tracker) == (1, 0)

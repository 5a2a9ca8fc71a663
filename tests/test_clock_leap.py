"""The tracker's own clock leaping ahead: it keeps time by elapsed time until the leap ends or persists.

Before, one sweep with the clock a day ahead timed out every peer and deleted all their mappings,
and correcting the clock brought none of them back; events the tracker stamped during the leap kept
their peers online for the day after, and a peer's removal was ignored as older than them.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from prometheus_client import generate_latest
from sqlalchemy import func, select
from test_load_balancing import proven_peers

from tracker import AvailabilityTracker, TrackerConfig
from tracker.clockleap import system_elapsed
from tracker.errors import InvalidInput
from tracker.events import ContentAvailable, PeerOnline
from tracker.schema import content_peers, peer_leases, peer_stats
from tracker.service.metrics import ServiceMetrics
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
    """(peers stored online, mappings stored as available): what a sweep changes for good (a departed
    peer's mapping becomes a removal, which stays for the tombstones' time)."""
    async with tracker.engine.connect() as conn:
        online = await conn.scalar(select(func.count()).select_from(peer_stats).where(peer_stats.c.online))
        mapped = await conn.scalar(
            select(func.count()).select_from(content_peers).where(content_peers.c.available)
        )
    return int(online or 0), int(mapped or 0)


async def test_a_leap_ahead_that_is_corrected_changes_nothing_and_stamps_nothing_ahead(
    guarded: AvailabilityTracker, clock: ManualClock
) -> None:
    start = clock.now
    assert (await guarded.sweep()).ran
    clock.advance(30)
    clock.leap(DAY)  # a bad NTP source; offline_mapping_retention_s is a day too
    report = await guarded.sweep()
    assert report.ran and report.clock_leap_s == pytest.approx(DAY)
    assert report.now == pytest.approx(start + 30) and report.peers_marked_offline == 0
    assert guarded.now() == pytest.approx(start + 30)
    await guarded.record_peer_online("a")  # stamped by the tracker, on elapsed time
    metrics = await guarded.get_peer_metrics("a")
    assert metrics is not None and metrics.last_seen is not None
    assert metrics.last_seen.timestamp() == pytest.approx(start + 30)
    assert sorted(await guarded.get_available_peers("movie")) == ["a", "b", "c"]

    clock.leap(-DAY)  # corrected
    clock.advance(30)
    back = await guarded.sweep()
    assert back.ran and back.clock_leap_s is None and back.peers_marked_offline == 0
    assert await _stored(guarded) == (3, 3)
    await guarded.record_peer_offline("a")  # not older than anything stamped during the leap
    assert sorted(await guarded.get_available_peers("movie")) == ["b", "c"]


async def test_during_a_leap_peers_still_time_out_by_elapsed_time(
    guarded: AvailabilityTracker, clock: ManualClock
) -> None:
    await guarded.sweep()
    clock.leap(DAY)
    clock.advance(guarded.config.peer_timeout / 2)
    await guarded.record_peer_online("a")
    clock.advance(guarded.config.peer_timeout / 2 + 1)
    report = await guarded.sweep()
    assert report.clock_leap_s == pytest.approx(DAY)
    assert report.peers_marked_offline == 2  # b and c went silent; a spoke half a timeout ago
    assert await _stored(guarded) == (1, 3)  # their mappings stay: they left a timeout ago, not a day


async def test_a_leap_that_persists_for_peer_timeout_is_taken_as_a_correction_without_mass_timeouts(
    guarded: AvailabilityTracker, clock: ManualClock
) -> None:
    """The clock was a day behind and NTP set it right: every stored time is a day old by the new
    clock. The sweeper stays behind the accepted leap for another peer_timeout, so the peers that
    keep speaking stay online with their mappings, and only the silent one times out (QA: the
    first version timed out everyone and deleted their mappings at the acceptance)."""
    start = clock.now
    await guarded.sweep()
    clock.leap(DAY)
    assert guarded.now() == start
    for _ in range(5):  # a and b heartbeat every minute; c has gone quiet
        clock.advance(60)
        await guarded.record_batch([PeerOnline("a"), PeerOnline("b")])
    assert guarded.now() == clock.now  # 300 s of elapsed time: the leap is taken as a correction
    clock.advance(1)
    swept = await guarded.sweep()
    assert swept.now == pytest.approx(start + 301) and swept.peers_marked_offline == 1
    assert await _stored(guarded) == (2, 3)

    clock.advance(guarded.config.peer_timeout / 2)
    await guarded.record_batch([PeerOnline("a"), PeerOnline("b")])
    clock.advance(guarded.config.peer_timeout / 2)
    final = await guarded.sweep()
    assert final.now == clock.now and final.peers_marked_offline == 0  # the sweeper caught up
    # c's mapping goes: its last sighting is dated by the old clock, a day before the new one.
    assert await _stored(guarded) == (2, 2)
    assert sorted(await guarded.get_available_peers("movie")) == ["a", "b"]


async def test_small_steps_and_steps_back_are_followed_at_once(
    guarded: AvailabilityTracker, clock: ManualClock
) -> None:
    clock.advance(30)
    clock.leap(guarded.config.max_clock_skew_s)  # within the allowed skew
    assert guarded.now() == clock.now
    clock.leap(-3600)
    assert guarded.now() == clock.now and guarded.now.leap_s == 0.0
    assert (await guarded.sweep()).clock_leap_s is None
    assert await _stored(guarded) == (3, 3)


async def test_the_leap_is_a_metric(guarded: AvailabilityTracker, clock: ManualClock) -> None:
    metrics = ServiceMetrics(guarded)
    guarded.now()
    clock.leap(DAY)
    guarded.now()
    assert b"tracker_clock_leap_seconds 86400.0" in generate_latest(metrics.registry)


async def test_an_injected_clock_without_elapsed_time_is_followed_and_the_system_clock_is_guarded(
    tracker: AvailabilityTracker, clock: ManualClock
) -> None:
    await tracker.record_peer_online("p")
    await tracker.sweep()
    clock.leap(DAY)  # without monotonic=, a leap is indistinguishable from time passing
    assert (await tracker.sweep()).peers_marked_offline == 1
    async with AvailabilityTracker(replace(tracker.config, clock=time.time)) as system:
        assert system.now.elapsed is system_elapsed
        assert abs(system.now() - time.time()) < 5


async def test_sweep_refuses_a_now_ahead_of_the_clock_by_more_than_the_skew(
    guarded: AvailabilityTracker, clock: ManualClock
) -> None:
    with pytest.raises(InvalidInput, match="now is 86400 s ahead of the tracker's clock; the limit is 60 s"):
        await guarded.sweep(now=clock.now + DAY)
    assert await _stored(guarded) == (3, 3)
    assert (await guarded.sweep(now=clock.now + guarded.config.max_clock_skew_s)).ran


async def test_a_leap_made_of_small_steps_adds_up(guarded: AvailabilityTracker, clock: ManualClock) -> None:
    guarded.now()
    for _ in range(1465):  # 59 s at a time, each within the 60 s tolerance, no time passing
        clock.leap(59)
        guarded.now()
    assert guarded.now.leap_s > DAY - 120
    report = await guarded.sweep()
    assert report.peers_marked_offline == 0 and await _stored(guarded) == (3, 3)


async def test_rows_stamped_ahead_are_brought_back_when_the_clock_steps_back(
    db_url: str, clock: ManualClock
) -> None:
    """The tracker started while its clock was a day ahead, so it could not see the leap; its rows
    and leases are dated a day ahead. When the clock is set right, its removals (stamped "earlier")
    were ignored and its leases counted for the day (QA: step_back.py)."""
    config = TrackerConfig(database_url=db_url, clock=clock, monotonic=clock.monotonic)
    clock.leap(DAY)
    async with AvailabilityTracker(config) as tracker:
        await tracker.record_batch(
            [e for p in ("a", "b", "c") for e in (PeerOnline(p), ContentAvailable("movie", p))]
        )
        assert (await tracker.sweep()).future_rows_clamped == 0  # nothing is ahead yet
        await tracker.select_best_peers("movie", 3)
        clock.leap(-DAY)
        assert tracker.now() == clock.now and tracker.now.steps_back == 1
        report = await tracker.sweep()
        assert report.future_rows_clamped >= 3 + 3 + 3 + 1 + 3  # stats, mappings, peers, content, leases
        await tracker.record_content_unavailable("movie", "a")
        await tracker.record_peer_offline("b")
        assert await tracker.get_available_peers("movie") == ["c"]
        metrics = await tracker.get_peer_metrics("c")
        assert metrics is not None and metrics.last_seen is not None
        assert metrics.last_seen.timestamp() == clock.now
        clock.advance(tracker.config.lease_ttl_s + 1)
        async with tracker.engine.connect() as conn:
            open_leases = await conn.scalar(
                select(func.count()).select_from(peer_leases).where(peer_leases.c.expires_at > clock.now)
            )
        assert open_leases == 0
        assert (await tracker.sweep()).future_rows_clamped == 0  # only once per step back


async def test_a_removal_taken_while_the_clock_was_ahead_is_kept_from_the_step_back(
    db_url: str, clock: ManualClock
) -> None:
    """A tombstone is kept ``tombstone_keep_s`` from when this tracker took it: taken a day ahead, it
    stayed a day longer than that once the clock was set right."""
    clock.leap(DAY)
    async with AvailabilityTracker(TrackerConfig(database_url=db_url, clock=clock)) as ahead:
        await ahead.record_batch([PeerOnline("p"), ContentAvailable("movie", "p")])
        await ahead.record_content_unavailable("movie", "p")
    clock.leap(-DAY)
    async with AvailabilityTracker(TrackerConfig(database_url=db_url, clock=clock)) as tracker:
        assert (await tracker.sweep()).future_rows_clamped >= 1
        async with tracker.engine.connect() as conn:
            taken = await conn.scalar(select(content_peers.c.removed_at))
        assert taken == clock.now
        clock.advance(tracker.config.tombstone_keep_s + 1)
        await tracker.record_peer_online("p")
        assert (await tracker.sweep()).pruned["content_peers"] == 1


async def test_a_new_process_brings_back_rows_an_earlier_one_stamped_ahead(
    db_url: str, clock: ManualClock
) -> None:
    clock.leap(DAY)
    async with AvailabilityTracker(TrackerConfig(database_url=db_url, clock=clock)) as ahead:
        await ahead.record_peer_online("p")
    clock.leap(-DAY)  # fixed while the tracker was down
    async with AvailabilityTracker(TrackerConfig(database_url=db_url, clock=clock)) as tracker:
        first = await tracker.sweep()
        assert first.future_rows_clamped == 2  # p's stats and the peer's first_seen
        await tracker.record_peer_offline("p")
        metrics = await tracker.get_peer_metrics("p")
        assert metrics is not None and not metrics.online


async def test_reads_and_selections_agree_with_the_sweeper_right_after_a_leap_is_accepted(
    guarded: AvailabilityTracker, clock: ManualClock
) -> None:
    """Heartbeats during the hold are stamped on elapsed time; at the acceptance they look a leap
    old. Reads showed every live peer offline and selections found none until each spoke again
    (QA round 2); their presence cutoff stays behind the leap like the sweeper's."""
    await guarded.sweep()
    clock.advance(1)
    clock.leap(1000)
    guarded.now()
    for _ in range(10):
        clock.advance(29)
        await guarded.record_batch([PeerOnline("a"), PeerOnline("b")])
    clock.advance(10)
    assert guarded.now() == clock.now and guarded.now.lag() == pytest.approx(1000)
    assert sorted(await guarded.get_available_peers("movie")) == ["a", "b"]  # c: silent 301 s
    assert {p.peer_id for p in await guarded.select_best_peers("movie", 3)} == {"a", "b"}
    metrics = await guarded.get_peer_metrics("a")
    assert metrics is not None and metrics.online
    assert (await guarded.stats()).peers_online == 2
    assert (await guarded.sweep()).peers_marked_offline == 1


async def test_two_steps_within_the_tolerance_across_an_anchor_renewal_add_up(
    db_url: str, clock: ManualClock
) -> None:
    config = TrackerConfig(
        database_url=db_url, clock=clock, monotonic=clock.monotonic, peer_timeout=120, max_clock_skew_s=60
    )
    async with AvailabilityTracker(config) as tracker:
        tracker.now()
        clock.advance(100)
        await tracker.record_batch([PeerOnline(p) for p in ("a", "b", "c")])
        clock.advance(19)
        tracker.now()
        clock.advance(1)
        clock.leap(59)  # at the reading that renews the anchor
        tracker.now()
        clock.advance(1)
        clock.leap(59)  # 118 s in 1 s
        assert tracker.now() < clock.now and tracker.now.leap_s > 0
        report = await tracker.sweep()
        assert report.clock_leap_s is not None and report.peers_marked_offline == 0


async def test_small_steps_back_add_up_and_several_steps_repair_to_the_earliest(
    db_url: str, clock: ManualClock
) -> None:
    """QA round 3: 1000 s back in steps of 50 s was never counted, so rows stamped 1000 s ahead
    were never repaired; after two steps back between sweeps the repair used the later one."""
    clock.leap(1000)  # the process starts ahead: nothing to compare with
    config = TrackerConfig(database_url=db_url, clock=clock, monotonic=clock.monotonic)
    async with AvailabilityTracker(config) as tracker:
        await tracker.sweep()
        await tracker.record_peer_online("p")
        for _ in range(20):
            clock.leap(-50)
            tracker.now()
        assert tracker.now.steps_back >= 1
        first = clock.now
        clock.advance(20)
        clock.leap(59)
        tracker.now()
        clock.leap(-61)  # counted, to first + 18
        tracker.now()
        assert tracker.now.stepped_back_to == first  # the earliest since the last repair
        assert (await tracker.sweep()).future_rows_clamped >= 2
        clock.advance(tracker.config.peer_timeout + 1)
        assert (await tracker.sweep()).peers_marked_offline == 1  # silent since, by elapsed time
        assert tracker.now.stepped_back_to is None  # repaired


async def test_leases_granted_during_the_hold_still_count_once_the_leap_is_accepted(
    db_url: str, clock: ManualClock
) -> None:
    """QA round 3: dated by the held clock, they all looked lapsed at the acceptance, and a peer at
    its cap of 2 was handed out twice more; outcomes for them closed nothing."""
    config = TrackerConfig(
        database_url=db_url, clock=clock, monotonic=clock.monotonic, max_load_per_peer=2, lease_ttl_s=60
    )
    async with AvailabilityTracker(config) as tracker:
        tracker.now()
        clock.leap(1000)
        tracker.now()
        clock.advance(tracker.config.peer_timeout - 5)
        await tracker.record_batch(proven_peers(["p"], tracker.now()))  # by the tracker's held time
        assert len(await tracker.select_best_peers("movie", 1)) == 1
        assert len(await tracker.select_best_peers("movie", 1)) == 1
        clock.advance(5)  # accepted at the next reading
        assert await tracker.select_best_peers("movie", 1) == []  # still at its cap
        assert tracker.now.accepted == 1
        await tracker.record_upload_success("p", cid="movie")  # closes one of them
        assert [p.peer_id for p in await tracker.select_best_peers("movie", 1)] == ["p"]
        clock.advance(config.lease_ttl_s)
        assert len(await tracker.select_best_peers("movie", 2)) == 1  # the rest lapsed on time

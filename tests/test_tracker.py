"""Behaviour of the tracker API on both engines: selection, timeouts, uptime, speed, content mappings."""

from __future__ import annotations

import asyncio
import random
from datetime import timedelta

import pytest
from sqlalchemy import text

from tracker import AvailabilityTracker, InvalidInput
from tracker.events import (
    ContentAvailable,
    Event,
    PeerOffline,
    PeerOnline,
    SpeedSample,
    UploadOutcome,
)
from tracker.testing import ManualClock


async def test_seed_select_best_3_of_5_by_reputation_ties_broken_by_speed(
    tracker: AvailabilityTracker, clock: ManualClock
) -> None:
    # (successes, failures, speed): "b" ties "a" on reputation and is slower; "e" is proven bad.
    swarm = {
        "a": (20, 0, 9_000_000),
        "b": (20, 0, 3_000_000),
        "c": (15, 5, 8_000_000),
        "d": (10, 10, 9_500_000),
        "e": (2, 18, 10_000_000),
    }
    t = clock.now - 100
    events: list[Event] = []
    for peer, (ok, bad, speed) in swarm.items():
        events += [
            PeerOnline(peer, at=t),
            ContentAvailable("movie", peer, at=t),
            SpeedSample(peer, speed, at=t),
        ]
        events += [UploadOutcome(peer, True, at=t + i) for i in range(ok)]
        events += [UploadOutcome(peer, False, at=t + ok + i) for i in range(bad)]
    await tracker.record_batch(events)
    # every peer's outcomes at the same pace, so a and b have identical evidence
    best = await tracker.select_best_peers("movie", 3)
    assert [p.peer_id for p in best] == ["a", "b", "c"]
    assert [p.rank for p in best] == [1, 2, 3]
    assert best[0].reputation == pytest.approx(best[1].reputation)
    assert best[0].download_speed > best[1].download_speed

    # The same order from each peer's own metrics, computed independently in Python.
    by_score = []
    for peer in swarm:
        m = await tracker.get_peer_metrics(peer)
        assert m is not None and m.reputation_score is not None
        assert m.reputation_score == pytest.approx(m.calculate_reputation(), abs=1e-9)
        by_score.append((-round(m.reputation_score, 12), -m.download_speed, peer))
    assert [peer for *_, peer in sorted(by_score)][:3] == ["a", "b", "c"]


async def test_selection_excludes_proven_unreliable_and_returns_fewer_when_fewer_qualify(
    tracker: AvailabilityTracker, clock: ManualClock
) -> None:
    events: list[Event] = [
        PeerOnline("bad"),
        ContentAvailable("c", "bad"),
        PeerOnline("ok"),
        ContentAvailable("c", "ok"),
    ]
    events += [UploadOutcome("bad", False) for _ in range(10)]
    await tracker.record_batch(events)
    assert [p.peer_id for p in await tracker.select_best_peers("c", 5)] == ["ok"]
    assert await tracker.get_available_peers("c") == ["bad", "ok"]


@pytest.mark.parametrize("n", [0, -1])
async def test_non_positive_n_gives_nothing(tracker: AvailabilityTracker, n: int) -> None:
    await tracker.record_content_available("c", "p")
    assert await tracker.select_best_peers("c", n) == []


@pytest.mark.parametrize("many", [2**31, 2**62, 10**30])
async def test_a_count_beyond_any_table_means_all(tracker: AvailabilityTracker, many: int) -> None:
    """Postgres refused such a LIMIT (a StorageError, "the database failed") and SQLite overflowed
    (QA round 6): it asks for every holder, on both engines."""
    await tracker.record_batch(
        [PeerOnline("a"), PeerOnline("b"), ContentAvailable("c", "a"), ContentAvailable("c", "b")]
    )
    assert sorted(p.peer_id for p in await tracker.select_best_peers("c", many)) == ["a", "b"]
    content = await tracker.get_content_availability("c", limit=many)
    assert content is not None and sorted(p.peer_id for p in content.peers) == ["a", "b"]


async def test_unknown_content_gives_nothing(tracker: AvailabilityTracker) -> None:
    assert await tracker.select_best_peers("nope", 3) == []
    assert await tracker.get_available_peers("nope") == []
    assert await tracker.get_content_availability("nope") is None
    assert await tracker.get_peer_metrics("nobody") is None


async def test_seed_peer_timeout_with_an_advanced_clock(
    tracker: AvailabilityTracker, clock: ManualClock
) -> None:
    await tracker.record_peer_online("p")
    await tracker.record_content_available("c", "p")
    clock.advance(tracker.config.peer_timeout - 1)
    assert await tracker.get_available_peers("c") == ["p"]
    clock.advance(2)  # now past peer_timeout, and no sweep has run
    assert await tracker.get_available_peers("c") == []
    assert await tracker.select_best_peers("c", 3) == []
    metrics = await tracker.get_peer_metrics("p")
    assert metrics is not None and not metrics.online


async def test_uptime_of_a_timed_out_session_ends_at_last_seen(
    tracker: AvailabilityTracker, clock: ManualClock
) -> None:
    start = clock.now
    for offset in (0, 100, 200):
        clock.now = start + offset
        await tracker.record_peer_online("p")
    clock.advance(10_000)
    metrics = await tracker.get_peer_metrics("p")
    assert metrics is not None
    assert metrics.uptime == timedelta(seconds=200)
    # A heartbeat now opens a new session; the old one was closed at its last_seen.
    await tracker.record_peer_online("p")
    clock.advance(50)
    metrics = await tracker.get_peer_metrics("p")
    assert metrics is not None and metrics.online
    assert metrics.uptime == timedelta(seconds=250)


async def test_uptime_accrues_only_while_online(tracker: AvailabilityTracker, clock: ManualClock) -> None:
    t = clock.now - 1100
    events = [
        PeerOnline("p", at=t),
        PeerOnline("p", at=t + 200),
        PeerOffline("p", at=t + 250),
        PeerOnline("p", at=t + 1000),
    ]
    await tracker.record_batch(events)
    metrics = await tracker.get_peer_metrics("p")
    assert metrics is not None and metrics.online
    assert metrics.uptime == timedelta(seconds=250 + 100)


async def test_an_offline_peer_is_never_returned(tracker: AvailabilityTracker) -> None:
    await tracker.record_batch([PeerOnline("p"), ContentAvailable("c", "p"), UploadOutcome("p", True)])
    await tracker.record_peer_offline("p")
    assert await tracker.get_available_peers("c") == []
    assert await tracker.select_best_peers("c", 1) == []
    availability = await tracker.get_content_availability("c")
    assert availability is not None and availability.replication_factor == 0


async def test_a_late_heartbeat_does_not_undo_a_newer_goodbye(
    tracker: AvailabilityTracker, clock: ManualClock
) -> None:
    t = clock.now
    await tracker.record_batch(
        [PeerOnline("p", at=t - 10), ContentAvailable("c", "p", at=t - 10), PeerOffline("p", at=t)]
    )
    await tracker.record_peer_online("p", at=t - 5)  # delivered late
    assert await tracker.get_available_peers("c") == []


async def test_any_event_from_a_peer_refreshes_last_seen(
    tracker: AvailabilityTracker, clock: ManualClock
) -> None:
    await tracker.record_batch([PeerOnline("p"), ContentAvailable("c", "p")])
    for event in (SpeedSample("p", 1000), UploadOutcome("p", True), ContentAvailable("c2", "p")):
        clock.advance(250)
        await tracker.record(event)
    clock.advance(250)  # 1,000 s after the only explicit heartbeat
    assert await tracker.get_available_peers("c") == ["p"]


async def test_download_speed_is_the_mean_of_the_latest_window_samples(
    tracker: AvailabilityTracker, clock: ManualClock
) -> None:
    t = clock.now - 100
    await tracker.record_batch([SpeedSample("p", k * 1000, at=t + k) for k in range(1, 16)])
    metrics = await tracker.get_peer_metrics("p")
    assert metrics is not None and metrics.download_speed == sum(range(6, 16)) * 1000 // 10
    # A sample delivered late (older than the window) does not displace the latest ten.
    await tracker.record_download_speed("p", 1, at=t - 50)
    metrics = await tracker.get_peer_metrics("p")
    assert metrics is not None and metrics.download_speed == 10_500
    # A new one does.
    await tracker.record_download_speed("p", 20_000)
    metrics = await tracker.get_peer_metrics("p")
    assert metrics is not None and metrics.download_speed == (sum(range(7, 16)) * 1000 + 20_000) // 10


async def test_content_unavailable_removes_a_holder_and_an_old_announcement_does_not_restore_it(
    tracker: AvailabilityTracker, clock: ManualClock
) -> None:
    t = clock.now
    await tracker.record_batch(
        [
            PeerOnline("p", at=t - 20),
            PeerOnline("q", at=t - 20),
            ContentAvailable("c", "p", at=t - 20),
            ContentAvailable("c", "q", at=t - 20),
        ]
    )
    await tracker.record_content_unavailable("c", "p", at=t - 10)
    assert await tracker.get_available_peers("c") == ["q"]
    await tracker.record_content_available("c", "p", at=t - 15)  # stale copy of an old announcement
    assert await tracker.get_available_peers("c") == ["q"]
    await tracker.record_content_available("c", "p", at=t)  # a real re-announcement
    assert await tracker.get_available_peers("c") == ["p", "q"]


async def test_content_availability_reports_online_holders_ranked(
    tracker: AvailabilityTracker, clock: ManualClock
) -> None:
    t = clock.now - 60
    events: list[Event] = []
    for peer in ("x", "y", "z"):
        events += [PeerOnline(peer, at=t), ContentAvailable("c", peer, at=t)]
    events += [UploadOutcome("y", True, at=t + i) for i in range(10)]
    events += [PeerOffline("z", at=t + 30)]
    await tracker.record_batch(events)
    availability = await tracker.get_content_availability("c")
    assert availability is not None
    assert availability.cid == "c"
    assert availability.replication_factor == 2
    assert [p.peer_id for p in availability.peers] == ["y", "x"]
    assert availability.last_updated is not None
    assert availability.last_updated.timestamp() == pytest.approx(t)


async def test_metrics_report_counts_times_and_a_consistent_score(
    tracker: AvailabilityTracker, clock: ManualClock
) -> None:
    t = clock.now
    await tracker.record_batch(
        [
            PeerOnline("p", at=t - 600),
            PeerOnline("p", at=t - 300),
            UploadOutcome("p", True, at=t - 10),
            UploadOutcome("p", False, at=t - 5),
        ]
    )
    m = await tracker.get_peer_metrics("p")
    assert m is not None
    assert (m.chunks_served, m.chunks_failed, m.online) == (1, 1, True)
    assert m.first_seen is not None and m.first_seen.timestamp() == t - 600
    # the failure report at t - 5 is no sighting; the success at t - 10 is
    assert m.last_seen is not None and m.last_seen.timestamp() == t - 10
    assert m.last_seen.tzinfo is not None and m.last_seen.utcoffset() == timedelta(0)
    assert m.uptime == timedelta(seconds=600)
    assert m.reputation_score == pytest.approx(m.calculate_reputation(), abs=1e-9)


async def test_failure_reports_do_not_keep_a_departed_peer_online(
    tracker: AvailabilityTracker, clock: ManualClock
) -> None:
    await tracker.record_batch([PeerOnline("p"), ContentAvailable("c", "p")])
    for _ in range(5):  # downloaders keep reporting that p fails them
        clock.advance(100)
        await tracker.record_upload_failure("p")
    assert await tracker.get_available_peers("c") == []
    metrics = await tracker.get_peer_metrics("p")
    assert metrics is not None and not metrics.online and metrics.chunks_failed == 5


@pytest.mark.parametrize("together", [True, False], ids=["one batch", "two calls"])
async def test_a_sighting_that_arrives_after_a_failure_report_dated_later_still_counts(
    tracker: AvailabilityTracker, clock: ManualClock, together: bool
) -> None:
    """A new peer's first event was a failed-upload report, which created its row dated by the report;
    p's own heartbeat, sent 10 s before it but delivered after, was then "older than last_seen" and
    ignored: p stayed offline (and unselectable) until its next heartbeat."""
    report = UploadOutcome("p", False, at=clock.now)
    beat = [PeerOnline("p", at=clock.now - 10), ContentAvailable("c", "p", at=clock.now - 10)]
    if together:
        await tracker.record_batch([report, *beat])
    else:
        await tracker.record(report)
        unseen = await tracker.get_peer_metrics("p")
        assert unseen is not None and not unseen.online and unseen.last_seen is None  # not sighted yet
        await tracker.record_batch(beat)
    metrics = await tracker.get_peer_metrics("p")
    assert metrics is not None and metrics.online and metrics.chunks_failed == 1
    assert metrics.last_seen is not None and metrics.last_seen.timestamp() == clock.now - 10
    assert await tracker.get_available_peers("c") == ["p"]


async def test_a_late_event_lowers_first_seen(tracker: AvailabilityTracker, clock: ManualClock) -> None:
    await tracker.record_peer_online("p")
    await tracker.record_peer_online("p", at=clock.now - 50)  # delivered late
    metrics = await tracker.get_peer_metrics("p")
    assert metrics is not None and metrics.first_seen is not None
    assert metrics.first_seen.timestamp() == clock.now - 50


async def test_a_lone_origin_is_ranked_as_the_grouped_view_ranks_it(
    tracker: AvailabilityTracker, clock: ManualClock
) -> None:
    """While the tracker is its only origin, SQLite's ranking reads each holder's one stats row as it
    is instead of grouping; once a second origin is known, it groups. Both must rank alike."""
    rng = random.Random(11)
    now = clock.now
    events: list[Event] = []
    for i in range(40):
        peer = f"p{i:02d}"
        seen = now - rng.choice([10, 100, 290, 400, 5_000])  # some past peer_timeout
        events += [PeerOnline(peer, at=seen - 3_600), ContentAvailable("c", peer, at=seen - 3_000)]
        events += [
            SpeedSample(peer, rng.randrange(1, 10**8), at=seen - k) for k in range(rng.randrange(0, 4))
        ]
        events += [
            UploadOutcome(peer, rng.random() < 0.7, at=seen - rng.uniform(0, 20_000))
            for _ in range(rng.randrange(0, 9))
        ]
        events.append(PeerOnline(peer, at=seen))
        if i % 7 == 3:
            events.append(PeerOffline(peer, at=seen + 1))
    await tracker.record_batch(events)
    await tracker.record_content_unavailable("c", "p05")

    alone = await tracker.get_content_availability("c")
    async with tracker.engine.begin() as conn:
        await conn.execute(
            text("INSERT INTO tracker_nodes (node_key, is_local, created_at) VALUES ('a-neighbour', :f, 0)"),
            {"f": False},
        )
    grouped = await tracker.get_content_availability("c")
    assert alone is not None and grouped is not None
    assert 10 < len(alone.peers) < 40  # the offline, timed-out and withdrawn holders are left out
    assert alone.peers == grouped.peers


async def test_converting_many_rows_lets_other_tasks_run_between_slices() -> None:
    """A content with 100,000 holders took ~0.35 s of conversion in one piece, stalling the loop (QA)."""
    from tracker.core import _CONVERT_SLICE, _converted

    other_ran = False

    async def other() -> None:
        nonlocal other_ran
        other_ran = True

    task = asyncio.create_task(other())
    seen = await _converted(range(3 * _CONVERT_SLICE), lambda _: other_ran)
    await task
    assert not any(seen[:_CONVERT_SLICE]) and all(seen[_CONVERT_SLICE:])


async def test_list_peers_takes_online_only_as_true_or_false(tracker: AvailabilityTracker) -> None:
    """online_only="no" was taken as true (QA round 22)."""
    with pytest.raises(InvalidInput, match="online_only must be True or False"):
        await tracker.list_peers(online_only="no")  # type: ignore[arg-type]

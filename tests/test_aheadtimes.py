"""How events without ``at`` are dated after what their peer dated ahead (tracker/aheadtimes.py):
the rules on their own; tests/test_validation.py has them through a tracker on both engines."""

from __future__ import annotations

import logging
import math

import pytest

from tracker.aheadtimes import AheadTimes
from tracker.events import (
    ContentAvailable,
    ContentUnavailable,
    PeerOffline,
    PeerOnline,
    SpeedSample,
    UploadOutcome,
)

NOW = 1_800_000_000.0


def test_a_peers_own_undated_events_follow_what_it_dated_ahead_and_reports_about_it_do_not() -> None:
    times = AheadTimes(max_skew_s=60)
    ahead = NOW + 30
    dated = times.dated(
        [
            UploadOutcome("u", False, at=NOW + 50),  # a downloader's clock: as of receipt
            SpeedSample("u", 1_000, at=NOW + 55),
            ContentAvailable("movie", "u", at=ahead),
            UploadOutcome("u", True),  # undated reports about the peer: dated now
            SpeedSample("u", 1_000),
            ContentUnavailable("movie", "u"),
            PeerOffline("u"),
            PeerOnline("other"),
        ],
        NOW,
    )
    after = math.nextafter(ahead, math.inf)
    assert [at for _, at in dated] == [NOW, NOW, ahead, NOW, NOW, after, after, NOW]


def test_times_are_forgotten_once_the_clock_passes_them_one_heap_entry_a_peer() -> None:
    times = AheadTimes(max_skew_s=60)
    for k in range(100):  # a clock 10-20 s ahead, every heartbeat dated
        times.dated(
            [PeerOnline("u", at=NOW + 10 + k / 10), PeerOnline(f"p{k % 3}", at=NOW + 5)], NOW + k / 100
        )
    assert len(times) == 4 and len(times._expiry) == 4
    assert times.dated([PeerOffline("u")], NOW + 15)[0][1] == math.nextafter(NOW + 19.9, math.inf)
    assert times.dated([PeerOffline("p0")], NOW + 15)[0][1] == NOW + 15  # passed: forgotten
    assert len(times) == 1
    assert times.dated([PeerOffline("u")], NOW + 20)[0][1] == NOW + 20
    assert len(times) == 0 and not times._expiry


def test_a_batch_that_triggers_the_forgetting_keeps_its_own_times() -> None:
    """The prune rebuilt the map while the batch wrote into the old one: every 10 s a batch's times
    were lost, and its client's undated removal lost again (QA round 46)."""
    times = AheadTimes(max_skew_s=60)
    times.dated([PeerOnline("other", at=NOW + 5)], NOW)
    times.dated([PeerOnline("fast", at=NOW + 40), ContentAvailable("c", "fast", at=NOW + 40)], NOW + 10)
    assert times.dated([ContentUnavailable("c", "fast")], NOW + 11)[0][1] > NOW + 40


def test_after_the_clock_stepped_back_times_beyond_the_skew_are_forgotten_for_good() -> None:
    """Ignored but kept, they were followed again once the set-back clock came near them, and put
    back in the future rows the sweeper had just brought back to now (QA round 46); kept alive by
    the peer's next dated events, they made its undated removal lose (QA round 48)."""
    times = AheadTimes(max_skew_s=60)
    times.dated([PeerOnline("u", at=NOW + 30), PeerOnline("v", at=NOW + 30)], NOW)
    times.dated([PeerOnline("w", at=NOW - 100 + 20)], NOW - 100)  # stepped back 100 s; w 20 s fast
    assert sorted(times._latest) == ["w"] and len(times._expiry) == 1
    assert times.dated([PeerOnline("u")], NOW - 30)[0][1] == NOW - 30  # within 60 s of it again
    times.dated([PeerOnline("v", at=NOW - 30 + 20)], NOW - 30)  # v dates ahead again, from here
    assert times.dated([PeerOffline("v")], NOW - 29)[0][1] == math.nextafter(NOW - 10, math.inf)
    assert sorted(times._latest) == ["v"] and len(times._expiry) == 1  # w passed; one entry a peer


def test_many_times_passing_at_once_are_forgotten_a_thousand_a_call_and_not_followed() -> None:
    """Forgotten all at once, 190,000 dated by one batch held a heartbeat for 344 ms (QA round 48)."""
    times = AheadTimes(max_skew_s=60)
    times.dated([PeerOnline(f"p{i}", at=NOW + 10) for i in range(2_500)], NOW)
    assert times.dated([PeerOffline("p0")], NOW + 11)[0][1] == NOW + 11  # passed: now, not after it
    assert len(times) == 1_500
    assert times.dated([PeerOffline("p2499")], NOW + 11)[0][1] == NOW + 11
    assert len(times) == 500


def test_past_max_peers_new_peers_are_dated_now_and_it_is_said_once(caplog: pytest.LogCaptureFixture) -> None:
    times = AheadTimes(max_skew_s=60, max_peers=2)
    with caplog.at_level(logging.WARNING, logger="tracker"):
        times.dated([PeerOnline(f"p{i}", at=NOW + 10) for i in range(5)], NOW)
        times.dated([PeerOnline("p9", at=NOW + 10)], NOW)
    assert len(times) == 2
    assert [at for _, at in times.dated([PeerOffline("p0"), PeerOffline("p4")], NOW)] == [
        math.nextafter(NOW + 10, math.inf),
        NOW,
    ]
    assert [r.action for r in caplog.records] == ["clock_behind_clients"]  # type: ignore[attr-defined]


def test_a_batch_stamped_with_a_slightly_older_reading_is_no_step_back() -> None:
    """Large batches are stamped on worker threads with a reading a little older than one already
    used: taken for a step back, each rebuilt the whole map and dropped times at the skew's limit,
    so that their peers' undated goodbyes lost (QA round 49)."""
    times = AheadTimes(max_skew_s=60)
    times.dated([PeerOnline("edge", at=NOW + 59.95)], NOW)
    times.dated([PeerOnline("other")], NOW - 0.1)
    assert times.dated([PeerOffline("edge")], NOW)[0][1] == math.nextafter(NOW + 59.95, math.inf)

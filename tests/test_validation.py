"""Bad input gets a clear error before the database is touched, and nothing is written."""

from __future__ import annotations

import math
import re
from dataclasses import replace

import pytest
from sqlalchemy import func, select, update

from tracker import AvailabilityTracker, InvalidInput, TrackerClosed, TrackerConfig
from tracker.events import (
    ContentAvailable,
    ContentUnavailable,
    PeerOffline,
    PeerOnline,
    SpeedSample,
    UploadOutcome,
    check_batch,
    check_events_per_peer,
)
from tracker.models import from_unix
from tracker.schema import bandwidth_samples, content_peers, contents, peer_stats, peers, upload_outcomes
from tracker.testing import ManualClock

BAD_IDS = [
    "",
    "x" * 257,
    "tab\there",
    "nul\x00",
    "bell\x07",
    "del\x7f",
    "c1\x85",
    "lone\ud800",
    42,
    None,
    b"bytes",
]


async def _row_counts(tracker: AvailabilityTracker) -> dict[str, int]:
    async with tracker.engine.connect() as conn:
        return {
            t.name: int((await conn.execute(select(func.count()).select_from(t))).scalar_one())
            for t in (peers, contents, peer_stats, bandwidth_samples, upload_outcomes, content_peers)
        }


@pytest.mark.parametrize("bad", BAD_IDS, ids=repr)
def test_invalid_peer_ids_are_rejected_with_a_reason(bad: object) -> None:
    with pytest.raises(InvalidInput, match="peer_id"):
        PeerOnline(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "good", ["a", "x" * 256, "peer with spaces", "ünïcødé-🚀", "'; DROP TABLE peers; --"]
)
def test_ids_may_hold_any_printable_text_up_to_256_characters(good: str) -> None:
    assert PeerOnline(good).peer_id == good


@pytest.mark.parametrize("speed", [-1, 10**12 + 1, 1.5, math.nan, True, "100", None])
def test_invalid_speeds_are_rejected(speed: object) -> None:
    with pytest.raises(InvalidInput, match="bytes_per_sec"):
        SpeedSample("p", speed)  # type: ignore[arg-type]


@pytest.mark.parametrize("at", [-1.0, math.inf, math.nan, "now", True, 10**400])
def test_invalid_times_are_rejected(at: object) -> None:
    with pytest.raises(InvalidInput, match="at"):
        PeerOnline("p", at=at)  # type: ignore[arg-type]


def test_upload_outcome_needs_a_real_boolean() -> None:
    with pytest.raises(InvalidInput, match="success"):
        UploadOutcome("p", 1)  # type: ignore[arg-type]


def test_batch_check_names_the_offending_event() -> None:
    with pytest.raises(InvalidInput, match=r"event #2 is a dict"):
        check_batch(
            [PeerOnline("a"), PeerOnline("b"), {"peer_id": "c"}],
            limit=10,
            now=0.0,
            max_skew_s=60,
            max_age_s=60,
        )
    with pytest.raises(InvalidInput, match="limit is 2"):
        check_batch([PeerOnline("a")] * 3, limit=2, now=0.0, max_skew_s=60, max_age_s=60)


async def test_a_bad_call_writes_nothing(tracker: AvailabilityTracker) -> None:
    before = await _row_counts(tracker)
    with pytest.raises(InvalidInput):
        await tracker.record_download_speed("p", -5)
    with pytest.raises(InvalidInput):
        await tracker.record_content_available("c" * 300, "p")
    with pytest.raises(InvalidInput):
        await tracker.record_upload_success("p\n")
    with pytest.raises(InvalidInput):
        await tracker.select_best_peers("", 3)
    with pytest.raises(InvalidInput):
        await tracker.select_best_peers("c", "3")  # type: ignore[arg-type]
    assert await _row_counts(tracker) == before


async def test_one_bad_event_rejects_the_whole_batch(
    tracker: AvailabilityTracker, clock: ManualClock
) -> None:
    before = await _row_counts(tracker)
    batch = [
        PeerOnline("a"),
        ContentAvailable("c", "a"),
        SpeedSample("a", 100),
        PeerOnline("b", at=clock.now + 3600),
    ]
    with pytest.raises(InvalidInput, match=r"event #3 \(peer_online\) is dated 3600 s in the future"):
        await tracker.record_batch(batch)
    assert await _row_counts(tracker) == before


async def test_oversized_batches_are_refused(tracker: AvailabilityTracker) -> None:
    limit = tracker.config.max_batch_events
    with pytest.raises(InvalidInput, match=f"the limit is {limit}"):
        await tracker.record_batch([PeerOnline("a")] * (limit + 1))


async def test_hostile_but_valid_ids_round_trip_exactly(tracker: AvailabilityTracker) -> None:
    weird = ["'; DROP TABLE peers; --", 'quote"s', "ünïcødé-🚀", "%_like_wildcards%", "x" * 256]
    await tracker.record_batch([e for w in weird for e in (PeerOnline(w), ContentAvailable("c", w))])
    assert await tracker.get_available_peers("c") == sorted(weird)
    for w in weird:
        metrics = await tracker.get_peer_metrics(w)
        assert metrics is not None and metrics.peer_id == w


async def test_the_future_limit_says_by_how_much_and_huge_times_stay_short(
    tracker: AvailabilityTracker, clock: ManualClock
) -> None:
    """60.0001 s ahead read "dated 60 s in the future; the allowed clock skew is 60 s"."""
    with pytest.raises(InvalidInput, match=r"dated 60\.0001 s in the future; the allowed clock skew is 60 s"):
        await tracker.record_peer_online("a", at=clock.now + 60.0001)
    with pytest.raises(InvalidInput, match=r"dated 1e\+300 s in the future") as raised:
        await tracker.record_peer_online("a", at=1e300)
    assert len(str(raised.value)) < 120


async def test_a_client_whose_clock_runs_ahead_can_still_remove_what_it_announced(
    tracker: AvailabilityTracker, clock: ManualClock
) -> None:
    """A client 30 s fast announced with ``at``, then sent a removal and a goodbye without it: both
    got 200, were dated now, older than the announcement, and lost; the peer stayed online holding
    the content (QA round 40). An event without ``at`` is dated just after what its peer dated
    ahead; dated events keep their times, so dated ones arriving out of order keep their order."""
    ahead = clock.now + 30
    await tracker.record_batch([PeerOnline("fast", at=ahead), ContentAvailable("movie", "fast", at=ahead)])
    await tracker.record_content_unavailable("movie", "fast")
    assert await tracker.get_available_peers("movie") == []
    await tracker.record_peer_offline("fast")
    metrics = await tracker.get_peer_metrics("fast")
    assert metrics is not None and not metrics.online
    # In one batch too, and the undated event follows the latest time of its peer.
    await tracker.record_batch(
        [
            ContentAvailable("show", "fast", at=clock.now + 40),
            PeerOnline("fast", at=clock.now + 45),
            ContentUnavailable("show", "fast"),
        ]
    )
    assert await tracker.get_content_availability("show") is not None
    assert await tracker.get_available_peers("show") == []
    # Dated events arriving out of order: the later by their client's clock wins, as before.
    await tracker.record_content_unavailable("clip", "fast", at=clock.now + 50)
    await tracker.record_content_available("clip", "fast", at=clock.now + 41)
    assert await tracker.get_available_peers("clip") == []
    # Once the clock has passed those times, an undated event is dated now again.
    clock.advance(61)
    await tracker.record_content_available("clip", "fast")
    metrics = await tracker.get_peer_metrics("fast")
    assert metrics is not None and metrics.last_seen == from_unix(clock.now)
    assert await tracker.get_available_peers("clip") == ["fast"]
    assert len(tracker._ahead_times) == 0  # pruned once the clock passed them
    # A failed upload report about the peer, from a downloader's fast clock, is no sighting: it
    # does not date the peer's next heartbeat.
    await tracker.record_upload_failure("fast", at=clock.now + 50)
    await tracker.record_peer_online("fast")
    metrics = await tracker.get_peer_metrics("fast")
    assert metrics is not None and metrics.last_seen == from_unix(clock.now)


async def test_a_quiet_tracker_whose_clock_stepped_back_does_not_follow_times_taken_before(
    config: TrackerConfig, clock: ManualClock
) -> None:
    """The step was seen only at the next batch, whose reading came later: a time the peer had dated
    ahead before the step, which the sweeper had brought back to the set-back clock, was within the
    skew of that later reading and followed, and the peer's heartbeat went back into the future
    (QA round 49). The clock tells what remembers its times."""
    async with AvailabilityTracker(replace(config, monotonic=clock.monotonic)) as tracker:
        t = clock.now
        await tracker.record_peer_online("fast", at=t + 50)
        clock.leap(-100)
        assert (await tracker.sweep()).future_rows_clamped >= 1  # its reading sees the step
        clock.advance(95)  # quiet; the clock comes within the skew of what "fast" dated
        await tracker.record_peer_online("fast")
        metrics = await tracker.get_peer_metrics("fast")
        assert metrics is not None and metrics.last_seen == from_unix(clock.now)


async def test_a_fast_downloaders_report_does_not_outrank_the_peers_goodbye(
    tracker: AvailabilityTracker, clock: ManualClock
) -> None:
    """A success or a speed sample is a sighting; dated 2 s ahead by a downloader's clock, it beat the
    peer's goodbye sent half a second later, undated or dated by the peer's right clock, and the peer
    stayed online and selected for minutes (QA round 48). Reports dated ahead count as of receipt."""
    for sample, dated_goodbye in ((False, False), (True, True)):
        t = clock.now
        report = SpeedSample("u", 5_000, at=t + 2) if sample else UploadOutcome("u", True, at=t + 2)
        await tracker.record_batch([PeerOnline("u"), ContentAvailable("movie", "u")])
        await tracker.record_batch([report])
        clock.advance(0.5)
        await tracker.record_batch([PeerOffline("u", at=t + 0.5 if dated_goodbye else None)])
        metrics = await tracker.get_peer_metrics("u")
        assert metrics is not None and not metrics.online, report
        assert await tracker.select_best_peers("movie", 3) == []
        clock.advance(10)


async def test_after_a_clock_step_back_an_undated_removal_follows_an_announcement_left_in_place(
    config: TrackerConfig, clock: ManualClock
) -> None:
    """Forgotten at the step itself (any reading that saw it), a time the sweeper left in place, within
    the skew of its pass, was no longer followed: the peer's undated removal was dated now, older than
    its announcement, and lost for good (QA round 52). Forgotten only beyond what the sweeper brought
    back, it is followed."""
    async with AvailabilityTracker(replace(config, monotonic=clock.monotonic)) as tracker:
        t = clock.now
        await tracker.record_batch([PeerOnline("b", at=t + 5), ContentAvailable("movie", "b", at=t + 5)])
        clock.leap(-65)
        await tracker.get_peer_metrics("b")  # a reading sees the step
        clock.advance(10)
        assert (await tracker.sweep()).future_rows_clamped == 0  # t + 5 is within the skew of it
        await tracker.record_content_unavailable("movie", "b")
        assert await tracker.get_available_peers("movie") == []


async def test_a_downloaders_report_arriving_after_the_peers_goodbye_does_not_bring_it_back(
    tracker: AvailabilityTracker, clock: ManualClock
) -> None:
    """A success or a speed sample received after the peer's goodbye, dated at its receipt, was a
    sighting after the goodbye: the peer was online and selected again until peer_timeout (QA round
    49). It still counts (reputation, speed); the peer's own heartbeat brings it back, and after a
    timeout without goodbye a report is a sighting as before."""
    served = 0
    for report in (UploadOutcome("g", True), SpeedSample("g", 5_000)):
        await tracker.record_batch([PeerOnline("g"), ContentAvailable("movie", "g")])
        clock.advance(1)
        await tracker.record_peer_offline("g")
        clock.advance(1)
        await tracker.record_batch([report])
        served += isinstance(report, UploadOutcome)
        metrics = await tracker.get_peer_metrics("g")
        assert metrics is not None and not metrics.online, report
        assert metrics.chunks_served == served
        assert await tracker.select_best_peers("movie", 3) == []
        await tracker.record_peer_online("g")
        assert await tracker.get_available_peers("movie") == ["g"]
        clock.advance(10)
    metrics = await tracker.get_peer_metrics("g")
    assert metrics is not None and metrics.download_speed == 5_000
    clock.advance(tracker.config.peer_timeout + 1)
    await tracker.sweep()  # timed out: no goodbye
    await tracker.record_upload_success("g")
    metrics = await tracker.get_peer_metrics("g")
    assert metrics is not None and metrics.online


async def test_a_goodbye_dated_before_a_report_taken_first_still_takes_the_peer_offline(
    tracker: AvailabilityTracker, clock: ManualClock
) -> None:
    """A report is dated at its receipt and a goodbye by the peer's clock: taken in that order (a
    relay's batch, requests crossing), the goodbye was older than the report's sighting and lost, and
    the peer stayed online and selected until peer_timeout (QA round 52). The peer's own events are
    ordered among themselves; a report no longer outranks them. Uptime counts the session up to the
    goodbye, never less than nothing."""
    t = clock.now
    await tracker.record_batch([PeerOnline("h", at=t), ContentAvailable("movie", "h", at=t)])
    clock.advance(10)
    await tracker.record_upload_success("h")  # dated t + 10, at its receipt
    await tracker.record_peer_offline("h", at=t + 5)
    metrics = await tracker.get_peer_metrics("h")
    assert metrics is not None and not metrics.online
    assert metrics.uptime.total_seconds() == pytest.approx(5)
    assert metrics.chunks_served == 1
    assert await tracker.select_best_peers("movie", 3) == []
    # A heartbeat the peer sent before its goodbye, arriving after it, changes nothing.
    await tracker.record_peer_online("h", at=t + 4)
    metrics = await tracker.get_peer_metrics("h")
    assert metrics is not None and not metrics.online
    # A heartbeat after its goodbye brings it back, though older than the report.
    await tracker.record_peer_online("h", at=t + 7)
    assert await tracker.get_available_peers("movie") == ["h"]
    # A goodbye older than the peer's own latest heartbeat still loses.
    await tracker.record_peer_offline("h", at=t + 6)
    assert await tracker.get_available_peers("movie") == ["h"]

    # A peer known only from a report (the session began there) and its older goodbye.
    clock.advance(10)
    await tracker.record_download_speed("n", 5_000)
    clock.advance(1)
    await tracker.record_peer_offline("n", at=clock.now - 5)
    metrics = await tracker.get_peer_metrics("n")
    assert metrics is not None and not metrics.online
    assert metrics.uptime.total_seconds() == 0
    # Closed by the sweeper before the goodbye came: the session it counted ends at the goodbye.
    await tracker.record_peer_online("s", at=clock.now)
    start = clock.now
    clock.advance(20)
    await tracker.record_upload_success("s")
    clock.advance(tracker.config.peer_timeout + 1)
    await tracker.sweep()
    await tracker.record_peer_offline("s", at=start + 8)
    await tracker.record_upload_success("q", at=start + 20)
    clock.advance(tracker.config.peer_timeout + 1)
    await tracker.sweep()
    await tracker.record_peer_offline("q", at=start + 8)
    for peer, uptime in (("s", 8), ("q", 0)):
        metrics = await tracker.get_peer_metrics(peer)
        assert metrics is not None and not metrics.online
        assert metrics.uptime.total_seconds() == pytest.approx(uptime), peer


async def test_a_write_of_the_release_before_own_seen_is_the_peers_latest_own_event(
    tracker: AvailabilityTracker, clock: ManualClock
) -> None:
    """A process of the release before migration 0017, beside this one during an upgrade, moves
    last_seen and not own_seen (emulated by the UPDATE its write amounts to): ordered by own_seen, a
    late goodbye older than its heartbeat took the peer offline, and a late heartbeat older than its
    goodbye brought it back (QA round 55). Such a write is the peer's latest own event."""
    t = clock.now
    clock.advance(200)
    await tracker.record_batch([PeerOnline("a", at=t), PeerOnline("b", at=t)])
    async with tracker.engine.begin() as conn:
        ids = select(peers.c.id).where(peers.c.peer_key == "a").scalar_subquery()
        await conn.execute(update(peer_stats).where(peer_stats.c.peer_id == ids).values(last_seen=t + 100))
        ids = select(peers.c.id).where(peers.c.peer_key == "b").scalar_subquery()
        await conn.execute(
            update(peer_stats)
            .where(peer_stats.c.peer_id == ids)
            .values(online=False, online_since=None, last_seen=t + 100, uptime_s=100)
        )
    await tracker.record_peer_offline("a", at=t + 50)  # older than the heartbeat the old one took
    await tracker.record_peer_online("b", at=t + 50)  # older than the goodbye the old one took
    a, b = await tracker.get_peer_metrics("a"), await tracker.get_peer_metrics("b")
    assert a is not None and a.online
    assert b is not None and not b.online and b.uptime.total_seconds() == 100


async def test_a_batch_with_more_events_of_one_peer_than_the_limit_is_refused_and_changes_nothing(
    tracker: AvailabilityTracker,
) -> None:
    """A peer's events are applied one after another: 50,000 heartbeats of one peer held every
    write of the process for 32 s on Postgres, where 50,000 of distinct peers took 1.2 s (QA round
    57). A batch holds at most max_events_per_peer (1,000) of one peer; others are not counted."""
    limit = tracker.config.max_events_per_peer
    assert limit == 1_000
    await tracker.record_peer_online("a")
    before = await _row_counts(tracker)
    flood = [PeerOnline("b"), *[UploadOutcome("hot", True) for _ in range(limit)], PeerOffline("hot")]
    with pytest.raises(
        InvalidInput,
        match=re.escape(
            f"event #{limit + 1} (peer_offline) is event number {limit + 1} of peer 'hot' in this batch; "
            f"a batch holds at most {limit} events of one peer (max_events_per_peer)"
        ),
    ):
        await tracker.record_batch(flood)
    assert await _row_counts(tracker) == before
    assert (
        await tracker.record_batch(flood[:-1] + [PeerOnline(f"p{i}") for i in range(limit)]) == 2 * limit + 1
    )
    metrics = await tracker.get_peer_metrics("hot")
    assert metrics is not None and metrics.chunks_served == limit


async def test_a_peers_catalog_announced_in_one_batch_is_one_row_not_one_per_content(
    tracker: AvailabilityTracker, clock: ManualClock
) -> None:
    """A peer announcing 2,000 contents in one request was refused once a batch held at most
    max_events_per_peer events of one peer (QA round 58). Sightings right after the peer's sighting
    at the same time change nothing of its row: they count once, and one row is written for them."""
    limit = tracker.config.max_events_per_peer
    catalog = [PeerOnline("big"), *[ContentAvailable(f"c{i}", "big") for i in range(2 * limit)]]
    assert check_events_per_peer(catalog, limit) == 1
    assert await tracker.record_batch(catalog) == 2 * limit + 1
    metrics = await tracker.get_peer_metrics("big")
    assert metrics is not None and metrics.online and metrics.last_seen == from_unix(clock.now)
    assert await tracker.get_available_peers(f"c{2 * limit - 1}") == ["big"]
    # Dated apart, or split by another kind of event, they are rounds of their own.
    t = clock.now
    apart = [ContentAvailable(f"d{i}", "big", at=t - i / 1_000) for i in range(limit + 1)]
    with pytest.raises(InvalidInput, match=f"event #{limit} .* is event number {limit + 1} of peer 'big'"):
        await tracker.record_batch(apart)
    mixed = [
        e
        for i in range(limit // 2 + 1)
        for e in (ContentAvailable(f"e{i}", "big"), UploadOutcome("big", True))
    ]
    assert check_events_per_peer(mixed[:-2], limit) == limit
    with pytest.raises(InvalidInput, match="of peer 'big'"):
        check_events_per_peer(mixed, limit)


async def test_events_older_than_max_event_age_are_refused_and_change_nothing(
    tracker: AvailabilityTracker, clock: ManualClock
) -> None:
    """An ``at`` of 0 was applied: a new peer's ``first_seen`` read 1970, past its slow start, and
    the outcomes it carried were pruned by the next sweep."""
    await tracker.record_peer_online("a")
    before = await _row_counts(tracker)
    limit = tracker.config.event_age_limit
    with pytest.raises(
        InvalidInput, match=r"event #1 \(upload_outcome\) is dated 1\.8e\+09 s ago; events older"
    ):
        await tracker.record_batch([PeerOnline("b"), UploadOutcome("b", True, at=0)])
    with pytest.raises(InvalidInput, match=f"older than {limit:g} s are refused \\(max_event_age_s\\)"):
        await tracker.record_content_available("c", "a", at=clock.now - limit - 1)
    assert await _row_counts(tracker) == before
    await tracker.record_content_available("c", "a", at=clock.now - limit)  # the limit itself is fine
    assert await tracker.get_available_peers("c") == ["a"]


@pytest.mark.parametrize("now", [float("nan"), float("inf"), -1.0, "soon"])
async def test_a_sweep_as_of_an_unusable_time_is_refused_and_changes_nothing(
    tracker: AvailabilityTracker, now: object
) -> None:
    """NaN marked peers offline and stored NaN on Postgres and did nothing on SQLite; infinity the
    other way round."""
    await tracker.record_batch([PeerOnline("a"), ContentAvailable("c", "a")])
    before = await _row_counts(tracker)
    with pytest.raises(InvalidInput, match="now"):
        await tracker.sweep(now=now)  # type: ignore[arg-type]
    assert await _row_counts(tracker) == before
    assert await tracker.get_available_peers("c") == ["a"]


@pytest.mark.parametrize(
    ("bad", "said"),
    [
        ("peer\x00", "contains control character '\\x00' at position 4"),
        ("p\x9fq", "contains control character '\\x9f' at position 1"),
        ("p\ud800", "contains a lone surrogate '\\ud800' at position 1"),
        ("\udfff", "contains a lone surrogate '\\udfff' at position 0"),
    ],
)
def test_a_forbidden_character_is_named_for_what_it_is(bad: str, said: str) -> None:
    """A lone surrogate was called a control character (QA round 31)."""
    with pytest.raises(InvalidInput) as raised:
        PeerOnline(bad)
    assert str(raised.value) == f"peer_id {said}"


async def test_a_seed_or_a_batch_of_the_wrong_type_is_invalid_input(tracker: AvailabilityTracker) -> None:
    """They were bare TypeErrors from random.Random and list() (QA round 70)."""
    await tracker.record_content_available("c", "p")
    for seed in ([1], {}, object(), True, "7"):
        with pytest.raises(InvalidInput, match="seed must be an integer"):
            await tracker.select_best_peers("c", 1, seed=seed)  # type: ignore[arg-type]
    for events in (None, 5):
        with pytest.raises(InvalidInput, match="events must be an iterable"):
            await tracker.record_batch(events)  # type: ignore[arg-type]
    assert [p.peer_id for p in await tracker.select_best_peers("c", 1, seed=7)] == ["p"]


async def test_a_closed_tracker_refuses_an_empty_batch_and_a_selection_of_none(config: TrackerConfig) -> None:
    """They answered 0 and [] as if the tracker were open (QA round 70)."""
    tracker = AvailabilityTracker(config)
    for state in ("never opened", "closed"):
        with pytest.raises(TrackerClosed):
            await tracker.record_batch([])
        with pytest.raises(TrackerClosed):
            await tracker.select_best_peers("c", 0)
        if state == "never opened":
            await tracker.open()
            await tracker.close()

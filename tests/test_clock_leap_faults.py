"""An accepted clock leap under faults (QA round 11): the move of held leases failing, steps within
the tolerance followed before the leap, and a peer's uptime right after the acceptance."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from test_lease_clock import TickingClock
from test_load_balancing import open_leases, proven_peers

import tracker.core
import tracker.queries
from tracker import AvailabilityTracker, TrackerConfig
from tracker.errors import TransientStorageError
from tracker.events import ContentAvailable, PeerOnline, UploadOutcome
from tracker.testing import ManualClock

DAY = 86_400.0


async def test_a_move_that_fails_leaves_work_going_on_by_the_held_clock_until_it_succeeds(
    db_url: str, clock: ManualClock, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The move of held leases, stored with the acceptance, failed and raised its error from every
    write, selection and count, which each tried it again in turn: heartbeats were refused and the
    peers timed out, the mass timeout holding the clock is for."""
    config = TrackerConfig(
        database_url=db_url, clock=clock, monotonic=clock.monotonic, max_load_per_peer=1, lease_ttl_s=600
    )
    tries: list[float] = []
    real_move = tracker.queries.shift_held_leases

    async def locked(*args: Any, **kwargs: Any) -> int:
        tries.append(clock.elapsed)
        raise TransientStorageError("the clock row is locked (injected)")

    async with AvailabilityTracker(config) as opened:
        await opened.record_batch(proven_peers(["a", "b"], opened.now()))
        clock.leap(DAY)
        opened.now()  # held from here
        for _ in range(3):  # heartbeats by the held clock
            clock.advance(90)
            await opened.record_batch([PeerOnline("a"), PeerOnline("b")])
        held = opened.now()  # the held clock's last reading: the leap is not accepted yet
        assert opened.now.accepted == 0
        [granted] = await opened.select_best_peers("movie", 1)  # a lease by the held clock
        monkeypatch.setattr(tracker.queries, "shift_held_leases", locked)
        clock.advance(35)  # the leap persisted for peer_timeout: the next reading accepts it
        with caplog.at_level(logging.WARNING, logger="tracker.leaseclock"):
            await opened.record_peer_online("a")
            [other] = await opened.select_best_peers("movie", 2)  # the first is at its cap
            assert other.peer_id != granted.peer_id
            assert (await opened.stats()).peers_online == 2
            assert await opened.get_content_availability("movie") is not None
        assert opened.now.accepted == 1 and len(tries) == 1  # tried once, not by every operation
        failed = [r for r in caplog.records if getattr(r, "action", None) == "clock_leases_move_failed"]
        assert len(failed) == 1 and "keeps the held clock" in failed[0].getMessage()
        metrics = await opened.get_peer_metrics("a")
        assert metrics is not None and metrics.last_seen is not None
        assert metrics.last_seen.timestamp() == pytest.approx(held + 35)  # stamped by the held clock

        for _ in range(6):  # the peers keep speaking for peer_timeout and more; the move keeps failing
            clock.advance(60)
            await opened.record_batch([PeerOnline("a"), PeerOnline("b")])
            assert (await opened.sweep()).peers_marked_offline == 0
        # Once a minute here (a write and a sweep each minute): the back-off, 1, 2, 4 ... 30 s of
        # elapsed time, had run out each time; never once per operation.
        assert len(tries) == 7
        assert sorted(await opened.get_available_peers("movie")) == ["a", "b"]

        monkeypatch.setattr(tracker.queries, "shift_held_leases", real_move)
        clock.advance(60)
        await opened.record_peer_online("a")  # the move succeeds: readings are the new clock's
        assert opened.now() == clock.now
        assert await open_leases(opened) == {"a": 1, "b": 1}  # both leases moved with the clock
        assert await opened.select_best_peers("movie", 2) == []  # both peers still at their cap
        assert (await opened.sweep()).peers_marked_offline == 0


async def test_leases_that_lapsed_by_the_held_clock_stay_lapsed_after_earlier_small_steps(
    db_url: str,
) -> None:
    """A step of +50 s (within the tolerance, followed) and then a leap of 1,000 s: the lease move
    took the accepted lag, 1,050 s, for the held clock's own gap, brought back a lease that had
    lapsed 40 s before, and the next outcome closed it instead of the live one."""
    clock = TickingClock()
    config = TrackerConfig(
        database_url=db_url,
        clock=clock,
        monotonic=clock.monotonic,
        max_load_per_peer=2,
        lease_ttl_s=60,
        peer_timeout=300,
    )
    async with AvailabilityTracker(config) as opened:
        opened.now()
        clock.advance(5)
        clock.leap(50.0)  # followed at once
        opened.now()
        clock.advance(5)
        clock.leap(1000.0)
        opened.now()  # held from here
        await opened.record_batch(proven_peers(["p"], opened.now()))
        clock.advance(200)
        assert len(await opened.select_best_peers("movie", 1)) == 1  # L1
        clock.advance(70)
        assert len(await opened.select_best_peers("movie", 1)) == 1  # L2; L1 lapsed 10 s ago
        clock.advance(30)  # past peer_timeout held: the next reading accepts the leap
        await opened.record_batch([UploadOutcome("p", True, cid="movie")])  # closes L2
        assert await open_leases(opened) == {}
        assert opened.now.accepted == 1 and opened.now.accepted_lag == pytest.approx(1050.0)
        assert opened.now.gap_total == pytest.approx(1000.0)


async def test_a_peer_last_seen_by_the_held_clock_does_not_count_the_leap_as_uptime(
    db_url: str, clock: ManualClock
) -> None:
    config = TrackerConfig(database_url=db_url, clock=clock, monotonic=clock.monotonic)
    async with AvailabilityTracker(config) as opened:
        await opened.record_batch([e for p in "ab" for e in (PeerOnline(p), ContentAvailable("movie", p))])
        clock.leap(DAY)
        opened.now()  # held from here
        clock.advance(config.peer_timeout - 5)
        await opened.record_batch([PeerOnline("a"), PeerOnline("b")])
        clock.advance(10)  # accepted; neither has spoken since
        await opened.record_peer_online("b")  # b speaks by the new clock
        a = await opened.get_peer_metrics("a")
        assert a is not None and a.online  # still online: the sweeper and reads lag behind the leap
        assert a.uptime.total_seconds() == pytest.approx(config.peer_timeout - 5)  # not a day more
        listed = {p.peer_id: p for p in await opened.list_peers()}
        assert listed["a"].uptime.total_seconds() == pytest.approx(config.peer_timeout - 5)
        ranked = {p.peer_id: p for p in await opened.select_best_peers("movie", 2)}
        assert ranked["a"].reputation <= ranked["b"].reputation + 1e-9


def _failing_move(monkeypatch: pytest.MonkeyPatch) -> None:
    async def locked(*args: Any, **kwargs: Any) -> int:
        raise TransientStorageError("the clock row is locked (injected)")

    monkeypatch.setattr(tracker.queries, "shift_held_leases", locked)


async def test_a_second_leap_accepted_while_the_first_move_is_pending_moves_leases_by_both(
    db_url: str, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second leap's gap took the first's place: readings jumped a leap ahead and the move
    shifted leases by the second gap alone, so a peer at its cap was handed out again (QA round 14)."""
    config = TrackerConfig(
        database_url=db_url, clock=clock, monotonic=clock.monotonic, max_load_per_peer=1, lease_ttl_s=3600
    )
    async with AvailabilityTracker(config) as opened:
        await opened.record_batch(proven_peers(["a"], opened.now()))
        clock.leap(DAY)
        opened.now()
        clock.advance(60)
        assert len(await opened.select_best_peers("movie", 1)) == 1  # a lease by the held clock
        real_move = tracker.queries.shift_held_leases
        _failing_move(monkeypatch)
        for leap in (0.0, DAY):  # accepted with its move failing, then a second leap, accepted too
            clock.leap(leap)
            for _ in range(6):
                clock.advance(60)
                await opened.record_batch([PeerOnline("a")])
        assert opened.now.accepted == 2 and opened._leases.pending
        monkeypatch.setattr(tracker.queries, "shift_held_leases", real_move)
        clock.advance(31)
        await opened.record_batch([PeerOnline("a")])  # the move runs, by both leaps
        assert not opened._leases.pending
        assert await opened.select_best_peers("movie", 1) == []  # still at its cap
        assert await open_leases(opened) == {"a": 1}


async def test_a_clock_set_back_while_a_move_is_pending_owes_nothing_more(
    db_url: str, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NTP undid the leap while its move was failing: readings stayed a leap behind the corrected
    clock, heartbeats were stamped a day early and the peers timed out (QA round 14)."""
    config = TrackerConfig(database_url=db_url, clock=clock, monotonic=clock.monotonic)
    async with AvailabilityTracker(config) as opened:
        await opened.record_batch([PeerOnline("a"), PeerOnline("b")])
        clock.leap(DAY)
        opened.now()
        _failing_move(monkeypatch)
        for _ in range(6):
            clock.advance(60)
            await opened.record_batch([PeerOnline("a"), PeerOnline("b")])
        assert opened.now.accepted == 1 and opened._leases.pending
        clock.leap(-DAY)  # set right again
        for _ in range(8):
            clock.advance(60)
            await opened.record_batch([PeerOnline("a"), PeerOnline("b")])
            assert (await opened.sweep()).peers_marked_offline == 0
        assert not opened._leases.pending
        await opened.record_peer_online("a", at=clock.now)  # dated by the corrected clock: accepted
        assert len(await opened.list_peers(online_only=True)) == 2


async def test_a_ranking_beside_a_busy_writer_uses_the_clock_the_pending_leases_are_dated_by(
    db_url: str, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On SQLite with the writer busy a selection ranks on the read lane with a time of its own: the
    new clock's, by which the held leases looked lapsed, so the peers at their cap filled the
    spares and the grant refused them all, though a free peer held the content (QA round 14)."""
    config = TrackerConfig(
        database_url=db_url, clock=clock, monotonic=clock.monotonic, max_load_per_peer=1, lease_ttl_s=600
    )
    async with AvailabilityTracker(config) as opened:
        now = opened.now()
        await opened.record_batch(proven_peers(["a", "b"], now) + proven_peers(["c"], now, failures=6))
        clock.leap(DAY)
        opened.now()
        clock.advance(60)
        assert {p.peer_id for p in await opened.select_best_peers("movie", 2)} == {"a", "b"}
        _failing_move(monkeypatch)
        clock.advance(300)
        await opened.record_peer_online("a")
        assert opened._leases.pending
        monkeypatch.setattr(tracker.core.db, "sqlite_writer_busy", lambda engine: True)  # as under ingest
        assert [p.peer_id for p in await opened.select_best_peers("movie", 1)] == ["c"]

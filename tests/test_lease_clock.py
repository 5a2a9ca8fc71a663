"""Leases granted while the clock was held stay counted whichever reading accepts the leap.

QA round 3 found the move of held leases (``tracker.leaseclock``) on the wrong side of readings:
a selection whose second reading accepted the leap handed a peer at cap 1 out twice, an outcome
applied with such a reading closed no lease, and on Postgres a grant made with the held clock that
committed after another task's move was never moved. Each acceptance point is tried in turn, with a
clock that moves a second at every reading.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import pytest
from test_load_balancing import open_leases, proven_peers

import tracker.queries
from tracker import AvailabilityTracker, TrackerConfig
from tracker.clockleap import ClockState, SteadyClock
from tracker.events import ContentAvailable
from tracker.leaseclock import LeaseClock, Shift
from tracker.testing import ManualClock

LEAP = 1000.0
TIMEOUT = 300.0  # peer_timeout, after which a leap is accepted


@dataclass
class TickingClock(ManualClock):
    """A ManualClock that, when ``tick`` is set, lets that much time pass at every wall reading:
    the readings inside one call land on both sides of an acceptance."""

    tick: float = 0.0

    def __call__(self) -> float:
        if self.tick:
            self.advance(self.tick)
        return self.now


@asynccontextmanager
async def held_at_cap(db_url: str) -> AsyncIterator[tuple[AvailabilityTracker, TickingClock]]:
    """A tracker whose clock leapt ahead ``LEAP`` s and has been held for 5 s short of acceptance,
    with peer "p" (holding "movie") at its cap of 1 by a lease granted on the held clock, and peer
    "q" holding "other"."""
    clock = TickingClock()
    config = TrackerConfig(
        database_url=db_url,
        clock=clock,
        monotonic=clock.monotonic,
        max_load_per_peer=1,
        lease_ttl_s=60,
        peer_timeout=TIMEOUT,
    )
    async with AvailabilityTracker(config) as opened:
        opened.now()
        clock.leap(LEAP)
        opened.now()  # the hold starts
        clock.advance(TIMEOUT - 5)
        now = opened.now()
        others = [
            replace(e, cid="other") if isinstance(e, ContentAvailable) else e
            for e in proven_peers(["q"], now)
        ]
        await opened.record_batch(proven_peers(["p"], now) + others)
        assert [p.peer_id for p in await opened.select_best_peers("movie", 1)] == ["p"]
        assert opened.now.accepted == 0
        yield opened, clock


def accept_at_reading(clock: TickingClock, k: int) -> None:
    """Make the ``k``-th wall reading from now (1-based) the one that accepts the leap."""
    clock.advance(5 - k)
    clock.tick = 1.0


def settle(tracker: AvailabilityTracker, clock: TickingClock) -> None:
    """Stop the ticks, with the leap accepted by now whatever happened before."""
    clock.tick = 0.0
    clock.advance(5)
    tracker.now()
    assert tracker.now.accepted == 1


@pytest.mark.parametrize("k", [1, 2, 3])
async def test_a_selection_never_hands_a_peer_at_its_cap_out_again_whichever_reading_accepts(
    db_url: str, k: int
) -> None:
    async with held_at_cap(db_url) as (tracker, clock):
        accept_at_reading(clock, k)
        assert await tracker.select_best_peers("movie", 1) == []  # before: ["p"] with k = 2
        settle(tracker, clock)
        assert await tracker.select_best_peers("movie", 1) == []
        assert (await tracker.stats()).open_leases == 1
        assert await open_leases(tracker) == {"p": 1}


@pytest.mark.parametrize("k", [1, 2, 3])
async def test_an_outcome_closes_its_lease_whichever_reading_accepts(db_url: str, k: int) -> None:
    async with held_at_cap(db_url) as (tracker, clock):
        accept_at_reading(clock, k)
        await tracker.record_upload_success("p", cid="movie")  # before: closed nothing with k = 2
        settle(tracker, clock)
        assert (await tracker.stats()).open_leases == 0
        assert [p.peer_id for p in await tracker.select_best_peers("movie", 1)] == ["p"]


@pytest.mark.parametrize("engine_name", ["postgresql"], indirect=True)
async def test_a_grant_on_the_held_clock_committing_after_an_acceptance_is_moved_too(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Postgres runs transactions side by side: a selection still granting with the held clock
    while another accepts the leap. Paused inside its grant (a hook on the query function, not a
    stand-in for it), it committed after the move and its lease looked lapsed: "p" went out twice.
    SQLite runs one write transaction at a time, which the tests above cover."""
    real: Callable[..., Awaitable[Any]] = tracker.queries.grant_leases
    paused, resume = asyncio.Event(), asyncio.Event()

    async def grant_leases(conn: Any, dialect: str, node_id: int, cid: str, *args: Any) -> Any:
        if cid == "movie" and not paused.is_set():
            paused.set()
            await resume.wait()
        return await real(conn, dialect, node_id, cid, *args)

    async with held_at_cap(db_url) as (opened, clock):
        await opened.record_upload_success("p", cid="movie")  # p is free again
        monkeypatch.setattr(tracker.queries, "grant_leases", grant_leases)
        first = asyncio.create_task(opened.select_best_peers("movie", 1))
        await asyncio.wait_for(paused.wait(), 10)
        clock.advance(5)  # the next reading accepts the leap
        second = asyncio.create_task(opened.select_best_peers("other", 1))
        await asyncio.sleep(0.3)  # before: the second selection moved the leases and returned
        resume.set()
        granted = await asyncio.wait_for(asyncio.gather(first, second), 10)
        assert [[p.peer_id for p in g] for g in granted] == [["p"], ["q"]]
        assert opened.now.accepted == 1
        assert await opened.select_best_peers("movie", 1) == []  # before: ["p"] again
        assert await open_leases(opened) == {"p": 1, "q": 1}


async def test_many_selections_and_outcomes_across_an_acceptance_keep_every_cap(db_url: str) -> None:
    """Sixteen tasks selecting and reporting while the clock ticks through the acceptance: no
    deadlock between the writes holding readings and the move waiting for them, and no peer is
    ever out more than its cap (leases long enough that none lapses here)."""
    clock = TickingClock()
    cap, names = 2, ["p1", "p2", "p3", "p4"]
    config = TrackerConfig(
        database_url=db_url,
        clock=clock,
        monotonic=clock.monotonic,
        max_load_per_peer=cap,
        lease_ttl_s=3600,
        peer_timeout=TIMEOUT,
    )
    async with AvailabilityTracker(config) as opened:
        opened.now()
        clock.leap(LEAP)
        opened.now()
        clock.advance(TIMEOUT - 20)
        await opened.record_batch(proven_peers(names, opened.now()))
        clock.tick = 0.1  # accepted some 200 readings from here
        out = dict.fromkeys(names, 0)
        worst = 0

        async def worker(seed: int) -> None:
            nonlocal worst
            for round_ in range(12):
                picked = await opened.select_best_peers(
                    "movie", 1, strategy="weighted", seed=seed * 100 + round_
                )
                for peer in picked:
                    out[peer.peer_id] += 1
                    worst = max(worst, out[peer.peer_id])
                await opened.record_peer_online(names[(seed + round_) % len(names)])
                for peer in picked:
                    if (seed + round_) % 3:
                        out[peer.peer_id] -= 1  # before the report: the lease may close any time now
                        await opened.record_upload_success(peer.peer_id, cid="movie")

        await asyncio.wait_for(asyncio.gather(*(worker(s) for s in range(16))), 120)
        assert opened.now.accepted == 1
        assert worst <= cap
        clock.tick = 0.0
        assert await open_leases(opened) == {name: n for name, n in out.items() if n}


async def test_a_move_given_up_while_waiting_for_readings_leaves_the_gate_open() -> None:
    """The move waits for operations holding readings; cancelled there (a request timing out), it
    must not leave new readings shut out, and the next reading makes the move."""
    clock = TickingClock()
    steady = SteadyClock(clock, clock.monotonic, tolerance_s=60, accept_after_s=TIMEOUT)
    moved: list[Shift | None] = []

    async def store(now: float, state: ClockState | None, shift: Shift | None) -> None:
        moved.append(shift)

    leases = LeaseClock(steady, store)
    steady()
    clock.leap(LEAP)
    steady()
    async with leases.reading():
        clock.advance(TIMEOUT)  # the next reading accepts
        waiting = asyncio.create_task(leases.reading().__aenter__())
        await asyncio.sleep(0.01)
        assert not waiting.done() and moved == []
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
    async with leases.reading() as now:
        assert now == clock.now
    assert moved == [(clock.now, LEAP)] and leases.shifted_for == 1


@pytest.mark.parametrize("engine_name", ["postgresql"], indirect=True)
async def test_an_outcome_whose_writer_gave_up_still_closes_its_lease_across_a_move(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer cancelled while its group commit runs releases its reading, and the transaction
    goes on: a move let in then put the lease on the new clock before the outcome, dated by the
    held one, looked for it, and the outcome closed nothing ("p" stayed at its cap). Paused inside
    the transaction by a hook on the query function, on Postgres (SQLite's lane cannot pause)."""
    real: Callable[..., Awaitable[Any]] = tracker.queries.apply_events
    paused, resume = asyncio.Event(), asyncio.Event()

    async def apply_events(*args: Any) -> Any:
        if not paused.is_set():
            paused.set()
            await resume.wait()
        return await real(*args)

    async with held_at_cap(db_url) as (opened, clock):
        monkeypatch.setattr(tracker.queries, "apply_events", apply_events)
        writer = asyncio.create_task(opened.record_upload_success("p", cid="movie"))
        await asyncio.wait_for(paused.wait(), 10)
        writer.cancel()
        clock.advance(5)  # the next reading accepts the leap
        other = asyncio.create_task(opened.select_best_peers("other", 1))
        await asyncio.sleep(0.3)  # before: the move ran here
        resume.set()
        assert [p.peer_id for p in await asyncio.wait_for(other, 10)] == ["q"]
        with pytest.raises(asyncio.CancelledError):
            await writer
        await opened._committer.drain()
        assert opened.now.accepted == 1
        assert await open_leases(opened) == {"q": 1}
        assert [p.peer_id for p in await opened.select_best_peers("movie", 1)] == ["p"]

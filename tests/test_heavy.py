"""Which contents count as heavy and how long they stay so; the ranking slots that serve light first."""

from __future__ import annotations

import asyncio

import pytest

from tracker.heavy import LIGHT_RECENT_S, HeavyContents, RankingSlots


def test_one_slow_reading_does_not_mark_a_content_but_a_lasting_average_does() -> None:
    """A content of 2,000 holders read up to 102 ms under load on SQLite, and one reading over 50 ms
    marked it heavy (QA round 60). Each reading has half the weight of the average now."""
    heavy = HeavyContents(threshold_s=0.1)
    heavy.note("hot", 0.102)  # a spike under load: average 0.051
    heavy.note("hot", 0.04)
    assert not heavy.is_heavy("hot")
    heavy.note("huge", 0.14)  # a content of 100,000 holders at its fastest
    assert not heavy.is_heavy("huge")
    heavy.note("huge", 0.14)  # average 0.105
    assert heavy.is_heavy("huge") and len(heavy) == 1
    heavy.note("huge", 0.01)  # its holders left: average 0.0575, above half the threshold still
    assert heavy.is_heavy("huge")
    heavy.note("huge", 0.01)
    assert not heavy.is_heavy("huge") and len(heavy) == 0
    heavy.note("tiny", 0.001)
    assert "tiny" not in heavy._rising and "tiny" not in heavy._heavy  # well below: not remembered
    heavy.note("at-once", 0.25)  # one reading of twice the threshold or more is enough
    assert heavy.is_heavy("at-once")


def test_the_many_hot_contents_of_a_swarm_never_push_a_heavy_one_out() -> None:
    """A content marked heavy was evicted by 4,096 contents ranking at 30 ms, and ranked in the
    write transaction again (QA round 61)."""
    heavy = HeavyContents(threshold_s=0.1, remembered=8)
    heavy.note("huge", 0.5)
    for i in range(100):
        heavy.note(f"hot-{i}", 0.03)
    assert heavy.is_heavy("huge") and len(heavy) == 1 and len(heavy._rising) == 8


def test_timing_notes_how_long_the_block_took_and_nothing_when_it_raised() -> None:
    ticks = iter([10.0, 10.3, 20.0])
    heavy = HeavyContents(threshold_s=0.05, timer=lambda: next(ticks))
    with heavy.timing("huge"):
        pass
    assert heavy.is_heavy("huge")
    with pytest.raises(ValueError), heavy.timing("other"):
        raise ValueError("the ranking failed")
    assert not heavy.is_heavy("other") and len(heavy) == 1


def test_the_memory_is_bounded_and_forgets_the_least_recently_slow() -> None:
    heavy = HeavyContents(threshold_s=0.05, remembered=3)
    for cid in ("a", "b", "c"):
        heavy.note(cid, 1.0)
    heavy.note("a", 1.0)  # slow again: remembered longest now
    heavy.note("d", 1.0)
    assert [cid for cid in "abcd" if heavy.is_heavy(cid)] == ["a", "c", "d"]


class _Rankings:
    """Rankings holding their slot until told to end, and the order they got one in."""

    def __init__(self, slots: RankingSlots) -> None:
        self.slots, self.order, self.running = slots, [], {False: 0, True: 0}
        self.most = {False: 0, True: 0}
        self.end = asyncio.Event()

    async def rank(self, name: str, heavy: bool) -> None:
        async with self.slots.hold(heavy):
            self.order.append(name)
            self.running[heavy] += 1
            self.most[heavy] = max(self.most[heavy], self.running[heavy])
            await self.end.wait()
            self.running[heavy] -= 1

    def start(self, name: str, heavy: bool) -> asyncio.Task[None]:
        return asyncio.create_task(self.rank(name, heavy))


async def test_heavy_rankings_leave_one_slot_while_light_ones_are_asked_for() -> None:
    now = [100.0]
    rankings = _Rankings(RankingSlots(3, elapsed=lambda: now[0]))
    async with rankings.slots.hold(False):  # a light one, just now
        pass
    tasks = [rankings.start(f"heavy{i}", True) for i in range(4)]
    await asyncio.sleep(0)
    assert rankings.order == ["heavy0", "heavy1"]  # the third slot is kept
    tasks.append(rankings.start("light", False))
    await asyncio.sleep(0)
    assert rankings.order == ["heavy0", "heavy1", "light"]  # at once
    rankings.end.set()
    await asyncio.gather(*tasks)
    assert rankings.most[True] == 2 and rankings.order[3:] == ["heavy2", "heavy3"]


async def test_a_freed_slot_goes_to_a_waiting_light_ranking_first() -> None:
    rankings = _Rankings(RankingSlots(1))
    tasks = [rankings.start("heavy0", True)]
    await asyncio.sleep(0)
    tasks += [rankings.start("heavy1", True), rankings.start("light", False)]
    await asyncio.sleep(0)
    rankings.end.set()
    await asyncio.gather(*tasks)
    assert rankings.order == ["heavy0", "light", "heavy1"]


async def test_heavy_rankings_use_every_slot_when_no_light_one_asks() -> None:
    now = [100.0]
    rankings = _Rankings(RankingSlots(3, elapsed=lambda: now[0]))
    await rankings.slots.hold(False).__aenter__()  # a light one, long ago
    now[0] += LIGHT_RECENT_S
    tasks = [rankings.start(f"heavy{i}", True) for i in range(4)]
    await asyncio.sleep(0)
    assert rankings.order == ["heavy0", "heavy1"] and rankings.slots.heavy_running == 2
    rankings.end.set()
    await asyncio.gather(*tasks)


async def test_heavy_rankings_progress_while_light_ones_keep_every_slot_busy() -> None:
    rankings = _Rankings(RankingSlots(2))
    tasks = [rankings.start(f"light{i}", False) for i in range(2)]
    await asyncio.sleep(0)
    tasks += [rankings.start("heavy", True), *(rankings.start(f"light{i}", False) for i in range(2, 6))]
    await asyncio.sleep(0)
    assert rankings.order == ["light0", "light1"]
    rankings.end.set()
    await asyncio.gather(*tasks)
    assert rankings.order[2] == "heavy"  # the first freed slot: no heavy ranking was running


async def test_a_cancelled_waiter_gives_its_turn_to_the_next() -> None:
    rankings = _Rankings(RankingSlots(1))
    first = rankings.start("first", False)
    await asyncio.sleep(0)
    gone, heavy = rankings.start("gone", False), rankings.start("heavy", True)
    await asyncio.sleep(0)
    gone.cancel()
    rankings.end.set()
    await asyncio.gather(first, heavy)
    assert gone.cancelled() and rankings.order == ["first", "heavy"]
    async with asyncio.timeout(1), rankings.slots.hold(True):  # every slot was given back
        pass


async def test_a_heavy_ranking_held_back_for_light_ones_runs_when_their_window_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """It waited for some ranking to end, however long after the light window closed (QA round 60)."""
    from tracker import heavy as heavy_module

    monkeypatch.setattr(heavy_module, "LIGHT_RECENT_S", 0.05)
    rankings = _Rankings(RankingSlots(2))
    async with rankings.slots.hold(False):  # a light one, just now
        pass
    tasks = [rankings.start("heavy0", True), rankings.start("heavy1", True)]
    await asyncio.sleep(0)
    assert rankings.order == ["heavy0"]  # the second place kept for light ones
    await asyncio.sleep(0.3)  # no ranking ends meanwhile
    assert rankings.order == ["heavy0", "heavy1"]
    rankings.end.set()
    await asyncio.gather(*tasks)


async def test_the_slots_refuse_a_second_event_loop_while_the_first_holds_one() -> None:
    """Granted from the first loop's thread, a waiter of another loop was never woken and its place
    was lost for good (QA round 60). Idle, they pass to the next loop: bound for good by a call in a
    loop that had ended, every ranking in the next one failed (QA round 61)."""
    slots = RankingSlots(1)

    async def elsewhere() -> None:
        async with slots.hold(False):
            pass

    async with slots.hold(False):
        with pytest.raises(RuntimeError, match="bound to a different event loop"):
            await asyncio.to_thread(asyncio.run, elsewhere())
    await asyncio.to_thread(asyncio.run, elsewhere())  # idle now: the other loop takes it over
    async with asyncio.timeout(1), slots.hold(True):  # and back; no place was lost
        pass

"""Contents whose rankings are slow, and the places where rankings run, handed out light first.

A content of 100,000 holders takes ~0.17 s to rank on SQLite and ~0.5 s on Postgres, against a few
milliseconds for a typical one. Queued first come, first served, four clients selecting such a content
held every selection slot of a Postgres process (another content's selection waited 23 ms -> 2 s
p50), and on SQLite its ranking ran inside the write transaction, so heartbeats waited behind it
(p99 9.8 -> 290-480 ms; QA round 57). The tracker cannot know a content's weight before it ranks it,
so it remembers the ones that were slow: on SQLite those rank on the read lane (never inside the
write transaction), and on both engines a freed place goes to a waiting ranking of a light content
before a heavy one, and while light contents are being asked for, heavy ones leave one place to
them. With only heavy contents asking (a swarm of hot contents of thousands of holders each) they
use every place, as before: a fixed cap of half the places cost 12% of the selections per second
there.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

#: A content whose rankings average this long is heavy, until their average falls below half of it.
#: The average gives each new ranking half the weight (an unknown content starts at 0), so one
#: reading under twice the threshold does not mark a content: the time is the query's as its
#: caller waits for it (server CPU shared with the other callers, the event loop's turn), and a
#: content of 2,000 holders, 21 ms alone on Postgres, read 25-60 ms under load there and 51-102 ms
#: on SQLite; marked by one reading of 50 ms, it queued behind the heavy ones (QA round 60). A
#: content of 100,000 holders reads 140-1,800 ms: marked at its second ranking at the latest.
HEAVY_RANKING_S = 0.1
#: Contents remembered; the least recently slow is forgotten first.
REMEMBERED = 4_096
#: Heavy rankings leave one place free for light ones while a light one was asked for this recently:
#: with a window of a second, a light content asked every 1.5 s found every place taken and waited
#: 741 ms p50 for a heavy ranking to end (QA round 60).
LIGHT_RECENT_S = 30.0


@dataclass(frozen=True)
class RankingLoad:
    """What ``AvailabilityTracker.ranking_load`` reports: contents remembered as heavy, and rankings
    waiting for a slot now, of light contents and of heavy ones."""

    heavy_contents: int
    light_waiting: int
    heavy_waiting: int


class HeavyContents:
    """Which contents ranked slowly lately: a running average of each content's ranking times.

    A content stays heavy until its average falls below half the threshold (its holders left, or a
    loaded machine made a light one look slow for a while). Contents whose average is well below
    (an eighth of the threshold) are not remembered. ``note`` is called from SQLite's lane threads
    too, so the memory has a lock of its own.
    """

    def __init__(
        self,
        *,
        threshold_s: float = HEAVY_RANKING_S,
        remembered: int = REMEMBERED,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.threshold_s = threshold_s
        self.timer = timer
        self._remembered = remembered
        #: Content -> average ranking time, least recently noted first: the heavy ones, and the
        #: others slow enough to be on their way. Apart, so that the many hot contents of a swarm
        #: never push a heavy one out (QA round 61: 4,096 contents of 30 ms did, and it ranked in
        #: the write transaction again).
        self._heavy: OrderedDict[str, float] = OrderedDict()
        self._rising: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def is_heavy(self, cid: str) -> bool:
        return cid in self._heavy

    def note(self, cid: str, seconds: float) -> None:
        """Remember how long one ranking of ``cid`` took."""
        with self._lock:
            was_heavy = cid in self._heavy
            previous = self._heavy.pop(cid) if was_heavy else self._rising.pop(cid, 0.0)
            average = (previous + seconds) / 2
            heavy = average >= self.threshold_s or (was_heavy and average >= self.threshold_s / 2)
            if heavy:
                self._remember(self._heavy, cid, average)
            elif average >= self.threshold_s / 8:
                self._remember(self._rising, cid, average)

    def _remember(self, memory: OrderedDict[str, float], cid: str, average: float) -> None:
        memory[cid] = average
        while len(memory) > self._remembered:
            memory.popitem(last=False)

    @contextlib.contextmanager
    def timing(self, cid: str) -> Iterator[None]:
        """Time the ranking inside and ``note`` it (not when it raised: a failure says nothing)."""
        started = self.timer()
        yield
        self.note(cid, self.timer() - started)

    def __len__(self) -> int:
        """How many contents are heavy now."""
        return len(self._heavy)


class RankingSlots:
    """``places`` rankings at once; a freed place goes to a waiting light ranking before a heavy one,
    but for one rule: heavy rankings still progress while light ones keep coming, so when none of
    them runs and the last place went to a light one, the first heavy one waiting takes the next.

    While a light ranking was asked for within ``LIGHT_RECENT_S``, heavy ones hold at most
    ``places - 1`` (at least one, so with a single place a light ranking may wait for a heavy one):
    with every place taken by 0.5-s rankings, a light one would wait for one of them to end (QA
    round 57, 2 slots: 2 s p50 first come, first served; 0.5 s light first; 29 ms with a place
    kept). Among rankings of one kind, first come, first served. Bound to the event loop that uses
    it while anything is held or awaited (another loop's call is then a RuntimeError); idle, the
    next loop to call takes it over.
    """

    def __init__(self, places: int, *, elapsed: Callable[[], float] = time.monotonic) -> None:
        self.places = places
        self._free = places
        self._heavy_running = 0
        self._waiting: dict[bool, deque[asyncio.Future[None]]] = {False: deque(), True: deque()}
        self._elapsed = elapsed
        self._light_asked = float("-inf")
        self._last_heavy = False  # the kind of the ranking the last place went to
        self._loop: asyncio.AbstractEventLoop | None = None
        #: A grant due when the light window ends, for a heavy ranking the kept place held back.
        self._regrant: asyncio.TimerHandle | None = None

    @contextlib.asynccontextmanager
    async def hold(self, heavy: bool) -> AsyncIterator[None]:
        await self._acquire(heavy)
        try:
            yield
        finally:
            self._release(heavy)

    @property
    def heavy_running(self) -> int:
        return self._heavy_running

    def waiting(self, heavy: bool) -> int:
        """Rankings of that kind waiting for a place now."""
        return sum(not granted.done() for granted in self._waiting[heavy])

    async def _acquire(self, heavy: bool) -> None:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            if self._free < self.places or self._waiting[False] or self._waiting[True]:
                # Granted from the other loop's thread, a waiter here was never woken, and its
                # place was lost for good (QA round 60).
                raise RuntimeError(f"{self!r} is bound to a different event loop")
            # Idle: nothing of the other loop's is held or awaited, so this one may take it over.
            # Bound for good by a first call in a loop that then ended, every ranking of the
            # tracker opened in the next one failed (QA round 61).
            if self._regrant is not None:
                self._regrant.cancel()
                self._regrant = None
            self._loop = loop
        if not heavy:
            self._light_asked = self._elapsed()
        if not self._waiting[False] and not self._waiting[True] and self._may_run(heavy):
            self._take(heavy)
            return
        granted = loop.create_future()
        self._waiting[heavy].append(granted)
        self._grant()
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self._release(heavy)  # granted as it was cancelled: the place goes to the next
            else:
                if granted in self._waiting[heavy]:
                    self._waiting[heavy].remove(granted)
                self._grant()  # a light waiter gone may be what held a heavy one back
            raise

    def _take(self, heavy: bool) -> None:
        self._free -= 1
        self._heavy_running += heavy
        self._last_heavy = heavy

    def _release(self, heavy: bool) -> None:
        self._free += 1
        self._heavy_running -= heavy
        self._grant()

    def _grant_when_the_window_ends(self) -> None:
        if (self._regrant is not None and not self._regrant.cancelled()) or self._loop is None:
            return
        left = max(0.0, LIGHT_RECENT_S - (self._elapsed() - self._light_asked))

        def regrant() -> None:
            self._regrant = None
            self._grant()

        self._regrant = self._loop.call_later(left + 0.001, regrant)

    def _may_run(self, heavy: bool) -> bool:
        if self._free == 0:
            return False
        if not heavy or self._heavy_running == 0:
            return True
        light_lately = self._elapsed() - self._light_asked < LIGHT_RECENT_S
        return not light_lately or self._heavy_running < self.places - 1

    def _grant(self) -> None:
        light, heavy = self._waiting[False], self._waiting[True]
        while self._free > 0 and (light or heavy):
            turn = self._heavy_running == 0 and not self._last_heavy
            kind = bool(heavy) and (turn or not light)
            if kind and not self._may_run(True):
                # A heavy ranking's turn, but the last place is kept for light ones: until the light
                # window ends (then it runs, though no ranking ended meanwhile; QA round 60).
                self._grant_when_the_window_ends()
                break
            granted = (heavy if kind else light).popleft()
            if granted.done():
                continue  # cancelled while it waited; its task is on its way out
            self._take(kind)
            granted.set_result(None)

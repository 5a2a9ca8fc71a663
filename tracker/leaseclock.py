"""Readings of the tracker's clock for the work that grants, counts or closes leases.

A lease is dated by the clock that granted it. While the host's clock has leapt ahead the tracker
keeps time by elapsed time (``tracker.clockleap``), and when the leap is accepted "now" jumps by
its size: every lease granted during the hold would look lapsed at once, and its peer could be
handed out past ``max_load_per_peer``. So the held leases are moved forward by the leap, once per
accepted leap, in the transaction that stores the acceptance (``AvailabilityTracker._write_clock``).

The move must sit between the work dated by the held clock and the work dated by the new one, with
nothing of either kind on the other side (QA round 3, all found with a real database):

- a selection that read the clock again after the move was checked ranked and granted with a
  reading that accepted the leap, counted the held leases as lapsed and handed a peer at cap 1 out
  twice;
- on Postgres a grant dated by the held clock that committed after another task's move was never
  moved;
- an outcome applied with a reading that accepted the leap closed no lease.

Hence: each operation takes one reading and uses it for everything it does (``reading``), under a
shared lock that the move takes exclusively. A reading that finds an acceptance not yet followed by
the move makes the move first (waiting for the operations still working with held readings to
commit, so their leases move too) and reads again. A write holds its reading until its group
commit has committed: the events it stamped with it are applied on the same side of the move, and
the transaction's own reading (``on_behalf``) is brought onto that side too. In the common case
this costs a comparison and an uncontended shared lock, 1.7 us a write.

The move is stored with the clock's state, in a write transaction. When that fails (the database
briefly locked or unreachable), operations go on by the held clock, their readings the new clock's
less the leap, as before the acceptance, and the sweeper and the reads stay behind the leap for as
long; the move is tried again by the first reading after a back-off of 1, 2, 4 ... 30 s of elapsed
time. The store's error used to be every operation's: each one tried the move again, in turn, and
failed with it, heartbeats included, so that peers timed out, which is what holding the clock is
for (QA round 11).

Within one process. Several processes of one boot each accept the leap at their own reading (up to
a sweep apart) and each moves the leases dated by its own held clock (docs/operations.md, Clocks).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from .clockleap import ClockState, SteadyClock

log = logging.getLogger(__name__)

#: Held leases to be moved: (the new clock's reading at the move, the gap owed, ``LeaseClock.gap``);
#: the held clock then read the first less the second.
Shift = tuple[float, float]
#: Elapsed seconds before a failed move is tried again: doubling from 1 up to this.
MAX_RETRY_S = 30.0
#: Stores the clock's state as of a reading, moving the held leases first when given a ``Shift``,
#: in one transaction.
Store = Callable[[float, ClockState | None, Shift | None], Awaitable[None]]


class _Gate:
    """Shared by any number of holders, or held by one exclusive holder alone; an exclusive holder
    waiting keeps new shared ones out.

    Not aiorwlock: it tracks the tasks that own its lock in a list, and the tracker's writers hold
    the shared side until their group commit ends, a hundred at a time; each acquisition then cost
    12.6 us against 3.4 us alone (measured). Here the shared side is a counter, and the exclusive
    side runs once per accepted leap.
    """

    def __init__(self) -> None:
        self._shared = 0
        self._open = asyncio.Event()  # no exclusive holder or waiter
        self._open.set()
        self._idle = asyncio.Event()  # no shared holder
        self._idle.set()
        self._exclusive = asyncio.Lock()
        self._held = False  # the exclusive side is held (not merely awaited)

    async def acquire_shared(self, *, join: bool = False) -> None:
        """``join``: past an exclusive holder that is only waiting, for work that shared holders
        are waiting on (it would wait for them, and they for the work)."""
        if join:
            while self._held:
                await self._open.wait()
        elif not self._open.is_set():  # else at once: no trip round the event loop on the hot path
            while not self._open.is_set():
                await self._open.wait()
        self._shared += 1
        self._idle.clear()

    def release_shared(self) -> None:
        self._shared -= 1
        if not self._shared:
            self._idle.set()

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._exclusive:
            self._open.clear()
            try:
                while self._shared:  # a joining holder may come in while this one waits
                    await self._idle.wait()
                self._held = True
                yield
            finally:
                self._held = False
                self._open.set()


class LeaseClock:
    """``SteadyClock`` readings kept on one side of the move of held leases (see the module)."""

    def __init__(self, clock: SteadyClock, store: Store) -> None:
        self.clock = clock
        self._store = store
        self._gate = _Gate()
        self._reading = _Reading(self, self._gate)
        self._on_behalf = _OnBehalf(self, self._gate)
        #: The acceptance (``SteadyClock.accepted``) whose held leases were moved, once committed.
        self.shifted_for = 0
        self._failures = 0  # moves failed in a row
        self._retry_at = 0.0  # elapsed time before which a failed move is not tried again
        # The clock's gap_total and back_total when nothing was owed: a move owes what they added.
        self._base_gap = self._base_back = 0.0

    def rebind(self) -> None:
        """New locks for another event loop (a tracker reopened there), keeping what was moved: made
        anew, the clock owed the whole accepted leap again and moved held leases a second time."""
        self._gate = _Gate()
        self._reading = _Reading(self, self._gate)
        self._on_behalf = _OnBehalf(self, self._gate)

    def gap(self) -> float:
        """How far the clock reads ahead of the one the unmoved held leases are dated by: the gaps
        of the leaps accepted since the last move, less the steps back since (0: nothing owed).

        Added up, not the latest: a second leap accepted while the first one's move was failing
        took the first's place, and the leases moved by the second alone (QA round 14). Less the
        steps back: NTP undoing the leap while its move was pending left readings a leap behind
        the corrected clock, and heartbeating peers timed out (QA round 14). Set back by at least
        the gap, the leases' clock is the clock again and nothing is owed.
        """
        clock = self.clock
        if clock.accepted != self.shifted_for:
            owed = (clock.gap_total - self._base_gap) - (clock.back_total - self._base_back)
            if owed > 0.0:
                return owed
            self.shifted_for = clock.accepted
        self._base_gap, self._base_back = clock.gap_total, clock.back_total  # on every reading: no alloc
        return 0.0

    @property
    def pending(self) -> bool:
        """An accepted leap whose held leases have not been moved yet: readings are the held clock's."""
        return self.gap() > 0.0

    def moved(self) -> None:
        """The owed move was stored (here, or by the tracker as it opened)."""
        self.shifted_for, self._failures = self.clock.accepted, 0
        self._base_gap, self._base_back = self.clock.gap_total, self.clock.back_total

    def peek(self) -> float:
        """ "Now" by the clock leases are dated by, without a reading's hold: for a ranking whose
        loads are counted again with a reading before anything is granted."""
        now = self.clock()
        gap = self.gap()
        return now - gap if gap else now

    def _due(self) -> bool:
        elapsed = self.clock.elapsed
        return elapsed is None or elapsed() >= self._retry_at

    def _held(self, now: float, gap: float) -> float:
        """The held clock's reading for the new clock's ``now``, while the move of ``gap`` is
        pending; the sweeper and reads stay behind the leap while rows are dated so."""
        self.clock.extend_lag()
        return now - gap

    def reading(self) -> _Reading:
        """``async with leases.reading() as now``: one reading of "now" for an operation on leases;
        no move of held leases runs until the block ends, and none is owed for the reading."""
        return self._reading

    def on_behalf(self) -> _OnBehalf:
        """``async with leases.on_behalf() as now``: a reading for work that operations holding
        readings wait on (group commit's transaction), in their clock's frame: if this reading
        accepts a leap, the move it owes waits for them, and so for this work, so the reading is
        taken back by the leap, to the held clock they read. The block keeps the move out too:
        writers that gave up waiting (cancelled) release their readings while their transaction
        may still run."""
        return self._on_behalf

    async def shift(self) -> None:
        """Move the held leases of an accepted leap and store the clock's state with them, after
        every operation holding a reading has ended; nothing when already done. A failure is
        logged, and the move tried again after a back-off (see the module)."""
        async with self._gate.exclusive():
            clock = self.clock
            now = clock()
            gap = self.gap()
            if not gap:
                return
            try:
                await self._store(now, clock.state(), (now, gap))
            except Exception as error:
                self._failures += 1
                delay = min(MAX_RETRY_S, 2.0 ** (self._failures - 1))
                self._retry_at = (clock.elapsed() if clock.elapsed is not None else 0.0) + delay
                log.warning(
                    "could not store the accepted clock leap and move the leases granted before it "
                    "(%s: %s): the tracker keeps the held clock and tries again in %g s",
                    type(error).__name__,
                    error,
                    delay,
                    extra={"action": "clock_leases_move_failed", "failures": self._failures},
                )
                return
            self.moved()

    async def save(self) -> None:
        """Store the clock's state (each sweep): a stored acceptance always comes with its leases
        moved, so a process that resumes it leaves them alone."""
        async with self.reading() as now:
            if self.pending:  # the move stores the state with it, when it succeeds
                return
            await self._store(now, self.clock.state(), None)


class _Reading:
    """``LeaseClock.reading()``: a class rather than a generator-based context manager, which cost
    4.5 us a write where this costs 1.7 (measured)."""

    __slots__ = ("_gate", "_leases")

    def __init__(self, leases: LeaseClock, gate: _Gate) -> None:
        self._leases, self._gate = leases, gate

    async def __aenter__(self) -> float:
        leases, gate = self._leases, self._gate
        while True:
            await gate.acquire_shared()
            try:
                now = leases.clock()
                gap = leases.gap()
                if not gap:
                    return now
                if not leases._due():  # a move failed: work goes on by the held clock meanwhile
                    return leases._held(now, gap)
            except BaseException:
                gate.release_shared()
                raise
            gate.release_shared()
            await leases.shift()

    async def __aexit__(self, *exc_info: object) -> None:
        self._gate.release_shared()


class _OnBehalf(_Reading):
    """``LeaseClock.on_behalf()``: joins the gate and never makes the move itself.

    The leap taken back is the gap the held clock's readings are behind (``LeaseClock.gap``: the
    accepted leaps' own gaps), by which the move shifts leases too: not the sweeper's lag, which
    also counts steps within the tolerance followed before the leap (taken back, they dated work
    earlier than the held clock did, and the move brought lapsed leases back: QA round 11)."""

    __slots__ = ()

    async def __aenter__(self) -> float:
        leases = self._leases
        await self._gate.acquire_shared(join=True)
        try:
            now = leases.clock()
        except BaseException:
            self._gate.release_shared()
            raise
        if gap := leases.gap():
            now = leases._held(now, gap)
        return now

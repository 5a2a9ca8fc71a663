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

Within one process. Several processes of one boot each accept the leap at their own reading (up to
a sweep apart) and each moves the leases dated by its own held clock (docs/operations.md, Clocks).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from .clockleap import ClockState, SteadyClock

#: An accepted leap whose held leases are to be moved: (wall time of the acceptance, size).
Shift = tuple[float, float]
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
        every operation holding a reading has ended; nothing when already done."""
        async with self._gate.exclusive():
            clock = self.clock
            now = clock()
            accepted = clock.accepted
            if accepted == self.shifted_for:
                return
            await self._store(now, clock.state(), (clock.accepted_at, clock.accepted_lag))
            self.shifted_for = accepted

    async def save(self) -> None:
        """Store the clock's state (each sweep): a stored acceptance always comes with its leases
        moved, so a process that resumes it leaves them alone."""
        async with self.reading() as now:
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
                if leases.clock.accepted == leases.shifted_for:
                    return now
            except BaseException:
                gate.release_shared()
                raise
            gate.release_shared()
            await leases.shift()

    async def __aexit__(self, *exc_info: object) -> None:
        self._gate.release_shared()


class _OnBehalf(_Reading):
    """``LeaseClock.on_behalf()``: joins the gate and never makes the move itself.

    The leap taken back is the accepted one, ``max(surplus, drift)``: when steps within the
    tolerance were followed before the leap (drift > surplus), that is more than the held clock's
    own gap, by their sum, which is at most ``max_clock_skew_s`` (a larger sum would have been a
    leap itself): such work is dated up to that much earlier than the held clock would date it,
    within the skew the tracker accepts from any clock, and the move shifts leases by the same."""

    __slots__ = ()

    async def __aenter__(self) -> float:
        leases = self._leases
        await self._gate.acquire_shared(join=True)
        try:
            now = leases.clock()
        except BaseException:
            self._gate.release_shared()
            raise
        if leases.clock.accepted != leases.shifted_for:
            now -= leases.clock.accepted_lag
        return now

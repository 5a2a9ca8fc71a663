"""The tracker's "now": the configured clock, except while it has leapt forward.

Every time the tracker acts on is measured from "now". If the host's clock is stepped a day ahead (a
bad NTP source, a mistyped ``date``), one sweep would time out every peer and delete the mappings of
all of them, every event the tracker stamps itself would be dated a day ahead, and when the clock
is corrected those rows would keep peers online (and their removals, stamped "earlier", would be
ignored as stale) for the day. Nothing brings the deleted mappings back until each peer announces
its contents again.

A clock that leaps is told apart from time that passed by an elapsed-time clock that no one can
set: ``CLOCK_BOOTTIME`` on Linux (it keeps counting while the host is suspended, when wall time
really passes), else ``time.monotonic``. Each reading compares the wall clock's advance with
elapsed time, since the last trusted reading and since an older one (so that a leap made of steps
each within the tolerance adds up); a surplus beyond the allowed skew is a leap, and while it lasts
"now" is the last trusted reading plus elapsed time: peers time out, leases lapse and events are
stamped as if the clock had not moved. The leap ends when the clock is set back in step, or after
``accept_after_s`` of elapsed time, when it is taken as the correction of a clock that was behind
(until then peers time out up to that much late; the sweeper stays behind it for as long again, see
``for_sweep``). A clock stepped back is followed at once, and counted: rows stamped before it may
now lie ahead, and the sweeper brings this node's back to "now" (``queries.sweep.clamp_future``).

A process's first reading has nothing of its own to compare with, so a leap while no tracker ran
would go unseen. Elapsed time counts on across processes within one boot of the host, though: each
tracker stores its clock's state (``ClockState``) in the database keyed by the kernel's boot id, on
opening, with the first selection, write or sweep after accepting a leap, and on each sweep, and a
process opened later in the same boot resumes from it. After a reboot (another boot id), or on
another host of a shared Postgres, there is nothing to resume from.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


def system_elapsed() -> float:
    """Seconds of an elapsed-time clock that counts suspended time and cannot be set."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    if boottime is not None:
        return time.clock_gettime(boottime)
    return time.monotonic()


BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
TIMENS_OFFSETS_PATH = Path("/proc/self/timens_offsets")


def system_boot_id() -> str | None:
    """The kernel's id of this boot (Linux), which names the span ``system_elapsed`` counts within;
    ``None`` where there is none (then no clock state is stored).

    A time namespace (checkpoint/restore of a container) may shift ``CLOCK_BOOTTIME`` by an offset:
    elapsed times of two such processes do not compare, so the offset is part of the name (QA: a
    state stored by a clock an hour behind read as a leap of an hour, and events were refused).
    """
    try:
        boot = BOOT_ID_PATH.read_text().strip()  # procfs: served from memory, never blocks
    except OSError:
        return None
    if not boot:
        return None
    try:
        offsets = TIMENS_OFFSETS_PATH.read_text().split("\n")
    except OSError:  # no time namespaces (kernel before 5.6): no offset
        return boot
    for line in offsets:
        fields = line.split()
        if len(fields) == 3 and fields[0] in ("boottime", str(getattr(time, "CLOCK_BOOTTIME", 7))):
            if fields[1:] != ["0", "0"]:
                return f"{boot}@{fields[1]}.{int(fields[2]):09d}"
    return boot


@dataclass(frozen=True, slots=True)
class ClockState:
    """What a ``SteadyClock`` has learnt that a later process of the same boot needs: the latest
    reading in step (and elapsed time then), a leap under way, a lag after an accepted one."""

    wall: float
    elapsed: float
    held_since: float | None = None
    lag_s: float = 0.0
    lag_until: float = 0.0


class SteadyClock:
    """A zero-argument clock: ``wall()``, or while ``wall`` has leapt ahead, elapsed time since the
    last reading that was in step. Without ``elapsed`` it is ``wall`` itself."""

    def __init__(
        self,
        wall: Callable[[], float],
        elapsed: Callable[[], float] | None,
        *,
        tolerance_s: float,
        accept_after_s: float,
    ) -> None:
        self.wall = wall
        self.elapsed = elapsed
        self.tolerance_s = tolerance_s
        self.accept_after_s = accept_after_s
        self._wall: float | None = None  # the last reading in step, and elapsed time then
        self._mono = 0.0
        # Older readings in step, a new one every accept_after_s, the one before kept until the new
        # one is that old: a leap made of steps each within the tolerance (or a clock running fast)
        # adds up against them, also across a renewal.
        self._anchors: list[tuple[float, float]] = []
        self._held_since: float | None = None
        # After a leap is accepted: (its size, elapsed time until which sweeps still run behind it).
        self._lag = (0.0, 0.0)
        #: How far the wall clock runs ahead of "now" (0.0 when in step): for metrics and reports.
        self.leap_s = 0.0
        #: Steps back by more than the tolerance seen so far (rows stamped before one may be ahead).
        self.steps_back = 0
        #: The earliest time stepped back to since the sweeper last brought this node's rows back to
        #: it (``None``: nothing to repair); the sweeper clears it.
        self.stepped_back_to: float | None = None
        #: Leaps accepted so far, and the wall time of the latest acceptance.
        self.accepted = 0
        self.accepted_at = 0.0
        #: Every accepted leap's gap (how far it put the clock ahead of the held one) added up, and
        #: every step back's size: what the lease clock counts a move it owes from
        #: (``tracker.leaseclock``). A gap, not ``accepted_lag``, which also counts steps within the
        #: tolerance followed before the leap (the sweeper stays behind those too): the held clock
        #: had followed them (QA round 11).
        self.gap_total = 0.0
        self.back_total = 0.0

    @property
    def accepted_lag(self) -> float:
        """The size of the latest accepted leap (0 before any)."""
        return self._lag[0]

    def __call__(self) -> float:
        wall = self.wall()
        if self.elapsed is None:
            return wall
        mono = self.elapsed()
        if self._wall is None:
            return self._trust(wall, mono, anchor=True)
        steady = self._wall + (mono - self._mono)
        surplus = wall - steady
        drifts = [wall - (aw + (mono - am)) for aw, am in self._anchors]
        drift = max(drifts)
        if surplus < -self.tolerance_s or min(drifts) < -self.tolerance_s:  # small steps add up too
            self.steps_back += 1
            self.back_total += max(0.0, -surplus)
            earliest = self.stepped_back_to
            self.stepped_back_to = wall if earliest is None else min(earliest, wall)
            self._lag = (0.0, 0.0)
            self._anchors.clear()
            log.warning(
                "the clock stepped %.6g s back: followed at once",
                -surplus,
                extra={"action": "clock_step_back", "surplus_s": surplus},
            )
            return self._trust(wall, mono, anchor=True)
        if surplus <= self.tolerance_s and drift <= self.tolerance_s:
            if self._held_since is not None:
                log.warning(
                    "the clock is back in step with elapsed time",
                    extra={"action": "clock_leap_over", "surplus_s": surplus},
                )
            return self._trust(wall, mono, anchor=mono - self._anchors[-1][1] >= self.accept_after_s)
        if self._held_since is None:
            self._held_since = mono
            log.warning(
                "the clock leapt %.6g s ahead of elapsed time: the tracker keeps time by elapsed time "
                "(taken as a correction if it persists for %g s)",
                max(surplus, drift),
                self.accept_after_s,
                extra={"action": "clock_leap", "surplus_s": max(surplus, drift)},
            )
        if mono - self._held_since >= self.accept_after_s:
            log.warning(
                "the clock's leap of %.6g s persisted for %g s: taken as a correction",
                max(surplus, drift),
                self.accept_after_s,
                extra={"action": "clock_leap_accepted", "surplus_s": max(surplus, drift)},
            )
            # Steps within the tolerance before it were followed, so stamps older than them are
            # behind the new clock by the whole drift: the sweeper stays behind by that much.
            self._lag = (max(surplus, drift), mono + self.accept_after_s)
            self.accepted, self.accepted_at = self.accepted + 1, wall
            self.gap_total += surplus
            self._anchors.clear()
            return self._trust(wall, mono, anchor=True)
        self.leap_s = surplus
        return steady

    def lag(self) -> float:
        """How far the sweeper, and the presence cutoff of reads, stay behind ``self()``: the size of
        a leap accepted less than ``accept_after_s`` ago, else 0.

        The rows stored before the leap are dated by the old clock: the moment it is accepted they
        all look a leap old, and a sweep would time out peers that spoke a second ago and delete
        their mappings, and reads would show them offline until they speak again. Behind by the
        leap, only peers silent for ``peer_timeout`` by elapsed time count as gone, while the live
        ones speak again under the new clock.
        """
        size, until = self._lag
        if size and self.elapsed is not None and self.elapsed() < until:
            return size
        return 0.0

    def extend_lag(self) -> None:
        """Keep ``lag()`` on for ``accept_after_s`` from now: rows are still being dated by the held
        clock (its leases' move has not been stored yet: ``tracker.leaseclock``)."""
        size, until = self._lag
        if size and self.elapsed is not None:
            self._lag = (size, max(until, self.elapsed() + self.accept_after_s))

    def for_sweep(self) -> float:
        """ "Now" for the sweeper's timeouts and retention: ``self()`` less ``lag()``."""
        now = self()
        return now - self.lag()

    def state(self) -> ClockState | None:
        """The state to store for the next process of this boot (``None`` before the first reading,
        or without an elapsed clock)."""
        if self.elapsed is None or self._wall is None:
            return None
        return ClockState(self._wall, self._mono, self._held_since, *self._lag)

    def resume(self, state: ClockState) -> bool:
        """Continue from a state an earlier process of the same boot stored, before the first
        reading: a leap made since it was stored shows at that reading, one under way keeps its
        start (a process restarting within ``accept_after_s`` never accepts it), an accepted one
        keeps the sweeper behind it. Ignored (``False``) after a reading, and when elapsed time is
        behind the state's (not the clock it was measured on: a time namespace, an injected clock)."""
        if self.elapsed is None or self._wall is not None or self.elapsed() < state.elapsed:
            return False
        self._wall, self._mono = state.wall, state.elapsed
        self._anchors = [(state.wall, state.elapsed)]
        self._held_since = state.held_since
        self._lag = (state.lag_s, state.lag_until)
        if state.held_since is not None:
            log.warning(
                "an earlier tracker process of this boot saw the clock leap ahead: time is kept by "
                "elapsed time until the leap ends or persists for %g s",
                self.accept_after_s,
                extra={"action": "clock_leap_resumed"},
            )
        return True

    def _trust(self, wall: float, mono: float, *, anchor: bool) -> float:
        self._wall, self._mono, self._held_since, self.leap_s = wall, mono, None, 0.0
        if anchor:
            self._anchors = [*self._anchors[-1:], (wall, mono)]
        return wall

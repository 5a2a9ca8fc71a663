"""Noticing the tracker's own clock leaping forward, so the sweeper does not act on it.

Every time the sweeper acts on is "now minus a duration": a peer unseen for ``peer_timeout`` goes
offline, a mapping whose peer has been gone for ``offline_mapping_retention_s`` is deleted. If the
host's clock is stepped a day ahead (a bad NTP source, a mistyped ``date``), one pass marks every
peer offline and deletes the mappings of all of them, and when the clock is corrected nothing
brings those mappings back until each peer announces its contents again.

A clock that leaps is told apart from time that passed by an elapsed-time clock that no one can
set: ``CLOCK_BOOTTIME`` on Linux (it keeps counting while the host is suspended, when wall time
really passes), else ``time.monotonic``. Between two passes the wall clock should advance as much
as it does; a surplus beyond the allowed skew is a leap, and the sweeper holds its pass (changes
nothing) while the surplus lasts. A leap that is the clock being corrected (it was behind) is
accepted after ``accept_after_s`` of elapsed time: until then peers are timed out at most that much
late, the price of never acting on a clock that will be stepped back.

A leap while the process was not running cannot be seen: the first pass has nothing to compare.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


def system_elapsed() -> float:
    """Seconds of an elapsed-time clock that counts suspended time and cannot be set."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    if boottime is not None:
        return time.clock_gettime(boottime)
    return time.monotonic()


@dataclass
class ClockLeapGuard:
    """Compares the wall clock's advance with the elapsed clock's between passes."""

    elapsed: Callable[[], float]
    #: A surplus above this is a leap (the tracker's ``max_clock_skew_s``).
    tolerance_s: float
    #: How long a leap is held before it is taken as the clock's correction (``peer_timeout``).
    accept_after_s: float
    _wall: float | None = None
    _mono: float = 0.0
    _held_since: float | None = None

    def leap(self, wall: float) -> float | None:
        """How far ``wall`` runs ahead of what the previous trusted pass and elapsed time give, if
        that is a leap the pass should hold for; ``None``: act on ``wall``."""
        mono = self.elapsed()
        if self._wall is None:
            self._trust(wall, mono)
            return None
        surplus = wall - (self._wall + (mono - self._mono))
        if surplus <= self.tolerance_s:
            if self._held_since is not None:
                log.warning(
                    "the clock is back in step with elapsed time; sweeping again",
                    extra={"action": "clock_leap_over", "surplus_s": surplus},
                )
            self._trust(wall, mono)
            return None
        if self._held_since is None:
            self._held_since = mono
            log.warning(
                "the clock leapt %.6g s ahead of elapsed time since the last sweep: holding timeouts "
                "and pruning (accepted as a correction after %g s if it persists)",
                surplus,
                self.accept_after_s,
                extra={"action": "clock_leap", "surplus_s": surplus},
            )
        if mono - self._held_since >= self.accept_after_s:
            log.warning(
                "the clock's leap of %.6g s persisted for %g s: taken as a correction, sweeping on it",
                surplus,
                self.accept_after_s,
                extra={"action": "clock_leap_accepted", "surplus_s": surplus},
            )
            self._trust(wall, mono)
            return None
        return surplus

    def _trust(self, wall: float, mono: float) -> None:
        self._wall, self._mono, self._held_since = wall, mono, None

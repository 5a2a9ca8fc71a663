"""Helpers for testing code that embeds the tracker: a clock you move by hand."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ManualClock:
    """A ``TrackerConfig.clock`` that only moves when told to, so timeouts are tested without sleeping.

    >>> clock = ManualClock(1_800_000_000.0)
    >>> clock.advance(301)
    1800000301.0
    """

    now: float = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now

    #: What ``monotonic()`` reports: elapsed time, moved by ``advance`` but not by ``leap``.
    elapsed: float = 0.0

    def advance(self, seconds: float) -> float:
        """Move forward by ``seconds`` (time passes) and return the new time."""
        self.now += seconds
        self.elapsed += seconds
        return self.now

    def leap(self, seconds: float) -> float:
        """Step the wall time by ``seconds`` (either way) while no time passes: a clock being set."""
        self.now += seconds
        return self.now

    def monotonic(self) -> float:
        """For ``TrackerConfig(monotonic=clock.monotonic)``: the elapsed time, which ``leap`` skips."""
        return self.elapsed

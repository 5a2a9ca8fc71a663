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

    def advance(self, seconds: float) -> float:
        """Move forward by ``seconds`` and return the new time."""
        self.now += seconds
        return self.now

"""Token buckets per client: a flood from one connection or one gossip neighbour gets 429s and leaves
the capacity of everyone else alone."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable


class TokenBuckets:
    """One bucket per key: ``rate`` tokens per second up to ``burst``; each request takes one.

    Keys are kept in least-recently-used order and at most ``max_keys`` of them, so a client that
    opens connection after connection costs bounded memory (a forgotten key starts with a full bucket,
    which is the generous side to err on). ``clock`` is injectable for tests.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 10_000,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    def take(self, key: Hashable) -> float:
        """Take a token: 0.0 if there was one, else the seconds until there will be (for Retry-After)."""
        now = self._clock()
        tokens, at = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - at) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return wait

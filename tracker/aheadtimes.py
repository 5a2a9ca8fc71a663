"""The time an event without ``at`` is stored under: now, or just after what its peer dated ahead.

The latest event by time wins (presence, mappings). A client whose clock runs ahead of the
tracker's, within ``max_clock_skew_s``, dated an announcement ahead, then sent a removal or a
goodbye without ``at``: the tracker dated that one now, older than the announcement, so it lost,
though it got 200, and the peer stayed online holding the content (QA round 40). An event without
``at`` means "as of its receipt", and whatever the tracker has accepted from a peer already
happened by then: it is dated just after the latest time this process has accepted for its peer
while that time is still ahead of the clock, as a Lamport clock orders what it receives.

Dated events keep their times, so a client that dates every event (as docs/api.md advises) keeps
its own order, whatever order its requests arrive in and whichever process of a shared database
takes them; storing times ahead as of their receipt instead, a removal taken by a process whose
clock lagged lost to the announcement it followed. The times are kept in this process only, and
only while ahead: an undated removal taken by another process than the announcement it follows
still loses until that process's clock passes the announcement (docs/api.md, "Times").
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

from .events import Event, UploadOutcome

#: How often, in the tracker's seconds, times the clock has passed are dropped.
_PRUNE_EVERY_S = 10.0


def _dates_the_peer(event: Event) -> bool:
    """Whether the event dates its peer's presence or a mapping: all but a failed upload report,
    which a downloader sends about the peer (whose clock it does not share) and which is no
    sighting: taken as the peer's latest time, it kept a departed peer online that much longer."""
    return not (isinstance(event, UploadOutcome) and not event.success)


class AheadTimes:
    """Per peer, the latest time ahead of the clock that this process accepted in an event."""

    def __init__(self, max_skew_s: float) -> None:
        self._max_skew_s = max_skew_s
        self._latest: dict[str, float] = {}
        # Batches are stamped on worker threads too (``offload.off_loop``).
        self._lock = threading.Lock()
        self._next_prune = -math.inf

    def dated(self, events: Sequence[Event], now: float) -> list[tuple[Event, float]]:
        """Each event with the time it is stored under, for a batch received at ``now``."""
        out: list[tuple[Event, float]] = []
        with self._lock:
            latest = self._latest
            if latest and now >= self._next_prune:
                self._prune(now)
            for event in events:
                at = event.at
                if at is None:
                    ahead = latest.get(event.peer_id)
                    # Beyond the skew: the clock stepped back since; such times are not followed.
                    if ahead is not None and now < ahead <= now + self._max_skew_s:
                        at = math.nextafter(ahead, math.inf)
                    else:
                        at = now
                elif at > now and at > latest.get(event.peer_id, -math.inf) and _dates_the_peer(event):
                    latest[event.peer_id] = at
                out.append((event, at))
        return out

    def _prune(self, now: float) -> None:
        self._latest = {peer: at for peer, at in self._latest.items() if at > now}
        self._next_prune = now + _PRUNE_EVERY_S

    def __len__(self) -> int:
        return len(self._latest)

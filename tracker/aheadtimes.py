"""The time a peer's own event without ``at`` is stored under: now, or just after what the peer
dated ahead.

The latest event by time wins (presence, mappings). A client whose clock runs ahead of the
tracker's, within ``max_clock_skew_s``, dated an announcement ahead, then sent a removal or a
goodbye without ``at``: the tracker dated that one now, older than the announcement, so it lost,
though it got 200, and the peer stayed online holding the content (QA round 40). An event without
``at`` means "as of its receipt", and whatever the tracker has accepted from a peer already
happened by then: it is dated just after the latest time this process has accepted for its peer
while that time is still ahead of the clock, as a Lamport clock orders what it receives.

Only the peer's own events count, both ways: presence (``PeerOnline``, ``PeerOffline``) and its
mappings (``ContentAvailable``, ``ContentUnavailable``). Upload outcomes and speed samples are
reported about the peer by its downloaders, on their clocks: taken as the peer's times, one
downloader's fast clock dated the peer's undated heartbeats and announcements ahead, so that its
goodbye, dated right by its own clock, lost, and its correctly dated samples fell out of the speed
window (QA round 46). Such reports dated ahead are stored as of their receipt instead: a success or
a sample is a sighting, and dated ahead by a fast downloader it outranked the peer's own goodbye
just the same, which kept a departed peer online and selected for minutes (QA round 48). Between
reports of many downloaders' clocks the order of arrival is as good as any.

Dated events keep their times, so a client that dates every event (as docs/api.md advises) keeps
its own order, whatever order its requests arrive in and whichever process of a shared database
takes them; storing times ahead as of their receipt instead, a removal taken by a process whose
clock lagged lost to the announcement it followed. The times are kept in this process only, and
only while ahead: an undated removal taken by another process than the announcement it follows
(another process of one Postgres, another tracker by gossip, this one after a restart) still loses
until that process's clock passes the announcement (docs/api.md, "Times").
"""

from __future__ import annotations

import heapq
import logging
import math
import threading
from collections.abc import Sequence

from .events import ContentAvailable, ContentUnavailable, Event, PeerOffline, PeerOnline

log = logging.getLogger("tracker")

#: The peer's own events: the ones whose times are the peer's clock's.
_OWN = (PeerOnline, PeerOffline, ContentAvailable, ContentUnavailable)

#: Peers remembered at most. A tracker whose clock runs behind its clients' has every peer that
#: dates its events ahead of it, for as long as the lag; past this many, a new peer's undated events
#: are dated now (as before 2026-12-07), which costs nothing more than that. Ids of 256 characters
#: outside the BMP take 1 KiB each: 200,000 held 245 MB (QA round 48).
MAX_PEERS = 100_000

#: How far behind the latest remembered time minus the skew ``now`` must be to be a step back of
#: the clock: large batches are stamped on worker threads with a reading a little older than one
#: already used, and each such batch rebuilt the whole map (QA round 49: 58 ms at 100,000 peers).
_STEP_BACK_S = 1.0

#: Passed times forgotten at most per call (see ``AheadTimes._forget_passed``).
_FORGET_AT_ONCE = 1_000


class AheadTimes:
    """Per peer, the latest time ahead of the clock that this process accepted in one of its own
    events; each forgotten once the clock has passed it (a heap by time, so that no pass walks them
    all: a rebuild of 190,000 of them every 10 s held a heartbeat for 58 ms, QA round 46)."""

    def __init__(self, max_skew_s: float, max_peers: int = MAX_PEERS) -> None:
        self._max_skew_s = max_skew_s
        self._max_peers = max_peers
        self._latest: dict[str, float] = {}
        self._expiry: list[tuple[float, str]] = []  # (time, peer): one entry a remembered peer
        self._highest = -math.inf  # no remembered time is later
        self._warned = False
        # Batches are stamped on worker threads too (``offload.off_loop``).
        self._lock = threading.Lock()
        # The limit beyond which the sweeper brought this node's rows back, told once it committed,
        # until the next batch forgets by it; a lock of its own, held for an assignment only.
        self._clamped_beyond: float | None = None
        self._clamp_lock = threading.Lock()

    def rows_clamped_beyond(self, limit: float) -> None:
        """The sweeper brought this node's rows dated beyond ``limit`` back (``clamp_future``, after
        a clock step back): the next batch forgets the times beyond it too. A tracker quiet through
        the step saw it only at a later batch's reading, within the skew of which such a time lay,
        and followed it: the peer's heartbeat went back into the future (QA round 49). Told by the
        sweeper, not by the clock: forgotten at the step itself, a time the sweeper did not bring
        back (within the skew of its pass) was forgotten while its row stayed, and the peer's undated
        removal lost to its own announcement for good (QA round 52)."""
        with self._clamp_lock:
            pending = self._clamped_beyond
            self._clamped_beyond = limit if pending is None else min(pending, limit)

    def dated(self, events: Sequence[Event], now: float) -> list[tuple[Event, float]]:
        """Each event with the time it is stored under, for a batch received at ``now``."""
        out: list[tuple[Event, float]] = []
        with self._clamp_lock:
            clamped, self._clamped_beyond = self._clamped_beyond, None
        with self._lock:
            if clamped is not None and self._highest > clamped:
                self._forget_beyond(clamped)
            if self._highest > now + self._max_skew_s + _STEP_BACK_S:
                self._forget_beyond(now + self._max_skew_s)
            self._forget_passed(now)
            latest = self._latest
            for event in events:
                at = event.at
                if not isinstance(event, _OWN):
                    # Reported about the peer by a downloader, on its clock: no later than receipt.
                    # A fast one's success or sample, a sighting dated ahead, outranked the peer's
                    # own goodbye, undated or dated right, and kept it online and selected for
                    # minutes (QA round 48).
                    at = now if at is None else min(at, now)
                elif at is None:
                    ahead = latest.get(event.peer_id)
                    at = now if ahead is None or ahead <= now else math.nextafter(ahead, math.inf)
                elif at > now:
                    self._remember(event.peer_id, at)
                out.append((event, at))
        return out

    def _remember(self, peer: str, at: float) -> None:
        latest = self._latest
        known = latest.get(peer)
        if known is not None:
            # Its heap entry stays at the earlier time, and moves on when that time comes: one
            # entry a peer, however often it dates ahead (every heartbeat, from a clock ahead).
            latest[peer] = max(known, at)
        elif len(latest) >= self._max_peers:
            if not self._warned:
                self._warned = True
                log.warning(
                    "%d peers dated events ahead of this tracker's clock in the last max_clock_skew_s: "
                    "is its clock behind? Past that many, events sent without at are dated now",
                    len(latest),
                    extra={"action": "clock_behind_clients"},
                )
            return
        else:
            latest[peer] = at
            heapq.heappush(self._expiry, (at, peer))
        self._highest = max(self._highest, at)

    def _forget_passed(self, now: float) -> None:
        """Forget times the clock has passed, at most ``_FORGET_AT_ONCE`` a call: many dated by one
        batch pass together, and forgotten all at once they held a heartbeat for 344 ms (190,000;
        QA round 48). Those left wait for the next calls; a passed time is not followed meanwhile."""
        expiry, latest = self._expiry, self._latest
        for _ in range(_FORGET_AT_ONCE):
            if not expiry or expiry[0][0] > now:
                return
            _, peer = heapq.heappop(expiry)
            current = latest[peer]
            if current <= now:
                del latest[peer]
            else:  # raised since it was pushed
                heapq.heappush(expiry, (current, peer))

    def _forget_beyond(self, limit: float) -> None:
        """The clock stepped back: forget every time beyond ``limit`` (now plus the skew). The sweeper
        brings such rows back to now; followed once the clock came near them again, and kept alive
        by the peer's next dated events, they put rows back in the future and a removal lost (QA
        round 48). A walk over all of them, rare: a step back."""
        self._latest = {peer: at for peer, at in self._latest.items() if at <= limit}
        self._expiry = [(at, peer) for peer, at in self._latest.items()]
        heapq.heapify(self._expiry)
        self._highest = max(self._latest.values(), default=-math.inf)

    def __len__(self) -> int:
        return len(self._latest)

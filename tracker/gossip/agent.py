"""The gossip agent: push-pull delta exchanges with neighbours, and the loop that runs them.

One exchange: the initiator stamps its local changes, then sends a ``sync`` with its version vector
and the rows it believes the neighbour lacks (against the vector that neighbour last reported; nothing
on first contact). The neighbour checks and applies it in one transaction (nonce included), and answers
with a ``reply`` holding what the initiator lacks according to the vector it just sent, plus its own
vector. The initiator applies the reply and remembers the vector. Both directions are signed.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from .. import db
from ..core import AvailabilityTracker
from ..errors import InvalidInput, StorageError, TrackerError, describe
from ..queries import gossip as q
from ..ratelimit import TokenBuckets
from . import limits
from .config import GossipConfig, check_url
from .protocol import (
    MAX_VERSION,
    VERSION,
    GossipRejected,
    Keyring,
    Message,
    decode,
    hold_future,
    new_nonce,
    signed,
)
from .sizing import check_fits

log = logging.getLogger("tracker.gossip")

#: (url, body, headers) -> (status, body, headers): httpx by default; tests may call agents directly.
Transport = Callable[[str, bytes, dict[str, str]], Awaitable[tuple[int, bytes, dict[str, str]]]]

GOSSIP_PATH = "/v1/gossip"
_MAX_FOLLOW_UPS = 8  # syncs in one exchange at most (the first included) while either side has more
_MAX_OVERSIZED_TRIES = 4  # sends of one sync refused as oversized, each within a smaller limit
_MAX_STAMP_SLICES = 400  # stamp transactions per exchange (2m rows at the default slice)
_KEEP_ALIVE_S = 2.0  # how long the gossip client keeps an idle connection
#: A request to a neighbour may take timeout_s plus a second per KiB sent and received, at most this
#: many timeout_s (``GossipAgent._send``).
_SLOW_LINK_BYTES_PER_S = 1024
_SLOW_LINK_TIMEOUTS = 10
#: Failed exchanges in a row after which a learned neighbour is forgotten (about 20 minutes of
#: back-off at the defaults); configured ones are kept, the operator's list.
FORGET_LEARNED_AFTER_FAILURES = 8


@dataclass
class GossipStats:
    """Counters for ``/metrics`` and tests."""

    rounds: int = 0
    exchanges: int = 0
    failures: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    rows_sent: int = 0
    rows_applied: int = 0
    #: Merges that left rows out for want of their samples and asked for a resend (lowered a clock).
    resends_asked: int = 0
    #: Rows held back because they state a time beyond this node's clock + max_skew_s.
    rows_held_future: int = 0
    rejected: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class NeighborState:
    """One neighbour as this process sees it, for ``/metrics``: a neighbour that is down shows here."""

    url: str
    #: Failed exchanges since the last one that worked (0: the last one worked).
    consecutive_failures: int
    #: When an exchange with it last completed (unix seconds; ``None``: never, in this process).
    last_success_at: float | None


@dataclass
class _Neighbor:
    url: str
    vector: dict[str, int] | None = None
    samples: dict[str, int] = field(default_factory=dict)
    failures: int = 0
    retry_at: float = 0.0
    last_success_at: float | None = None
    #: The limit it stated (``limits``), or learned from a refusal; ``None``: this tracker's own.
    max_bytes: int | None = None
    #: Known from another tracker's message (``learn_neighbors``), not from this tracker's settings.
    learned: bool = False
    #: Its node key, from its latest reply.
    node: str | None = None

    @property
    def works(self) -> bool:
        """Whether its latest exchange (in this process) worked."""
        return self.failures == 0 and self.last_success_at is not None


class GossipAgent:
    """Gossip for one tracker; ``handle`` serves requests, ``round``/``run`` initiate them."""

    def __init__(
        self,
        tracker: AvailabilityTracker,
        config: GossipConfig,
        *,
        transport: Transport | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if not config.enabled:
            raise GossipRejected("disabled", "gossip needs a shared key (GossipConfig.keys)", 503)
        check_fits(config, tracker.config.bandwidth_window)
        self.tracker = tracker
        self.config = config
        self.keyring = Keyring(config.keys)
        self.stats = GossipStats()
        self._rng = rng or random.Random()
        self._neighbors = {url: _Neighbor(url) for url in map(check_url, config.neighbors)}
        self._transport = transport
        self._own_urls: set[str] = set()  # learned URLs that turned out to be this tracker
        self._senders = TokenBuckets(
            config.max_messages_per_s, config.message_burst, clock=tracker.now, max_keys=4096
        )
        self._client: httpx.AsyncClient | None = None
        self._client_lock = asyncio.Lock()
        #: Exchanges under way, by neighbour URL: ``run`` starts a round without waiting for them.
        self._in_flight: dict[str, asyncio.Task[bool]] = {}

    # -- helpers ------------------------------------------------------------------------------

    @property
    def node_key(self) -> str:
        return self.tracker.node_key

    def add_neighbor(self, url: str) -> None:
        """Gossip with ``url`` from the next round on (a static neighbour added at run time)."""
        url = check_url(url)
        self._neighbors.setdefault(url, _Neighbor(url))

    @property
    def neighbors(self) -> list[str]:
        return sorted(self._neighbors)

    def neighbor_states(self) -> list[NeighborState]:
        """Every neighbour's failures in a row and last success, in URL order."""
        return [
            NeighborState(n.url, n.failures, n.last_success_at)
            for n in sorted(self._neighbors.values(), key=lambda n: n.url)
        ]

    def _now(self) -> float:
        return self.tracker.now()

    def _reject(self, error: GossipRejected, sender: str = "?", address: str | None = None) -> None:
        self.stats.rejected[error.reason] = self.stats.rejected.get(error.reason, 0) + 1
        log.warning(
            "gossip message rejected: %s",
            error,
            extra={"action": "gossip_reject", "reason": error.reason, "sender": sender, "address": address},
        )

    def _message(
        self,
        kind: str,
        vectors: tuple[dict[str, int], dict[str, int]],
        delta: q.Delta,
        in_reply_to: str | None,
        version: int = VERSION,
    ) -> Message:
        # Only the neighbours whose latest exchange worked: every known URL went out, dead or stalling
        # ones too, so that one bad URL reached every tracker that learns, and came back from them
        # after it was removed or forgotten anywhere (QA round 42).
        working = [n.url for n in sorted(self._neighbors.values(), key=lambda n: n.url) if n.works]
        learn = self.config.learn_neighbors
        return Message(
            version=version,  # type: ignore[arg-type]
            kind=kind,  # type: ignore[arg-type]
            node=self.node_key,
            sent_at=self._now(),
            nonce=new_nonce(),
            in_reply_to=in_reply_to,
            url=self.config.advertise_url,
            neighbors=working[:64] if learn else [],
            vector=vectors[0],
            samples_vector=vectors[1],
            deltas=delta.deltas,
            more=delta.truncated,
        )

    async def _encode(
        self, build: Callable[[int, frozenset[str]], Awaitable[Message]], max_bytes: int
    ) -> tuple[Message, bytes, dict[str, str]]:
        """Sign a message, halving its rows until it fits ``max_bytes`` (this tracker's, or a
        neighbour's smaller one: ``limits``), which is rare: rows are small.

        A message of one row still holds one whole version (``read_deltas``). If even that does not
        fit, its origin is left out of this message, with an error saying which setting to change,
        so that the other origins still travel: sent, the message was refused whole by a receiver
        with as small a limit, and every origin stalled behind that one (QA round 9).
        """
        rows, skip = self.config.max_rows, frozenset[str]()
        while True:
            message = await build(rows, skip)
            body, headers = await asyncio.to_thread(signed, message, self.keyring)  # see _decode
            headers |= limits.headers(self.config.max_bytes)
            if len(body) <= max_bytes:
                return message, body, headers
            if rows > 1:
                rows = max(1, rows // 2)
                continue
            oversized = [d.origin for d in message.deltas if d.peers or d.mappings]
            log.error(
                "a gossip message of one version of %s is %d bytes, above max_bytes (%d, the smaller "
                "of this tracker's and the neighbour's): it is left out; raise max_bytes on every "
                "tracker, or lower stamp_chunk on the trackers it comes from",
                ", ".join(oversized),
                len(body),
                max_bytes,
                extra={"action": "gossip_message_oversized", "bytes": len(body), "origins": oversized},
            )
            if not oversized or skip.issuperset(oversized):  # nothing left to leave out
                return message, body, headers
            rows, skip = self.config.max_rows, skip | set(oversized)

    async def _decode(self, body: bytes, authorization: str | None, now: float) -> Message:
        """``protocol.decode`` in a thread: validating a full message (5,000 peer rows) is 70-160 ms
        of CPU, which held up every selection the event loop served meanwhile (measured)."""
        cfg = self.config
        return await asyncio.to_thread(
            decode,
            body,
            authorization,
            self.keyring,
            max_bytes=cfg.max_bytes,
            now=now,
            max_skew_s=cfg.max_skew_s,
        )

    async def _read_deltas(
        self,
        vector: dict[str, int],
        samples: dict[str, int],
        skip: tuple[str, ...],
        rows: int,
        every_sample: bool = False,
    ) -> q.Delta:
        window = self.tracker.config.bandwidth_window

        async def work(conn: Any) -> q.Delta:
            return await q.read_deltas(
                conn, vector, skip, rows, window, samples=samples, every_sample=every_sample
            )

        return await db.run_read(self.tracker.engine, work)

    def _heard_from(self, message: Message) -> None:
        """A neighbour in back-off that has just synced with this tracker from the URL it advertises is
        up: try it again from the next round, not after the rest of a back-off that may have grown to
        ``backoff_max_s``. (QA round 13: with a hub that lists no neighbours, edges caught up
        26-28 s after a 40 s outage at a 2 s interval; at the defaults that could be minutes.) By
        URL, not node key: processes sharing a database share the key, and one that is up reset the
        back-off of one that was down (QA round 14)."""
        if message.url is None:
            return
        neighbor = self._neighbors.get(message.url)
        if neighbor is not None and neighbor.failures:
            neighbor.failures, neighbor.retry_at = 0, 0.0

    def _learn(self, message: Message) -> None:
        if not self.config.learn_neighbors:
            return
        for url in ([message.url] if message.url else []) + message.neighbors:
            try:
                url = check_url(url)
            except ValueError:
                continue
            if url in self._own_urls or url == self.config.advertise_url:
                continue
            if url not in self._neighbors and len(self._neighbors) < 1024:
                self._neighbors[url] = _Neighbor(url, learned=True)

    # -- serving ------------------------------------------------------------------------------

    async def handle(
        self,
        body: bytes,
        authorization: str | None,
        *,
        address: str | None = None,
        max_bytes: str | None = None,
    ) -> tuple[int, bytes, dict[str, str]]:
        """Answer one ``sync``: (status, body, headers). Errors are JSON ``{"error", "reason"}``.

        ``address`` (the connection's, from the service) only goes into the logs: a message that
        fails its signature names no sender that could be trusted. ``max_bytes`` is the sender's
        ``limits.HEADER``: the reply fits it. Every answer, a refusal too, states this tracker's.
        """
        now = self._now()
        cfg = self.config
        try:
            message = await self._decode(body, authorization, now)
            # Signed: from here on the refusals name the sender in the log (several trackers on one
            # host were told apart by an ephemeral port only, QA round 42).
            sender = message.node
            if message.kind != "sync":
                raise GossipRejected(
                    "malformed", "only a sync message may be sent to a tracker", sender=sender
                )
            if message.node == self.node_key:  # a learned URL that is our own, or a forgery
                raise GossipRejected("self", "the message comes from this very node", sender=sender)
            if (wait := self._senders.take(message.node)) > 0:
                raise GossipRejected(
                    "rate_limited",
                    f"too many messages from {message.node}; retry in {wait:.1f} s",
                    429,
                    sender=sender,
                )
        except GossipRejected as error:
            self._reject(error, error.sender or "?", address)
            return self._error(error)
        message = self._hold_future(message, now)
        self.stats.bytes_received += len(body)
        window = self.tracker.config.bandwidth_window

        async def work(conn: Any) -> tuple[q.MergeCounts, tuple[dict[str, int], dict[str, int]], bool]:
            dialect = self.tracker.config.dialect
            if not await q.claim_nonce(
                conn, dialect, message.nonce, message.node, now + 2 * cfg.max_skew_s, now
            ):
                raise GossipRejected("replay", "this message (its nonce) was already received", 409)
            counts = await q.merge(conn, dialect, self.node_key, message.deltas, window, now)
            await self._catch_up(conn, message)
            # One slice, in the merge's transaction; a reply that leaves a backlog says it has more,
            # so the sender's follow-ups take the next slices (a tracker without neighbours of its own
            # otherwise sent one slice per exchange: QA round 25).
            stamped = await q.stamp(
                conn, dialect, self.tracker.node_id, cfg.stamp_chunk, self._stamp_slice, at=now
            )
            return counts, await q.vectors(conn), not stamped.complete

        try:
            counts, vectors, backlog = await db.run_write(
                self.tracker.engine, work, self.tracker.config.write_retries
            )
        except GossipRejected as error:
            self._reject(error, message.node, address)
            return self._error(error)
        self._count(counts)
        self._heard_from(message)
        self._learn(message)

        async def build(rows: int, skip: frozenset[str]) -> Message:
            # A version 1 neighbour is answered in its own version: every row with its samples.
            v1 = message.version == 1
            delta = await self._read_deltas(
                message.vector, message.samples_vector, (message.node, *skip), rows, every_sample=v1
            )
            if backlog:
                delta = q.Delta(delta.deltas, truncated=True)
            return self._message("reply", vectors, delta, message.nonce, message.version)

        reply_limit = limits.stated(max_bytes, cfg.max_bytes) or cfg.max_bytes
        _, out, headers = await self._encode(build, reply_limit)
        self.stats.bytes_sent += len(out)
        return 200, out, headers

    def _error(self, error: GossipRejected) -> tuple[int, bytes, dict[str, str]]:
        body = json.dumps({"error": str(error), "reason": error.reason}).encode()
        return (
            error.status,
            body,
            {"Content-Type": "application/json"} | limits.headers(self.config.max_bytes),
        )

    # -- initiating ---------------------------------------------------------------------------

    async def exchange(self, url: str, *, synced: Callable[[], None] | None = None) -> int:
        """One push-pull with ``url`` (plus follow-ups while either side has more); rows applied here.
        ``synced`` is called after each sync whose reply was applied (``_bounded_exchange``)."""
        url = check_url(url)
        neighbor = self._neighbors.setdefault(url, _Neighbor(url))
        applied = 0
        for _ in range(_MAX_FOLLOW_UPS):
            first_contact = neighbor.vector is None
            sent_more, reply, own_clock = await self._sync_once(neighbor)
            applied += await self._apply_reply(reply, own_clock)
            if synced is not None:
                synced()
            # Continue while either side left rows out; after a first contact (a digest only), push
            # at once what the neighbour turned out to lack.
            if not (reply.more or sent_more or first_contact):
                break
        self.stats.exchanges += 1
        neighbor.failures, neighbor.retry_at = 0, 0.0
        neighbor.last_success_at = self._now()
        neighbor.node = reply.node
        return applied

    def _redundant(self, neighbor: _Neighbor) -> bool:
        """A learned neighbour that reaches a tracker another neighbour reaches too (same node key)
        while that one works: one tracker under two spellings (127.0.0.1 and localhost, a name and
        its address) was exchanged with twice a round, each sync sending it the same rows (QA round
        42). Skipped, not forgotten: processes of one Postgres share a node key, and when the
        configured one is down the other still reaches the database (QA round 48). The URL from
        this tracker's settings goes first, then the first by URL."""
        if not neighbor.learned or neighbor.node is None:
            return False
        return any(
            other is not neighbor
            and other.node == neighbor.node
            and other.works
            and (not other.learned or other.url < neighbor.url)
            for other in self._neighbors.values()
        )

    async def _sync_once(self, neighbor: _Neighbor) -> tuple[bool, Message, int]:
        """One sync and its reply: whether this side left rows out, the reply, and this node's own
        clock as the sync told it."""
        cfg = self.config
        known = neighbor.vector

        vectors = await self._stamp_backlog()

        async def build(rows: int, skip: frozenset[str]) -> Message:
            # First contact sends only the digest: the reply's vector tells what the neighbour holds.
            if known is None:
                delta = q.Delta([], False)
            else:
                delta = await self._read_deltas(known, neighbor.samples, tuple(skip), rows)
            return self._message("sync", vectors, delta, None)

        own = cfg.max_bytes
        for _ in range(_MAX_OVERSIZED_TRIES):
            sync, body, headers = await self._encode(build, min(own, neighbor.max_bytes or own))
            status, answer, answer_headers = await self._send(neighbor.url + GOSSIP_PATH, body, headers)
            self.stats.bytes_sent += len(body)  # every try's bytes crossed the wire
            stated = limits.stated(answer_headers.get(limits.HEADER.lower()), own)
            if status != 413 or _reason(answer) != "oversized":
                if stated is not None:  # it may have raised its limit, too
                    neighbor.max_bytes = stated
                break
            # Its limit is below this one's (a tracker of an earlier release states none): try again
            # at once within it, rather than back off and send as much again.
            neighbor.max_bytes = limits.after_refusal(stated, len(body), own)
        self.stats.rows_sent += sync.rows  # the last try's: the rows of refused ones were sent again
        if status != 200:
            if _reason(answer) == "self":  # that URL is this tracker itself (learned): forget it
                self._neighbors.pop(neighbor.url, None)
                self._own_urls.add(neighbor.url)
            raise GossipFailed(f"{neighbor.url} answered {status}: {answer[:300].decode(errors='replace')}")
        self.stats.bytes_received += len(answer)
        try:
            reply = await self._decode(answer, answer_headers.get("authorization"), self._now())
        except GossipRejected as error:
            self._reject(error, neighbor.url)
            if error.reason == "unsigned":
                # Not a tracker's answer at all, most likely (a web server, a proxy's page): "not
                # signed" alone sent operators looking at keys (QA round 42).
                kind = answer_headers.get("content-type", "no content type")[:80]
                raise GossipFailed(
                    f"{neighbor.url} answered 200 without a signed gossip reply ({kind}, "
                    f"{len(answer)} bytes: {answer[:80]!r}): is it a tracker's base URL? ({error})"
                ) from None
            raise GossipFailed(f"{neighbor.url} sent an unacceptable reply: {error}") from None
        if reply.kind != "reply" or reply.in_reply_to != sync.nonce:
            self._reject(GossipRejected("replay", "a reply that does not answer this request"), neighbor.url)
            raise GossipFailed(f"{neighbor.url} sent a reply to another request")
        reply = self._hold_future(reply, self._now())
        neighbor.vector = dict(reply.vector)
        neighbor.samples = dict(reply.samples_vector)
        self._learn(reply)
        return sync.more, reply, vectors[0].get(self.node_key, 0)

    @property
    def _stamp_slice(self) -> int:
        return max(q.SLICE_ROWS, self.config.stamp_chunk)

    async def _stamp_backlog(self) -> tuple[dict[str, int], dict[str, int]]:
        """Stamp this node's changed rows a slice per transaction, then read the vectors.

        In one transaction a backlog (an ingest of 100,000 peers: 600,000 rows) held every write
        behind it for seconds: SQLite's write lock, and on Postgres the stamped rows' locks (a
        heartbeat waited 7.3 s). At most ``_MAX_STAMP_SLICES`` slices per exchange, so writers that
        dirty rows as fast as they are stamped cannot hold the exchange back; the rest goes next time.
        """
        dialect, node_id, chunk = self.tracker.config.dialect, self.tracker.node_id, self.config.stamp_chunk
        slices = 0

        async def work(conn: Any) -> tuple[dict[str, int], dict[str, int]] | None:
            done = await q.stamp(conn, dialect, node_id, chunk, self._stamp_slice, at=self._now())
            return await q.vectors(conn) if done.complete or slices >= _MAX_STAMP_SLICES else None

        while True:
            slices += 1
            vectors = await db.run_write(self.tracker.engine, work, self.tracker.config.write_retries)
            if vectors is not None:
                return vectors

    async def _apply_reply(self, reply: Message, own_clock: int) -> int:
        if not reply.deltas and reply.vector.get(self.node_key, 0) <= own_clock:
            return 0
        window = self.tracker.config.bandwidth_window
        now = self.tracker.now()

        async def work(conn: Any) -> q.MergeCounts:
            counts = await q.merge(
                conn, self.tracker.config.dialect, self.node_key, reply.deltas, window, now
            )
            await self._catch_up(conn, reply)
            return counts

        counts = await db.run_write(self.tracker.engine, work, self.tracker.config.write_retries)
        self._count(counts)
        return counts.peers + counts.mappings

    async def _catch_up(self, conn: Any, message: Message) -> None:
        """A sender that holds this node's own versions beyond its clock: see ``catch_up_own_clock``."""
        held = message.vector.get(self.node_key, 0)
        if held > MAX_VERSION // 2:
            # Raised there, the clock would soon stamp past what messages may carry, and every one
            # this node built would fail (fuzzing). No database restored from a copy is that far
            # behind; the claim is a neighbour's fault, and only it ignores this node's rows.
            log.warning(
                "a neighbour claims this node's own versions up to %d, beyond any it could have "
                "stamped: ignored",
                held,
                extra={"action": "gossip_own_clock_refused", "sender": message.node},
            )
            return
        if held and await q.catch_up_own_clock(conn, self.node_key, held):
            log.warning(
                "a neighbour holds this node's own versions up to %d, beyond its clock: was its database "
                "restored from a copy? Clock raised; all its rows go out again (docs/gossip.md)",
                held,
                extra={"action": "gossip_own_clock_raised", "sender": message.node},
            )

    def _hold_future(self, message: Message, now: float) -> Message:
        """Leave out rows dated ahead of this clock by more than the skew (``protocol.hold_future``)."""
        message, held = hold_future(message, now + self.config.max_skew_s)
        if held:
            self.stats.rows_held_future += held
            log.warning(
                "held back %d gossip rows dated more than %g s ahead of this clock: the origin's clock "
                "(or this one) is wrong; they apply once they are no longer ahead",
                held,
                self.config.max_skew_s,
                extra={"action": "gossip_rows_held_future", "sender": message.node},
            )
        return message

    def _count(self, counts: q.MergeCounts) -> None:
        self.stats.rows_applied += counts.peers + counts.mappings
        self.stats.resends_asked += counts.waiting

    async def _send(
        self, url: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, bytes, dict[str, str]]:
        if self._transport is not None:
            return await self._transport(url, body, headers)
        client = await self._http()
        timeout_s = self.config.timeout_s
        loop = asyncio.get_running_loop()
        started = loop.time()
        cap = started + _SLOW_LINK_TIMEOUTS * timeout_s
        answered_at: float | None = None

        def deadline(received: int) -> float:
            # Until the answer's headers come, the request's own bytes earn time (they are being
            # sent); after, only the answer's bytes that arrived: counted from the start, a neighbour
            # that trickled its answer to a large request was given all of it (QA round 44).
            if answered_at is None:
                return min(started + timeout_s + len(body) / _SLOW_LINK_BYTES_PER_S, cap)
            return min(answered_at + timeout_s + received / _SLOW_LINK_BYTES_PER_S, cap)

        def progress(received: int) -> None:
            nonlocal answered_at
            if answered_at is None:
                answered_at = loop.time()
            scope.reschedule(deadline(received))

        try:
            # A deadline for the whole request: httpx's timeout bounds each read, and a neighbour that
            # sent a byte every few seconds held the exchange, and the round with every other
            # neighbour's, for good, counted nowhere (QA round 42). It grows with the bytes that
            # cross (1 s per KiB, at most 10 x timeout_s in all): a flat timeout_s cut every exchange
            # of a 5 KB/s link for good, whose 150 KB messages took 30 s (QA round 43).
            async with asyncio.timeout_at(deadline(0)) as scope:
                return await self._post(client, url, body, headers, progress)
        except TimeoutError:
            raise GossipFailed(
                f"{url}: no complete answer within timeout_s ({timeout_s:g} s) plus 1 s per KiB sent and "
                f"received (at most {_SLOW_LINK_TIMEOUTS} x timeout_s)"
            ) from None
        except httpx.HTTPError as error:
            raise GossipFailed(f"{url}: {type(error).__name__}: {error}") from None

    async def _post(
        self,
        client: httpx.AsyncClient,
        url: str,
        body: bytes,
        headers: dict[str, str],
        progress: Callable[[int], None],
    ) -> tuple[int, bytes, dict[str, str]]:
        """Send, and read the answer as it came (no ``Content-Encoding`` undone) up to ``max_bytes``:
        read whole first, a 400 MB reply took the process to 1 GB before the size check refused it,
        and 815 KB sent as ``Content-Encoding: gzip``, which httpx inflates by itself, to 1.8 GB
        (QA round 42). The sync stated this tracker's ``max_bytes`` (``limits``): a reply above it
        breaks the protocol."""
        limit = self.config.max_bytes
        async with client.stream("POST", url, content=body, headers=headers) as response:
            answer_headers = {k.lower(): v for k, v in response.headers.items()}
            encoding = answer_headers.get("content-encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise GossipFailed(
                    f"{url} answered with Content-Encoding {encoding}: gossip answers are sent as they "
                    "are (the body is compressed already)"
                )
            declared = answer_headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise GossipFailed(f"{url} answered {declared} bytes, above max_bytes ({limit}): not read")
            progress(0)  # the answer has begun
            chunks, size = [], 0
            async for chunk in response.aiter_raw():
                size += len(chunk)
                if size > limit:
                    raise GossipFailed(f"{url} answered more than max_bytes ({limit}): not read further")
                chunks.append(chunk)
                progress(size)
            return response.status_code, b"".join(chunks), answer_headers

    async def _http(self) -> httpx.AsyncClient:
        """The agent's one HTTP client, built on first use in a thread.

        Building it loads the CA bundle into an SSL context: 20-40 ms of CPU measured here, which
        on the event loop held up every selection the tracker served meanwhile. The lock keeps the
        first round's concurrent exchanges from building one each.
        """
        async with self._client_lock:
            if self._client is None:
                self._client = await asyncio.to_thread(new_client, self.config.timeout_s)
            return self._client

    async def round(self) -> int:
        """Gossip with up to ``fanout`` random neighbours not in back-off, and wait for those
        exchanges; returns how many worked. ``run`` does not wait (``_start_round``)."""
        results = await asyncio.gather(*self._start_round())
        return sum(results)

    def _start_round(self) -> list[asyncio.Task[bool]]:
        """Start exchanges with up to ``fanout`` random neighbours neither in back-off nor still in an
        exchange of an earlier round.

        The loop waited for every chosen neighbour before the next round: one answering slowly (each
        sync bounded at 10 x ``timeout_s``, 100 s by default) held the others' gossip that long, round
        after round, where the interval is 30 s. Now its exchange goes on beside the next rounds, which
        choose among the other neighbours.
        """
        now = self._now()
        ready = [
            n
            for n in self._neighbors.values()
            if n.retry_at <= now and n.url not in self._in_flight and not self._redundant(n)
        ]
        chosen = self._rng.sample(ready, min(self.config.fanout, len(ready)))
        tasks = []
        for neighbor in chosen:
            task = asyncio.create_task(
                self._guarded(neighbor), name=f"tracker-gossip-exchange {neighbor.url}"
            )
            self._in_flight[neighbor.url] = task
            task.add_done_callback(functools.partial(self._done, neighbor.url))
            tasks.append(task)
        self.stats.rounds += 1
        return tasks

    def _done(self, url: str, task: asyncio.Task[bool]) -> None:
        if self._in_flight.get(url) is task:
            del self._in_flight[url]
        if not task.cancelled() and (error := task.exception()) is not None:
            # _guarded catches every Exception; anything else is logged rather than lost.
            log.error(
                "gossip exchange with %s ended: %s",
                url,
                describe(error),
                extra={"action": "gossip_round_failure", "neighbor": url},
            )

    async def _stop_exchanges(self) -> None:
        """Cancel the exchanges under way and wait for them (a transaction under way runs to its
        end: ``db.to_completion``)."""
        tasks = list(self._in_flight.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    async def _bounded_exchange(self, url: str) -> int:
        """An exchange that lasts at most ``10 x timeout_s`` per sync it completes (``round()``
        waits for it; the loop does not): its sends are bounded one by one, and a neighbour
        answering every try of one sync with a slow refusal held it for 32 x timeout_s (QA round
        44). Per sync, not in all: a slow link catching up, each of its syncs moving rows, was cut
        every round, counted as failing, and forgotten if learned (QA round 45)."""
        limit_s = _SLOW_LINK_TIMEOUTS * self.config.timeout_s
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(limit_s) as scope:
                return await self.exchange(url, synced=lambda: scope.reschedule(loop.time() + limit_s))
        except TimeoutError:
            raise GossipFailed(
                f"{url}: a sync of the exchange took longer than {limit_s:g} s (10 x timeout_s)"
            ) from None

    async def _guarded(self, neighbor: _Neighbor) -> bool:
        try:
            await self._bounded_exchange(neighbor.url)
        except Exception as error:  # a neighbour's fault must not end the loop
            self.stats.failures += 1
            if isinstance(error, StorageError) and not isinstance(error, InvalidInput):
                # This tracker's own database failed, not the neighbour: counted against every
                # healthy neighbour, an outage of a few minutes backed them all off for up to
                # backoff_max_s after the database was back, and the metric of which neighbour is
                # down named them (QA round 42). The next round tries them again.
                log.error(
                    "gossip with %s failed on this tracker's database: %s",
                    neighbor.url,
                    describe(error),
                    extra={"action": "gossip_local_failure", "neighbor": neighbor.url},
                )
                log.debug(
                    "gossip with %s failed",
                    neighbor.url,
                    exc_info=error,
                    extra={"action": "gossip_local_failure"},
                )
                return False
            neighbor.failures += 1
            if neighbor.learned and neighbor.failures >= FORGET_LEARNED_AFTER_FAILURES:
                # Kept, a learned URL that never answered again was tried for as long as the process
                # ran; another tracker that reaches it advertises it again (QA round 42).
                self._neighbors.pop(neighbor.url, None)
                log.warning(
                    "gossip with %s failed %d times in a row: a learned neighbour, forgotten (%s)",
                    neighbor.url,
                    neighbor.failures,
                    describe(error),
                    extra={"action": "gossip_neighbor_forgotten", "neighbor": neighbor.url},
                )
                return False
            interval = self.interval
            neighbor.retry_at = self._now() + min(
                self.config.backoff_max_s, interval * 2 ** (neighbor.failures - 1)
            )
            # Described, not str(error): a storage error's cause carries the merge's statement and its
            # parameters, kilobytes of peer ids a line (the traceback only at DEBUG).
            log.warning(
                "gossip with %s failed: %s",
                neighbor.url,
                describe(error),
                extra={"action": "gossip_failure", "neighbor": neighbor.url, "failures": neighbor.failures},
            )
            log.debug(
                "gossip with %s failed", neighbor.url, exc_info=error, extra={"action": "gossip_failure"}
            )
            return False
        return True

    @property
    def interval(self) -> float:
        return self.config.interval_s or self.tracker.config.update_interval

    async def run(self) -> None:
        """Gossip forever, every ``interval`` +- ``jitter``; cancel to stop."""
        try:
            await self._run()
        finally:
            await self._stop_exchanges()

    async def _run(self) -> None:
        warned, started = False, self._now()
        while True:
            spread = self.interval * self.config.jitter
            await asyncio.sleep(self.interval + self._rng.uniform(-spread, spread))
            if not warned and self._unswept_since(started):
                warned = True
                log.warning(
                    "gossiping without a sweeper: this process runs none (run_sweeper is off) and has "
                    "not swept for %g s; unless another process sweeps this database, its departed "
                    "peers' mappings and old rows stay and go to every new neighbour, where some stay "
                    "for good (docs/gossip.md)",
                    self._now() - started,
                    extra={"action": "gossip_without_sweeper"},
                )
            self._start_round()  # not waited for: see there

    def _unswept_since(self, started: float) -> bool:
        """Whether no sweeper runs here and no pass ran (``tracker.sweep()`` from the application's own
        schedule counts) for three intervals, this loop having run that long."""
        if self.tracker.sweeper_running:
            return False
        quiet = 3 * self.interval
        last = self.tracker.sweeper_state.last_pass_at
        now = self._now()
        return now - started >= quiet and (last is None or now - last >= quiet)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def new_client(timeout_s: float) -> httpx.AsyncClient:
    """The gossip client: connections kept for less than any tracker keeps its side.

    ``keep_alive_s`` is 75 s, uvicorn's default 5 s: a connection reused just as the server closed it
    lost the exchange (QA round 24). Called in a thread (``GossipAgent._http``).
    """
    limits = httpx.Limits(  # httpx's own caps, which a Limits of one setting drops
        max_connections=100, max_keepalive_connections=20, keepalive_expiry=_KEEP_ALIVE_S
    )
    return httpx.AsyncClient(timeout=timeout_s, limits=limits)


class GossipFailed(TrackerError):
    """An exchange did not complete (network, refusal, bad reply); the neighbour is retried later."""


def _reason(body: bytes) -> str | None:
    """The reason of a refusal, from the API's error shape or the bare one ``handle`` returns."""
    try:
        detail = json.loads(body)
    except ValueError:
        return None
    if not isinstance(detail, dict):
        return None
    if isinstance(detail.get("error"), dict):
        code = str(detail["error"].get("code", ""))
        return code.removeprefix("gossip_")
    reason = detail.get("reason")
    return reason if isinstance(reason, str) else None

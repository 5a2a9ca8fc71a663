"""Group commit: concurrent writers share transactions, and each awaits the commit holding its events.

One transaction per call caps ingest at the database's commit rate (a few thousand per second through
the async stack, see shared/LIMITS.md). Here the first caller starts a flusher task; while a transaction
is in flight, new requests queue up and the flusher commits all of them in the next one. A lone caller
pays no extra latency (nothing waits for a timer); a crowd shares fsyncs and statements.

A request is acknowledged only when the transaction that contains it has committed, so an acknowledged
event is durable. If a shared transaction fails for a reason other than a transient conflict (those are
retried by ``db.run_write``), each of its requests is retried alone, so one request's failure is never
another's; except when the connection failed during COMMIT (``CommitOutcomeUnknown``): the group may
have been applied, so every request in it fails with that error rather than be applied twice; and
when the database was out of reach, out of pooled connections or (SQLite) busy, which would hold up
each request alone as long again. The requests retried alone run up to ``isolate_at_once`` at a time
(Postgres, where a lock on one peer's row fails only its request's retry), those of one peer one
after another in the order they came.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import exc as sa_exc

from .errors import CommitOutcomeUnknown, TrackerClosed, TransientStorageError, is_disconnect
from .queries import Timed

log = logging.getLogger(__name__)

Apply = Callable[[Sequence[Timed]], Awaitable[None]]


@dataclass
class GroupStats:
    """How much coalescing happened: requests per transaction is ``requests / transactions``."""

    requests: int = 0
    events: int = 0
    transactions: int = 0
    isolated_retries: int = 0


class GroupCommitter:
    """Coalesces concurrent requests into shared transactions (see the module docstring)."""

    def __init__(
        self,
        apply: Apply,
        max_events: int,
        *,
        max_rounds: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        row_locks: bool = False,
        isolate_at_once: int = 1,
    ) -> None:
        self._apply = apply
        #: Whether the database locks rows (Postgres): a lock timeout may then be one request's, on a
        #: row another session holds; on SQLite the whole file is busy, for every request alike.
        self._row_locks = row_locks
        #: Requests of a failed group retried at once, each in its own transaction: one after another,
        #: each behind the same lock, the last of N waited N lock timeouts (QA round 70).
        self._isolate_at_once = max(1, isolate_at_once)
        self._max_events = max_events
        #: At most this many events of one peer in a shared transaction, counted as the sum of each
        #: request's most of one peer (a bound that needs no pass over the events): 50 requests of
        #: 1,000 heartbeats of one peer would otherwise make one transaction of 50,000 rounds.
        self._max_rounds = max_rounds
        self._rounds: dict[asyncio.Future[None], int] = {}
        self._pending: list[tuple[Sequence[Timed], asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self.stats = GroupStats()
        self._clock = clock
        #: When each request not yet settled was submitted (futures are hashable, and unique).
        self._submitted: dict[asyncio.Future[None], float] = {}

    def oldest_wait_s(self) -> float:
        """How long the oldest request not yet committed (or failed) has waited; 0 with none.

        A write stuck behind a lock holds up every request queued behind it, while no request ends:
        the latencies of finished requests show nothing until it ends (QA round 19: 130 s of no
        ingest, and nothing in /metrics). This does."""
        if not self._submitted:
            return 0.0
        return max(0.0, self._clock() - min(self._submitted.values()))

    async def submit(self, events: Sequence[Timed], rounds: int = 1) -> None:
        """Return once ``events`` are committed, all together (raise if they were not); ``rounds``:
        the most events of one peer among them."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._submitted[future] = self._clock()
        self._rounds[future] = rounds
        self._pending.append((events, future))
        if self._flusher is None or self._flusher.done():
            # Owned here, not by the caller: cancelling a caller must not strand the others' requests.
            self._flusher = asyncio.create_task(self._flush(), name="peer-tracker-group-commit")
        await future

    def _forget(self, group: list[tuple[Sequence[Timed], asyncio.Future[None]]]) -> None:
        """Requests the flusher is done with. Not when their callers give up: a caller's deadline
        cancels its future while the transaction holding its events still waits (QA round 23)."""
        for _, future in group:
            self._submitted.pop(future, None)
            self._rounds.pop(future, None)

    async def drain(self) -> None:
        """Wait until everything submitted so far is committed or failed (used by ``close()``)."""
        while self._flusher is not None and not self._flusher.done():
            try:
                await asyncio.shield(self._flusher)
            except asyncio.CancelledError:
                if not self._flusher.cancelled():  # we were cancelled, not the flusher (``abandon``)
                    raise

    def abandon(self) -> None:
        """Stop committing (a forced shutdown): the transaction in flight is cancelled, and its requests
        fail with ``CommitOutcomeUnknown`` (it may have committed); queued ones with ``TrackerClosed``."""
        flusher = self._flusher
        if flusher is not None and not flusher.done():
            flusher.cancel()
            # A flusher cancelled before its first step never runs its body, whose handler settles
            # the requests: their callers waited for good (QA round 40: 20 writes, abort(), close()).
            flusher.add_done_callback(self._abandoned)

    def _abandoned(self, _flusher: asyncio.Task[None]) -> None:
        pending, self._pending = self._pending, []
        self._forget(pending)
        for _, future in pending:
            _settle(future, TrackerClosed("the tracker closed before these events were written"))

    async def _flush(self) -> None:
        group: list[tuple[Sequence[Timed], asyncio.Future[None]]] = []
        try:
            while self._pending:
                group = self._take()
                try:
                    await self._commit(group)
                finally:
                    self._forget(group)
        except BaseException as error:  # a bug or cancellation: nobody may wait forever
            pending, self._pending = self._pending, []
            self._forget(pending)
            if isinstance(error, Exception):
                failures: tuple[BaseException, BaseException] = (error, error)
            else:
                failures = (
                    CommitOutcomeUnknown(
                        "ingest stopped while this transaction ran; it may have committed", abandoned=True
                    ),
                    TrackerClosed("the tracker closed before these events were written"),
                )
            for _, future in group:  # settled already unless the error struck while committing it
                _settle(future, failures[0])
            for _, future in pending:
                _settle(future, failures[1])
            raise

    async def _commit(self, group: list[tuple[Sequence[Timed], asyncio.Future[None]]]) -> None:
        requests = [r for r in group if not r[1].cancelled()]
        if not requests:
            return
        try:
            await self._apply([t for events, _ in requests for t in events])
        except Exception as error:
            if len(requests) == 1 or not self._maybe_one_requests(error):
                for _, future in requests:
                    _settle(future, error)
            else:
                await self._isolate(requests)
        else:
            self._count(requests, transactions=1)
            for _, future in requests:
                _settle(future, None)

    def _take(self) -> list[tuple[Sequence[Timed], asyncio.Future[None]]]:
        """The oldest requests up to ``max_events`` events and ``max_rounds`` rounds (always at least
        one request)."""
        size, rounds, cut = 0, 0, 0
        most = self._max_rounds
        for events, future in self._pending:
            more = self._rounds.get(future, 1)
            if cut and (size + len(events) > self._max_events or (most is not None and rounds + more > most)):
                break
            size += len(events)
            rounds += more
            cut += 1
        group, self._pending = self._pending[:cut], self._pending[cut:]
        return group

    async def _isolate(self, requests: list[tuple[Sequence[Timed], asyncio.Future[None]]]) -> None:
        """A shared transaction failed: give each request its own, so only the culprit fails."""
        log.warning(
            "group commit failed; retrying its requests one by one",
            extra={"action": "group_commit_isolate", "requests": len(requests)},
        )
        self.stats.isolated_retries += 1
        gate = asyncio.Semaphore(self._isolate_at_once)

        async def in_turn(chain: list[tuple[Sequence[Timed], asyncio.Future[None]]]) -> None:
            for events, future in chain:
                async with gate:
                    try:
                        await self._apply(events)
                    except Exception as error:
                        _settle(future, error)
                    else:
                        self._count([(events, future)], transactions=1)
                        _settle(future, None)

        await asyncio.gather(*(in_turn(chain) for chain in _chains(requests)))

    def _maybe_one_requests(self, error: Exception) -> bool:
        """Whether a group's failure may be one request's doing, worth a transaction for each.

        Not an unknown outcome (the group may be committed already, and a re-run alone would apply
        it twice), nor a database out of reach or out of pooled connections, nor busy on SQLite:
        each request would wait as long again (QA round 70: three heartbeats behind a held lock
        answered after 61, 91 and 121 s, a transaction each)."""
        if isinstance(error, CommitOutcomeUnknown | TrackerClosed):
            return False
        cause = error.__cause__ if error.__cause__ is not None else error
        if is_disconnect(cause) or isinstance(cause, sa_exc.TimeoutError):
            return False
        return self._row_locks or not isinstance(error, TransientStorageError)

    def _count(self, requests: list[tuple[Sequence[Timed], asyncio.Future[None]]], transactions: int) -> None:
        self.stats.requests += len(requests)
        self.stats.events += sum(len(events) for events, _ in requests)
        self.stats.transactions += transactions


def _chains(
    requests: list[tuple[Sequence[Timed], asyncio.Future[None]]],
) -> list[list[tuple[Sequence[Timed], asyncio.Future[None]]]]:
    """The requests in chains that share no peer, each in the order submitted: a chain's requests
    are retried one after another, chains side by side. Side by side, one peer's online and
    offline requests applied out of order and its uptime grew (QA round 71)."""
    parent = list(range(len(requests)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[str, int] = {}
    for i, (events, _) in enumerate(requests):
        for timed in events:
            j = first.setdefault(timed.event.peer_id, i)
            parent[root(i)] = root(j)
    chains: dict[int, list[tuple[Sequence[Timed], asyncio.Future[None]]]] = {}
    for i, request in enumerate(requests):
        chains.setdefault(root(i), []).append(request)
    return list(chains.values())


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():  # the caller gave up (cancelled); its events may still have been written
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)

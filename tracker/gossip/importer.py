"""``import_snapshot``: apply a state snapshot (another tracker's, or a backup) through the gossip merge.

A snapshot carries no versions, so its rows enter at version 0: they fill in what this database lacks
and lose to anything gossip brings, and content mappings still go by last-writer-wins on time. Over
rows an earlier snapshot brought, an origin's peer row replaces its stored one when the origin wrote
it later (``updated_at``): the first snapshot of an origin stayed for good (QA round 72). This
node's own origin is skipped, like in gossip: the database is the authority on its own observations.
The whole file is applied in one transaction that commits only once its trailer has been checked, so
a truncated or corrupt file changes nothing; so does one with a row dated beyond this tracker's clock
plus ``max_skew_s`` (gossip's, 120 s by default: an origin's clock was wrong, and such rows would pin
peers online and win every last-writer-wins for as long as the error). A snapshot taken longer ago
than removals are remembered (``TrackerConfig.tombstone_keep_s``) is refused unless the caller
accepts it: a mapping removed after it was taken, and forgotten since, would come back as held (QA
round 14).

The file is streamed, in bounded memory: a whole snapshot in memory took ~50 times its compressed
size (a million-peer snapshot could not be restored). Records are decoded and checked on a worker
thread ``MERGE_ROWS`` at a time, and inside the one transaction:

1. mappings are merged as they come (each is independent of every other row);
2. peer rows and samples go to two temporary tables (``tracker_import_peers``/``_samples``), because
   a peer's samples must travel with it and the file does not put them together: this tracker's
   exporter writes every peer row, then every sample (``state_export.state_records``), and other writers
   may use any order. Any order is accepted, interleaved or not;
3. once the trailer is checked, the peer rows are read back in file order ``MERGE_ROWS`` at a time,
   each with its newest ``bandwidth_window`` samples (ranked in SQL), and merged.

The merge is a join-semilattice (``queries.gossip.merge``), so merging mappings before peers, and in
other parts than a whole-file import did, ends in the same state; the temporary tables are dropped
with the transaction, committed or not.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from .. import db
from ..compiled import BulkInsert
from ..config import TrackerConfig
from ..core import AvailabilityTracker
from ..errors import InvalidInput
from ..queries import gossip as q
from ..queries.gossip import stash
from .config import DEFAULT_MAX_SKEW_S
from .files import count_records, iter_snapshot
from .import_reader import Reader, Sorter, forget
from .protocol import OriginDelta, PeerState
from .snapshot import SnapshotError, SnapshotHeader

#: Records decoded per hop to the reading thread, and rows merged in one step: what the import holds
#: in memory is a small multiple of this, whatever the size of the file.
MERGE_ROWS = 5_000


@dataclass(frozen=True, slots=True)
class ImportReport:
    """What an import read and what it changed."""

    node: str
    peers_read: int
    mappings_read: int
    peers_applied: int
    mappings_applied: int


#: ``progress(done, total)``: rows handled so far (records read, then peer rows merged) and the
#: expected number (the file's records plus its peer rows; estimated from a count of its lines
#: until the trailer is read, exact after).
Progress = Callable[[int, int], None]


async def import_snapshot(
    tracker: AvailabilityTracker,
    path: Path,
    progress: Progress | None = None,
    *,
    accept_old: bool = False,
    max_skew_s: float | None = None,
) -> ImportReport:
    """Merge the snapshot at ``path``; ``progress(done, total)`` is called after every part (see
    ``Progress``).

    ``accept_old``: import a snapshot older than ``tombstone_keep_s`` too (restoring an old backup,
    knowing that mappings removed since it was taken may come back).

    ``max_skew_s``: how far ahead of this tracker's clock a row may be dated (default: gossip's
    ``max_skew_s`` default, 120 s, or ``max_clock_skew_s`` if larger). A snapshot's rows are gossip's
    rows, which gossip applies within its ``max_skew_s``: allowed only ``max_clock_skew_s`` (60 s),
    a row that gossip had brought from an origin 90 s ahead got the exporter's every later
    snapshot refused whole (QA round 42)."""
    path = Path(path)
    if max_skew_s is not None and (
        isinstance(max_skew_s, bool)
        or not isinstance(max_skew_s, int | float)
        or not (math.isfinite(max_skew_s) and max_skew_s >= 0)
    ):
        # inf imported rows dated days ahead, NaN refused everything as "allowed nan s" (QA 48).
        raise InvalidInput(f"max_skew_s must be a finite number of seconds >= 0, got {max_skew_s!r}")
    skew = max(tracker.config.max_clock_skew_s, DEFAULT_MAX_SKEW_S) if max_skew_s is None else max_skew_s
    header = await asyncio.to_thread(
        check_snapshot, path, tracker.config, tracker.now(), accept_old=accept_old, max_skew_s=skew
    )
    # Only a bar needs the total: one more decompression of the file (no decoding), before the lock.
    total = sum(await asyncio.to_thread(count_records, path)) if progress is not None else 0
    # The clock is read here, on the loop: readings change its state, which is not a thread's to touch.
    run = _Run(tracker, path, tracker.now(), progress, total, skew)
    try:
        counts = await db.run_write(tracker.engine, run.apply, tracker.config.write_retries)
    except asyncio.CancelledError:
        # The transaction runs on to its end without its caller (db.to_completion), and, reading
        # the file as it goes, it committed the whole import seconds after a cancelled (or Ctrl-C'd)
        # caller was told otherwise (QA round 25): it stops, and rolls back, at its next part.
        run.stopped = True
        raise
    return ImportReport(
        node=header.node,
        peers_read=counts.peers_read,
        mappings_read=counts.mappings_read,
        peers_applied=counts.peers_applied,
        mappings_applied=counts.mappings_applied,
    )


def check_snapshot(
    path: Path,
    config: TrackerConfig,
    now: float,
    *,
    accept_old: bool = False,
    max_skew_s: float | None = None,
) -> SnapshotHeader:
    """The snapshot's header, once it is known to be one a tracker of ``config`` would take at ``now``
    (a snapshot, not taken more than ``max_skew_s`` ahead of ``now``, the rows' own limit, and not
    older than removals are remembered unless ``accept_old``); the rows are checked as they are
    merged. ``SnapshotError`` otherwise. ``tracker gossip import`` checks before it opens the
    database it imports into: a refused snapshot left a new, migrated database file behind (QA
    round 56)."""
    header = _read_header(path)
    skew = max(config.max_clock_skew_s, DEFAULT_MAX_SKEW_S) if max_skew_s is None else max_skew_s
    if header.taken_at > now + skew:
        # Its age would read negative, and the age check pass whatever rows it holds (QA round 74).
        raise SnapshotError(
            f"the snapshot is dated {header.taken_at - now:.6g} s ahead of this tracker's clock (allowed "
            f"{skew:g} s, max_skew_s): its writer's clock was wrong, or the file was edited; nothing "
            "was imported"
        )
    if not accept_old:
        _refuse_forgotten_removals(config.tombstone_keep_s, now - header.taken_at)
    return header


def _read_header(path: Path) -> SnapshotHeader:
    items = iter_snapshot(path)
    try:
        header = next(items)
    finally:
        items.close()
    assert isinstance(header, SnapshotHeader)  # iter_decode yields the header first, or raises
    return header


# -- the transaction --------------------------------------------------------------------------------


@dataclass(slots=True)
class _Counts:
    peers_read: int = 0
    mappings_read: int = 0
    peers_applied: int = 0
    mappings_applied: int = 0
    done: int = 0


class _Run:
    """One attempt at the import's transaction (``run_write`` may start it again from scratch)."""

    def __init__(
        self,
        tracker: AvailabilityTracker,
        path: Path,
        now: float,
        progress: Progress | None,
        total: int,
        skew: float,
    ) -> None:
        self.tracker, self.path, self.now = tracker, path, now
        self.progress, self.total = progress, total
        config = tracker.config
        self.dialect, self.window = config.dialect, config.bandwidth_window
        self.skew = skew
        #: Set when the caller was cancelled: the transaction raises at its next part.
        self.stopped = False

    async def apply(self, conn: AsyncConnection) -> _Counts:
        counts = _Counts()
        sorter = Sorter(self.tracker.node_key, self.now, self.skew)
        reader = Reader(self.path, sorter)
        try:
            await stash.create_tables(conn)
            await self._read(conn, reader, counts)
            stashed = sorter.next_seq
            # Exact now that the trailer checked the records (the estimate counted the same lines).
            self.total = counts.done + counts.peers_read
            await stash.index_tables(conn)
            await self._merge_peers(conn, reader, stashed, counts)
            self._advance(counts, counts.peers_read - stashed)  # this node's own: skipped
            await stash.drop_tables(conn)
        finally:
            reader.close()
        return counts

    async def _read(self, conn: AsyncConnection, reader: Reader, counts: _Counts) -> None:
        """Every record: mappings merged, peer rows and samples stashed; ends after the trailer.

        The next part is decoded while this one is written: decoding was a third of an import's time,
        and the database's share of the rest leaves the interpreter to the reading thread."""
        peers_insert = BulkInsert(stash.import_peers, ("seq", *stash.PEER_COLUMNS), self.dialect)
        samples_insert = BulkInsert(
            stash.import_samples, ("origin", "peer", "at", "bytes_per_sec"), self.dialect
        )
        upcoming = asyncio.ensure_future(reader.part(MERGE_ROWS))
        try:
            while True:
                part = await upcoming
                if not part.last:
                    upcoming = asyncio.ensure_future(reader.part(MERGE_ROWS))
                await peers_insert.run(conn, part.peers)
                await samples_insert.run(conn, part.samples)
                if part.mappings:
                    counts.mappings_applied += (await self._merge(conn, part.mappings)).mappings
                counts.peers_read += part.peers_read
                counts.mappings_read += part.mappings_read
                self._advance(counts, part.read)
                if part.last:
                    return
        finally:
            forget(upcoming)

    async def _merge_peers(
        self, conn: AsyncConnection, reader: Reader, stashed: int, counts: _Counts
    ) -> None:
        """The stashed peer rows in file order, ``MERGE_ROWS`` at a time, each with its samples; a
        page's states are built on the reading thread while the previous page is merged."""
        building: asyncio.Future[list[OriginDelta]] | None = None
        try:
            for first in range(1, stashed + 1, MERGE_ROWS):
                page = await stash.page(conn, first, min(first + MERGE_ROWS - 1, stashed), self.window)
                built, building = building, asyncio.ensure_future(reader.run(_peer_deltas, *page))
                if built is not None:
                    await self._merge_page(conn, await built, counts)
            if building is not None:
                await self._merge_page(conn, await building, counts)
        finally:
            forget(building)

    async def _merge_page(self, conn: AsyncConnection, deltas: list[OriginDelta], counts: _Counts) -> None:
        counts.peers_applied += (await self._merge(conn, deltas)).peers
        self._advance(counts, sum(len(delta.peers) for delta in deltas))

    async def _merge(self, conn: AsyncConnection, deltas: list[OriginDelta]) -> q.MergeCounts:
        return await q.merge(conn, self.dialect, self.tracker.node_key, deltas, self.window, self.now)

    def _advance(self, counts: _Counts, rows: int) -> None:
        if self.stopped:
            raise _Stopped("the import's caller was cancelled: nothing was imported")
        counts.done += rows
        if self.progress is not None and rows:
            self.total = max(self.total, counts.done)  # a file written otherwise may count low
            self.progress(counts.done, self.total)


class _Stopped(Exception):
    """Ends (and rolls back) the transaction of an import whose caller was cancelled."""


def _peer_deltas(rows: list[Any], samples: list[Any]) -> list[OriginDelta]:
    """A page of stashed peer rows as gossip states with their samples, by origin (worker thread)."""
    windows: dict[int, list[tuple[float, int]]] = {}
    for seq, at, bytes_per_sec in samples:
        windows.setdefault(seq, []).append((float(at), int(bytes_per_sec)))
    by_origin: dict[str, list[PeerState]] = {}
    for r in rows:
        by_origin.setdefault(r.origin, []).append(
            PeerState(
                peer=r.peer,
                first_seen=r.first_seen,
                online=bool(r.online),
                online_since=r.online_since,
                last_seen=r.last_seen,
                uptime_s=r.uptime_s,
                served=int(r.served),
                failed=int(r.failed),
                success_weight=r.success_weight,
                failure_weight=r.failure_weight,
                evidence_at=r.evidence_at,
                updated_at=r.updated_at,
                version=0,
                samples=windows.get(r.seq, []),
            )
        )
    return [OriginDelta(origin=o, base=0, upto=0, peers=p) for o, p in by_origin.items()]


def _refuse_forgotten_removals(keep: float, age: float) -> None:
    if age > keep:
        raise SnapshotError(
            f"the snapshot was taken {age / 3600:.4g} h ago, longer ago than removals are remembered "
            f"({keep / 3600:g} h: tombstone_ttl_s, or max_event_age_s if longer), so a mapping removed "
            "since it was taken would come back as held: nothing was imported. Take a newer snapshot, "
            "or import this one anyway with --accept-old (accept_old=True), e.g. to restore a backup"
        )

"""Reading a snapshot file for an import: a worker thread decodes and checks it a part at a time.

Decoding is about a third of an import's CPU; on the event loop it held it for seconds (QA round 20).
Here one thread of the import's own turns records into ``Part``s (rows for the stash, mappings as
gossip states), while the loop writes the part before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from ..queries.gossip.stash import PEER_COLUMNS
from .files import iter_snapshot
from .protocol import MappingState, OriginDelta
from .snapshot import MappingRecord, PeerRecord, Record, SampleRecord, SnapshotError, SnapshotHeader

T = TypeVar("T")


@dataclass(slots=True)
class Part:
    """Up to ``MERGE_ROWS`` records of the file, checked and sorted for where they go."""

    peers: list[tuple[Any, ...]] = field(default_factory=list)  # rows of tracker_import_peers
    samples: list[tuple[Any, ...]] = field(default_factory=list)  # rows of tracker_import_samples
    mappings: list[OriginDelta] = field(default_factory=list)  # one per origin
    read: int = 0
    peers_read: int = 0
    mappings_read: int = 0
    last: bool = False


@dataclass(slots=True)
class Sorter:
    """Turns records into a ``Part``; runs on the reading thread only."""

    local_key: str
    now: float  # the tracker's clock, read on the loop
    skew: float  # import_snapshot's max_skew_s
    next_seq: int = 0  # the last peer row's place in the file (tracker_import_peers.seq)

    def part(self, records: Iterator[SnapshotHeader | Record], size: int) -> Part:
        part, mappings = Part(), dict[str, list[MappingState]]()
        for record in records:
            self._add(part, mappings, record)
            if part.read >= size:
                break
        else:
            part.last = True
        part.mappings = [OriginDelta(origin=o, base=0, upto=0, mappings=m) for o, m in mappings.items()]
        return part

    def _add(
        self, part: Part, mappings: dict[str, list[MappingState]], record: SnapshotHeader | Record
    ) -> None:
        if isinstance(record, SnapshotHeader):
            return
        part.read += 1
        self._refuse_future(record)
        if isinstance(record, PeerRecord):
            part.peers_read += 1
        elif isinstance(record, MappingRecord):
            part.mappings_read += 1
        if record.origin == self.local_key:
            return  # the merge would skip it: not stored for nothing
        if isinstance(record, PeerRecord):
            self.next_seq += 1
            part.peers.append((self.next_seq, *(getattr(record, name) for name in PEER_COLUMNS)))
        elif isinstance(record, SampleRecord):
            part.samples.append((record.origin, record.peer, record.at, record.bytes_per_sec))
        else:
            mappings.setdefault(record.origin, []).append(_mapping_state(record))

    def _refuse_future(self, record: Record) -> None:
        if (at := _newest_time(record)) <= self.now + self.skew:
            return
        if isinstance(record, MappingRecord):
            what = f"mapping {record.cid} -> {record.peer}"
        elif isinstance(record, SampleRecord):  # refused even without its peer's row: a row is a row
            what = f"a speed sample of peer {record.peer}"
        else:
            what = f"peer {record.peer}"
        raise SnapshotError(
            f"the snapshot's row of origin {record.origin} for {what} is dated {at - self.now:.6g} s "
            f"ahead of this tracker's clock (allowed {self.skew:g} s, max_skew_s); the clock of "
            "the tracker that recorded it (that origin) was ahead, or this one's is behind: nothing was "
            "imported. Import it once this clock has passed that time"
        )


def _newest_time(record: Record) -> float:
    """The latest time a record states (``protocol.newest_time``, a sample checked on its own)."""
    if isinstance(record, MappingRecord):
        return max(record.since, record.last_confirmed, record.changed_at)
    if isinstance(record, SampleRecord):
        return record.at
    times = [record.first_seen, record.last_seen, record.updated_at]
    return max(times + [t for t in (record.online_since, record.evidence_at) if t is not None])


def _mapping_state(m: MappingRecord) -> MappingState:
    return MappingState(
        cid=m.cid,
        peer=m.peer,
        available=m.available,
        since=m.since,
        last_confirmed=m.last_confirmed,
        changed_at=m.changed_at,
        version=0,
    )


class Reader:
    """The file's parts, decoded on one worker thread of its own.

    One thread, so that closing the decoder (which closes the file) waits for a decode still running
    there after its awaiting task was cancelled.
    """

    def __init__(self, path: Path, sorter: Sorter) -> None:
        self._records = iter_snapshot(path)
        self._sorter = sorter
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="peer-tracker-import")

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, partial(function, *args))

    async def part(self, size: int) -> Part:
        """The next ``size`` records (fewer at the end: ``last``)."""
        return await self.run(self._sorter.part, self._records, size)

    def close(self) -> None:
        self._thread.submit(self._records.close)
        self._thread.shutdown(wait=False)


def forget(future: asyncio.Future[Any] | None) -> None:
    """Give up on a part read ahead that is no longer wanted (the transaction failed); its error,
    if it has one, is the failure's consequence, not news."""
    if future is None:
        return
    if future.done():
        if not future.cancelled():
            future.exception()  # retrieved: not logged as "never retrieved"
    else:
        future.cancel()

"""``import_snapshot``: apply a state snapshot (another tracker's, or a backup) through the gossip merge.

A snapshot carries no versions, so its rows enter at version 0: they fill in what this database lacks
and lose to anything gossip brings, and content mappings still go by last-writer-wins on time. This
node's own origin is skipped, like in gossip: the database is the authority on its own observations.
The whole file is applied in one transaction, after its trailer has been checked, so a truncated or
corrupt file changes nothing; so does one with a row dated beyond this tracker's clock plus
``max_clock_skew_s`` (the exporter's clock was wrong: such rows would pin peers online and win every
last-writer-wins for as long as the error). A snapshot taken longer ago than removals are remembered
(``TrackerConfig.tombstone_keep_s``) is refused unless the caller accepts it: a mapping removed after
it was taken, and forgotten since, would come back as held (QA round 14).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import db
from ..core import AvailabilityTracker
from ..offload import off_loop
from ..queries import gossip as q
from .files import read_snapshot
from .protocol import MappingState, OriginDelta, PeerState, newest_time
from .snapshot import Snapshot, SnapshotError

#: Rows of one origin merged in one step (peers, and mappings, each).
MERGE_ROWS = 5_000


@dataclass(frozen=True, slots=True)
class ImportReport:
    """What an import read and what it changed."""

    node: str
    peers_read: int
    mappings_read: int
    peers_applied: int
    mappings_applied: int


async def import_snapshot(
    tracker: AvailabilityTracker,
    path: Path,
    progress: Callable[[int, int], None] | None = None,
    *,
    accept_old: bool = False,
) -> ImportReport:
    """Merge the snapshot at ``path``; ``progress(done, total)`` is called per part merged (an
    origin's rows, ``MERGE_ROWS`` at a time).

    ``accept_old``: import a snapshot older than ``tombstone_keep_s`` too (restoring an old backup,
    knowing that mappings removed since it was taken may come back)."""
    snap = await read_snapshot(path)
    if not accept_old:
        _refuse_forgotten_removals(tracker, snap.header.taken_at)
    # Per-row Python work (about a third of an import's CPU, QA round 20: seconds on the loop). The
    # clock is read here, on the loop: readings change its state, which is not the thread's to touch.
    config, now = tracker.config, tracker.now()
    deltas = await off_loop(
        len(snap.peers) + len(snap.mappings),
        _deltas,
        snap,
        config.bandwidth_window,
        now,
        config.max_clock_skew_s,
    )
    # Merged a part at a time, in the one transaction: an origin's rows merged whole held the event
    # loop for seconds (QA round 20). Rows are independent of each other (a peer's samples travel
    # with it), and snapshot rows all have version 0, so parts merge as the whole would.
    origins = [
        OriginDelta(
            origin=o,
            base=0,
            upto=0,
            peers=p[start : start + MERGE_ROWS],
            mappings=m[start : start + MERGE_ROWS],
        )
        for o, (p, m) in sorted(deltas.items())
        for start in range(0, max(len(p), len(m), 1), MERGE_ROWS)
    ]
    total = len(origins)

    async def work(conn: Any) -> q.MergeCounts:
        counts = q.MergeCounts()
        for done, delta in enumerate(origins, 1):
            applied = await q.merge(
                conn, tracker.config.dialect, tracker.node_key, [delta], tracker.config.bandwidth_window
            )
            counts.peers += applied.peers
            counts.mappings += applied.mappings
            if progress is not None:
                progress(done, total)
        return counts

    counts = await db.run_write(tracker.engine, work, tracker.config.write_retries)
    return ImportReport(
        node=snap.header.node,
        peers_read=len(snap.peers),
        mappings_read=len(snap.mappings),
        peers_applied=counts.peers,
        mappings_applied=counts.mappings,
    )


def _deltas(
    snap: Snapshot, window_size: int, now: float, skew: float
) -> dict[str, tuple[list[PeerState], list[MappingState]]]:
    """The snapshot's rows as gossip states, by origin (checked as they are built); a row dated more
    than ``skew`` after ``now`` refuses the whole snapshot."""
    samples: dict[tuple[str, str], list[tuple[float, int]]] = {}
    for s in snap.samples:
        samples.setdefault((s.origin, s.peer), []).append((s.at, s.bytes_per_sec))
    deltas: dict[str, tuple[list[PeerState], list[MappingState]]] = {}
    for p in snap.peers:
        window = sorted(samples.get((p.origin, p.peer), []), reverse=True)[:window_size]
        deltas.setdefault(p.origin, ([], []))[0].append(
            PeerState(
                peer=p.peer,
                first_seen=p.first_seen,
                online=p.online,
                online_since=p.online_since,
                last_seen=p.last_seen,
                uptime_s=p.uptime_s,
                served=p.served,
                failed=p.failed,
                success_weight=p.success_weight,
                failure_weight=p.failure_weight,
                evidence_at=p.evidence_at,
                updated_at=p.updated_at,
                version=0,
                samples=window,
            )
        )
    for m in snap.mappings:
        deltas.setdefault(m.origin, ([], []))[1].append(
            MappingState(
                cid=m.cid,
                peer=m.peer,
                available=m.available,
                since=m.since,
                last_confirmed=m.last_confirmed,
                changed_at=m.changed_at,
                version=0,
            )
        )
    _refuse_future(now, skew, deltas)
    return deltas


def _refuse_forgotten_removals(tracker: AvailabilityTracker, taken_at: float) -> None:
    keep = tracker.config.tombstone_keep_s
    if (age := tracker.now() - taken_at) > keep:
        raise SnapshotError(
            f"the snapshot was taken {age / 3600:.4g} h ago, longer ago than removals are remembered "
            f"({keep / 3600:g} h: tombstone_ttl_s, or max_event_age_s if longer), so a mapping removed "
            "since it was taken would come back as held: nothing was imported. Take a newer snapshot, "
            "or import this one anyway with --accept-old (accept_old=True), e.g. to restore a backup"
        )


def _refuse_future(
    now: float, skew: float, deltas: dict[str, tuple[list[PeerState], list[MappingState]]]
) -> None:
    for origin, (peers, mappings) in sorted(deltas.items()):
        rows: list[PeerState | MappingState] = [*peers, *mappings]
        for row in rows:
            if (at := newest_time(row)) > now + skew:
                what = (
                    f"peer {row.peer}" if isinstance(row, PeerState) else f"mapping {row.cid} -> {row.peer}"
                )
                raise SnapshotError(
                    f"the snapshot's row of origin {origin} for {what} is dated {at - now:.6g} s ahead of "
                    f"this tracker's clock (allowed {skew:g} s); the exporting tracker's clock was wrong, "
                    "or this one's is: nothing was imported"
                )

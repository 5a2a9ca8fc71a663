"""This node's gossip state snapshot: written by the sweeper's pass when one is due, and by
``tracker export`` on demand.

Kept apart from the pass itself: the snapshot has its own cadence (read from the directory, so a
restart or another process of the node keeps it), its own failures (a full disk must not hold back
the pass's expiry) and its own reads (the whole state, streamed).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncConnection

from .gossip import files, snapshot
from .queries import sweep as q

if TYPE_CHECKING:
    from .core import AvailabilityTracker

# The sweeper's logger: a failed snapshot is a line of the pass that was due to write it.
log = logging.getLogger("tracker.sweeper")


async def snapshot_if_due(tracker: AvailabilityTracker, now: float) -> tuple[Path | None, str | None]:
    """Write a snapshot if one is due: its path, or why it could not be written.

    A file system error is the snapshot's alone: it failed the whole pass, and the sweeper's back-off
    (up to ten intervals) then held back the expiry of stale peers for as long as the disk stayed
    full or the directory unwritable (QA round 23). It is logged and counted instead
    (``tracker_snapshot_failures``), and a pass tries again once ``snapshot_interval_s`` (or
    ``update_interval``, if longer) has passed. An error of reaching the database fails the pass,
    as anywhere else in it.
    """
    config, state = tracker.config, tracker._sweep_state
    if (directory := config.snapshot_dir) is None:
        return None, None
    wait = max(config.snapshot_interval_s, config.update_interval)
    if state.snapshot_retry_at is not None and 0 <= state.snapshot_retry_at - now <= wait:
        # Not at every pass: each attempt read the whole state before it failed (QA round 25). Nor
        # for a day when the clock was a day ahead at the failure (QA round 26): bounded by the wait.
        return None, None
    try:
        if not await _snapshot_due(tracker, Path(directory), now):
            return None, None
        path = await write_state_snapshot(tracker, Path(directory), now)
        state.snapshot_retry_at = None
        return path, None
    except files.SnapshotFileError as error:  # the database's errors (some are OSError) fail the pass
        state.snapshot_failures += 1
        state.snapshot_retry_at = now + wait
        log.error(
            "the state snapshot could not be written to %s: %s; the pass's other work stands, and "
            "a pass tries again after snapshot_interval_s (or update_interval, if longer)",
            directory,
            error,
            extra={"action": "snapshot_failed", "directory": str(directory)},
        )
        return None, f"{type(error).__name__}: {error}"


async def _snapshot_due(tracker: AvailabilityTracker, directory: Path, now: float) -> bool:
    """Whether this node's newest snapshot in ``directory`` is ``snapshot_interval_s`` old (or absent).

    Read from the directory, not remembered by the process: a restart, or another tracker of the
    same node taking over the sweep on a shared Postgres, keeps the cadence.
    """
    interval = tracker.config.snapshot_interval_s
    if not interval:
        return True
    # The newest named at or before now; one named ahead (by a clock since set back) only if there
    # is no other, and then a snapshot is due at once: waiting for now to reach its name wrote none
    # for the size of the step (QA round 7), and counting from it wrote one every pass (QA round 9).
    newest = await files.latest_snapshot(directory, tracker.node_key, now=now, ahead_s=0.0)
    return newest is None or not 0 <= now - files.taken_at(newest) < interval


async def write_state_snapshot(tracker: AvailabilityTracker, directory: Path, now: float) -> Path:
    """Write this database's whole gossip state to ``directory`` atomically; keep the newest K."""
    header = snapshot.SnapshotHeader(
        format=snapshot.FORMAT, version=snapshot.VERSION, node=tracker.node_key, taken_at=now
    )
    async with tracker.engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            # One consistent view across the three reads.
            await conn.execution_options(isolation_level="REPEATABLE READ")
        async with conn.begin():
            return await files.write_snapshot(
                directory,
                header,
                state_records(conn, tracker.config.bandwidth_window),
                keep=tracker.config.snapshot_keep,
            )


async def state_records(conn: AsyncConnection, window: int) -> AsyncIterator[snapshot.Record]:
    # Built as trusted: the rows were checked when they were written (snapshot.trusted).
    trusted = snapshot.trusted
    async for r in q.stream_peer_state(conn):
        yield trusted(
            snapshot.PeerRecord,
            origin=r[0],
            peer=r[1],
            first_seen=float(r[2]),
            online=bool(r[3]),
            online_since=None if r[4] is None else float(r[4]),
            last_seen=float(r[5]),
            uptime_s=float(r[6]),
            served=int(r[7]),
            failed=int(r[8]),
            success_weight=float(r[9]),
            failure_weight=float(r[10]),
            evidence_at=None if r[11] is None else float(r[11]),
            speed_bps=None if r[12] is None else float(r[12]),
            updated_at=float(r[13]),
        )
    async for r in q.stream_latest_samples(conn, window):
        yield trusted(snapshot.SampleRecord, origin=r[0], peer=r[1], at=float(r[2]), bytes_per_sec=int(r[3]))
    async for r in q.stream_mappings(conn):
        yield trusted(
            snapshot.MappingRecord,
            origin=r[0],
            cid=r[1],
            peer=r[2],
            available=bool(r[3]),
            since=float(r[4]),
            last_confirmed=float(r[5]),
            changed_at=float(r[6]),
        )

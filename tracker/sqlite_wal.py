"""Keeping an SQLite write-ahead log from growing for good under overlapping readers.

SQLite restarts its WAL from the beginning only when a writer finds every frame copied back into the
database and no reader still using one. Readers that overlap, each short but one always open (two
dashboards polling the analytics views, QA round 73), each start on a WAL not yet fully copied back:
some reader always holds a frame, the log is never restarted, and ``journal_size_limit`` never comes
into play. It grew 15 MB/s under an ingest until the readers stopped.

A ``TRUNCATE`` checkpoint breaks the chain: it holds new writers back while it copies every frame, so
that readers starting meanwhile read the database file alone, waits for the older readers to finish,
and empties the log. The sweeper asks for one when the log is past ``WAL_SIZE_LIMIT``; its wait is
bounded by ``CHECKPOINT_WAIT_S`` (the tracker's own writers wait that long at most, once a pass), and
a read or write held longer than that (an operator's session, another process's long import)
leaves the log as it is until a later pass.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from dataclasses import dataclass

from .config import TrackerConfig
from .db import WAL_SIZE_LIMIT
from .sqlite_lane import lane_path

log = logging.getLogger("tracker.sweeper")

#: How long the checkpoint waits for readers (SQLite's busy timeout, per phase).
CHECKPOINT_WAIT_S = 2.0


@dataclass(frozen=True, slots=True)
class WalCheckpoint:
    """What a checkpoint found and left: the log's bytes before and after; ``done`` once it was
    emptied (else a reader outlasted the wait)."""

    before: int
    after: int
    done: bool


async def truncate_grown_wal(config: TrackerConfig) -> WalCheckpoint | None:
    """Empty the WAL of ``config``'s SQLite file if it grew past ``WAL_SIZE_LIMIT``; ``None`` when
    there was nothing to do (Postgres, or a log within the limit)."""
    path = lane_path(config)
    if path is None:
        return None
    return await asyncio.to_thread(_truncate_if_grown, path)


def _wal_bytes(path: str) -> int:
    try:
        return os.path.getsize(f"{path}-wal")
    except OSError:  # no log (yet, or any more)
        return 0


def _truncate_if_grown(path: str) -> WalCheckpoint | None:
    before = _wal_bytes(path)
    if before <= WAL_SIZE_LIMIT:
        return None
    connection = sqlite3.connect(path, timeout=CHECKPOINT_WAIT_S, isolation_level=None)
    try:
        busy, _, _ = connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    except sqlite3.OperationalError as error:  # the file went away, or is locked beyond the wait
        log.warning(
            "the SQLite write-ahead log is %d MB and could not be emptied: %s",
            before >> 20,
            error,
            extra={"action": "wal_checkpoint", "wal_bytes": before},
        )
        return WalCheckpoint(before, _wal_bytes(path), done=False)
    finally:
        connection.close()
    checkpoint = WalCheckpoint(before, _wal_bytes(path), done=not busy)
    if checkpoint.done:
        log.info(
            "emptied the SQLite write-ahead log (%d MB): readers had kept it from restarting",
            before >> 20,
            extra={"action": "wal_checkpoint", "wal_bytes": before},
        )
    else:
        log.warning(
            "the SQLite write-ahead log is %d MB: a read or write held for more than %g s (an "
            "analytics session, a cursor left half-read, a long import in another process) keeps it "
            "from being emptied; the next pass tries again",
            before >> 20,
            CHECKPOINT_WAIT_S,
            extra={"action": "wal_checkpoint", "wal_bytes": before},
        )
    return checkpoint

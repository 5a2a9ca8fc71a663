"""Taking SQLite's write lock a slice at a time, so that a writer whose caller gave up stops waiting.

A writer waits for another connection's lock in SQLite's busy handler, inside the driver's thread,
and nothing interrupts that wait: ``sqlite3.Connection.interrupt()`` does not end it (measured, SQLite
3.40: the whole 30 s either way), and an asyncio cancellation only stops the caller from waiting
for the thread. A Ctrl-C'd CLI command sat out all of ``sqlite_busy_timeout_s`` before it exited
(QA round 59 #3), and a write whose caller was cancelled kept its thread until then.

Here ``BEGIN IMMEDIATE`` waits at most ``SLICE_S`` a try and tries again until the busy timeout is
spent, looking between tries whether the caller abandoned the transaction. The whole wait is the
same; giving up takes a slice at most; and a transaction abandoned before it began is not begun.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable
from typing import Any

#: The longest one try of BEGIN IMMEDIATE waits in SQLite's busy handler: how long a caller's
#: cancellation can take to reach a writer queued behind another process.
SLICE_S = 0.25

#: The current write attempt's "the caller gave up" flag, for the engine's BEGIN (``db``), which runs
#: where no argument reaches it; the lanes pass theirs along.
ABANDONED: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar(
    "peer_tracker_sqlite_abandoned", default=None
)


class Abandoned(Exception):
    """The caller was cancelled while its transaction waited for SQLite's write lock: the transaction
    never began, so nothing of it was written."""


def begin_immediate(
    execute: Callable[[str], Any],
    busy_timeout_s: float,
    abandoned: threading.Event | None,
    is_busy: Callable[[BaseException], bool],
) -> None:
    """Run ``BEGIN IMMEDIATE`` through ``execute``, waiting up to ``busy_timeout_s`` in all for the
    lock, in tries of ``SLICE_S``; raise ``Abandoned`` once ``abandoned`` is set, the last busy error
    once the time is spent. The connection's busy timeout is ``busy_timeout_s`` again afterwards (its
    other statements keep the whole wait)."""
    deadline = time.monotonic() + busy_timeout_s
    execute(f"PRAGMA busy_timeout={_ms(min(SLICE_S, busy_timeout_s))}")
    try:
        while True:
            if abandoned is not None and abandoned.is_set():
                raise Abandoned("the caller gave up while the transaction waited for SQLite's write lock")
            try:
                execute("BEGIN IMMEDIATE")
                return
            except Exception as error:
                if not is_busy(error) or time.monotonic() >= deadline:
                    raise
    finally:
        execute(f"PRAGMA busy_timeout={_ms(busy_timeout_s)}")


def _ms(seconds: float) -> int:
    return int(seconds * 1000)

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
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

#: The longest one try of BEGIN IMMEDIATE waits in SQLite's busy handler: how long a caller's
#: cancellation can take to reach a writer queued behind another process.
SLICE_S = 0.25


class Caller:
    """Whether the caller of one write attempt gave up: set on the event loop when it is cancelled,
    read by the thread waiting for the lock (a plain attribute: a ``threading.Event`` cost 5 us a
    transaction to make, on the write path's every call)."""

    __slots__ = ("gone",)

    def __init__(self) -> None:
        self.gone = False


#: The current write attempt's caller, for the engine's BEGIN (``db``), which runs where no argument
#: reaches it; the lanes pass theirs along.
CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar(
    "peer_tracker_sqlite_caller", default=None
)


class Abandoned(Exception):
    """The caller was cancelled while its transaction waited for SQLite's write lock: the transaction
    never began, so nothing of it was written."""


def begin_immediate(
    execute: Callable[[str], Any],
    busy_timeout_s: float,
    caller: Caller | None,
    is_busy: Callable[[BaseException], bool],
) -> None:
    """Run ``BEGIN IMMEDIATE`` through ``execute``, waiting up to ``busy_timeout_s`` in all for the
    lock, a try at a time; raise ``Abandoned`` once ``caller`` is gone, the last busy error once
    the time is spent. The connection's own busy timeout is one try's wait: ``SLICE_S`` (see
    ``sliced``, or a connection that only ever writes, set so once: the write lane's)."""
    deadline = time.monotonic() + busy_timeout_s
    while True:
        if caller is not None and caller.gone:
            raise Abandoned("the caller gave up while the transaction waited for SQLite's write lock")
        try:
            execute("BEGIN IMMEDIATE")
            return
        except Exception as error:
            if not is_busy(error) or time.monotonic() >= deadline:
                raise


@contextmanager
def sliced(execute: Callable[[str], Any], busy_timeout_s: float) -> Iterator[None]:
    """The connection's busy timeout a slice long inside the block, ``busy_timeout_s`` again after it,
    for a connection whose other statements keep the whole wait (the engine's pool serves reads)."""
    execute(f"PRAGMA busy_timeout={slice_ms(busy_timeout_s)}")
    try:
        yield
    finally:
        execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")


def slice_ms(busy_timeout_s: float) -> int:
    """One try's wait in milliseconds: ``SLICE_S``, or the whole timeout when that is shorter."""
    return int(min(SLICE_S, busy_timeout_s) * 1000)

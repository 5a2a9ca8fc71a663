"""Per-item Python work on a large input runs in a worker thread, so the event loop keeps serving.

Checking and stamping a batch of 50,000 events took ~0.3 s, turning a service request's body into
events ~0.35 s more, all on the event loop (measured): every selection and heartbeat that process
served waited. In a thread the work shares the interpreter lock with the loop, which gets it back at
least every ``sys.getswitchinterval()`` (5 ms). Small inputs stay on the loop: a hop to a thread and
back (~0.1 ms) would cost a single event more than its checks do.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

#: Items from which the work goes to a thread: 1,000 events are ~6 ms of checks.
OFF_LOOP_ITEMS = 1_000


async def off_loop(items: int, function: Callable[..., T], *args: Any) -> T:
    """``function(*args)``, in a worker thread when it works through ``items`` >= ``OFF_LOOP_ITEMS``."""
    if items < OFF_LOOP_ITEMS:
        return function(*args)
    return await asyncio.to_thread(function, *args)

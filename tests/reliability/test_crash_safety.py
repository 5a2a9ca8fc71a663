"""SIGKILL a tracker at random moments, 20 times, on each engine: after every restart the database is
intact, every acknowledged event is there, and the counters equal the events stored."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from sqlalchemy import text
from stored import stored_outcomes
from test_serve import Server

from tracker import AvailabilityTracker, TrackerConfig

CHILD = Path(__file__).with_name("crash_child.py")
KILLS = 20
#: Acknowledgements each round waits for before its random delay and kill: a fixed delay alone let
#: a loaded host (other jobs at load 5 on 2 cores) kill before enough events were acknowledged.
ACKS_PER_ROUND = 11


def _await_acks(acked: set[int], lock: threading.Lock | None, count: int) -> None:
    deadline = time.monotonic() + 60
    while True:
        if lock is None:
            have = len(acked)
        else:
            with lock:
                have = len(acked)
        if have >= count:
            return
        assert time.monotonic() < deadline, f"only {have} of {count} events acknowledged in 60 s"
        time.sleep(0.01)


class _Child:
    """The child process and what it said, read on a thread so its pipe never fills."""

    def __init__(self, url: str, first: int) -> None:
        self.sent: set[int] = set()
        self.acked: set[int] = set()
        self.ready = threading.Event()
        self.process = subprocess.Popen(
            [sys.executable, str(CHILD), url, str(first)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode().split()
            if line == ["ready"]:
                self.ready.set()
            elif len(line) == 2 and line[0] == "sent":
                self.sent.add(int(line[1]))
            elif len(line) == 2 and line[0] == "ack":
                self.acked.add(int(line[1]))

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        self.reader.join(timeout=30)
        if self.process.stdout is not None:
            self.process.stdout.close()


async def _check(url: str, acked: set[int], sent: set[int]) -> int:
    """What must hold after a crash; returns the events stored."""
    async with AvailabilityTracker(TrackerConfig(database_url=url)) as tracker:
        async with tracker.engine.connect() as conn:
            if url.startswith("sqlite"):
                assert (await conn.execute(text("PRAGMA integrity_check"))).scalar_one() == "ok"
            stored, served = await stored_outcomes(conn, "crash-peer", tracker.node_id)
    assert acked <= stored, f"acknowledged but lost: {sorted(acked - stored)[:10]}"
    assert stored <= sent, f"stored but never sent: {sorted(stored - sent)[:10]}"
    assert served == len(stored), f"counter {served} != {len(stored)} events stored"
    return len(stored)


def test_library_ingest_survives_sigkill_twenty_times(db_url: str) -> None:
    rng = random.Random(20261130)
    acked: set[int] = set()
    sent: set[int] = set()
    first = 0
    for _ in range(KILLS):
        child = _Child(db_url, first)
        assert child.ready.wait(60), "the child did not start"
        _await_acks(child.acked, None, ACKS_PER_ROUND)
        time.sleep(rng.uniform(0.0, 0.5))
        child.kill()
        acked |= child.acked
        sent |= child.sent
        first = max(sent, default=first) + 1
        stored = asyncio.run(_check(db_url, acked, sent))
    assert len(acked) > KILLS * 10 and stored >= len(acked)
    print(f"crash: {KILLS} kills, {len(acked)} acknowledged, {stored} stored, {len(sent)} sent")


class _Load:
    """Threads posting numbered outcomes to a server, recording what was sent and acknowledged."""

    def __init__(self, first: int) -> None:
        self.next = first
        self.sent: set[int] = set()
        self.acked: set[int] = set()
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def run(self, base_url: str) -> None:
        with httpx.Client(base_url=base_url, timeout=5) as http:
            while not self.stop.is_set():
                with self.lock:
                    mine, self.next = self.next, self.next + 1
                    self.sent.add(mine)
                body = {"peer_id": "crash-peer", "success": True, "bytes": mine}
                try:
                    response = http.post("/v1/peers/outcomes", json=body)
                except httpx.TransportError:
                    return
                if response.status_code == 200:
                    with self.lock:
                        self.acked.add(mine)


def test_http_ingest_survives_sigkill_of_the_server(db_url: str, tmp_path: Path) -> None:
    rng = random.Random(7)
    load = _Load(0)
    for round_ in range(KILLS):
        server = Server(db_url, tmp_path / f"serve{round_}.log", env={"TRACKER_LOG_LEVEL": "warning"})
        server.wait_ready()
        load.stop.clear()
        threads = [threading.Thread(target=load.run, args=(server.base_url,)) for _ in range(4)]
        for thread in threads:
            thread.start()
        _await_acks(load.acked, load.lock, len(load.acked) + ACKS_PER_ROUND)
        time.sleep(rng.uniform(0.0, 0.5))
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(timeout=30)
        load.stop.set()
        for thread in threads:
            thread.join(timeout=30)
        asyncio.run(_check(db_url, load.acked, load.sent))
    assert len(load.acked) > KILLS * 10
    print(f"crash over HTTP: {KILLS} kills, {len(load.acked)} acknowledged, {len(load.sent)} sent")

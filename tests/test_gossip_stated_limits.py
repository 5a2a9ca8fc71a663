"""Trackers configured with different ``max_bytes`` tell each other their limits and converge.

A receiver used to refuse, whole, every message of a neighbour over its own limit (QA round 10).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from gossip_helpers import KEY, LocalNet, merged_view

from tracker import AvailabilityTracker, TrackerConfig
from tracker.gossip import limits
from tracker.gossip.agent import GossipAgent
from tracker.gossip.config import GossipConfig
from tracker.service.app import create_app
from tracker.testing import ManualClock

T0 = 1_800_000_000.0
SMALL = GossipConfig(keys=(KEY,), max_bytes=8_000, max_rows=1_000, stamp_chunk=5)
BIG = GossipConfig(keys=(KEY,), max_rows=1_000, stamp_chunk=5)  # max_bytes 4 MiB


@pytest.fixture
async def pair(db_url: str, tmp_path: Path) -> AsyncIterator[tuple[AvailabilityTracker, AvailabilityTracker]]:
    """The small tracker on the engine under test, the big one on an SQLite file."""
    clock = ManualClock(T0)
    small = await AvailabilityTracker.open(TrackerConfig(database_url=db_url, clock=clock))
    big = await AvailabilityTracker.open(
        TrackerConfig(database_url=f"sqlite+aiosqlite:///{tmp_path / 'big.db'}", clock=clock)
    )
    yield small, big
    await small.close()
    await big.close()


async def _swarm(tracker: AvailabilityTracker, prefix: str, n: int) -> None:
    """Rows of ~265 compressed bytes each (ids, 10 samples): ``n`` of 300 are ~80 kB of gossip."""
    for i in range(n):
        peer = f"{prefix}-{i:04d}-" + "x" * 40
        await tracker.record_peer_online(peer)
        await tracker.record_content_available(f"{prefix}-cid-{i % 7}", peer)
        for speed in range(10):
            await tracker.record_download_speed(peer, 1_000_000 + i * 31 + speed * 7717)


def _agents(
    pair: tuple[AvailabilityTracker, AvailabilityTracker],
) -> tuple[LocalNet, GossipAgent, GossipAgent]:
    """Both agents, reachable at ``http://small`` and ``http://big``."""
    net = LocalNet()
    small = GossipAgent(pair[0], SMALL, transport=net)
    big = GossipAgent(pair[1], BIG, transport=net)
    net.agents.update({"http://small": small, "http://big": big})
    return net, small, big


async def _converge(initiator: GossipAgent, url: str, rounds: int = 12) -> None:
    for _ in range(rounds):
        await initiator.exchange(url)


async def _same(a: AvailabilityTracker, b: AvailabilityTracker, cids: list[str]) -> None:
    assert await merged_view(a, cids) == await merged_view(b, cids)


async def test_a_bigger_trackers_syncs_fit_a_smaller_neighbour(
    pair: tuple[AvailabilityTracker, AvailabilityTracker],
) -> None:
    small_tracker, big_tracker = pair
    _, small, big = _agents(pair)
    await _swarm(big_tracker, "big", 300)
    await _converge(big, "http://small")
    assert small.stats.rejected == {}
    assert len(await small_tracker.list_peers(limit=1_000)) == 300
    await _same(small_tracker, big_tracker, [f"big-cid-{i}" for i in range(7)])


async def test_a_bigger_trackers_replies_fit_a_smaller_initiator(
    pair: tuple[AvailabilityTracker, AvailabilityTracker],
) -> None:
    small_tracker, big_tracker = pair
    _, small, big = _agents(pair)
    await _swarm(big_tracker, "big", 300)
    await _swarm(small_tracker, "small", 20)
    await _converge(small, "http://big")
    assert small.stats.rejected == {} and big.stats.rejected == {}
    assert len(await small_tracker.list_peers(limit=1_000)) == 320
    await _same(small_tracker, big_tracker, [f"{p}-cid-{i}" for p in ("big", "small") for i in range(7)])


async def test_a_neighbour_that_states_no_limit_is_sent_half_of_what_it_refused(
    pair: tuple[AvailabilityTracker, AvailabilityTracker],
) -> None:
    """A tracker of an earlier release states no limit: its refusal as oversized halves the next
    try, at once, in the same exchange, instead of a back-off and the same message again."""
    small_tracker, big_tracker = pair
    net, small, big = _agents(pair)
    sent: list[int] = []

    async def earlier_release(
        url: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, bytes, dict[str, str]]:
        sent.append(len(body))
        headers = {k: v for k, v in headers.items() if k != limits.HEADER}
        status, answer, answer_headers = await net(url, body, headers)
        return status, answer, {k: v for k, v in answer_headers.items() if k != limits.HEADER.lower()}

    big._transport = earlier_release
    await big.exchange("http://small")  # first contact: a digest only
    await _swarm(big_tracker, "big", 300)
    await _converge(big, "http://small")
    assert small.stats.rejected.get("oversized", 0) >= 1  # it did refuse, until the size came down
    assert big.stats.failures == 0  # but no exchange failed
    assert max(sent[sent.index(max(sent)) + 1 :]) <= SMALL.max_bytes
    assert len(await small_tracker.list_peers(limit=1_000)) == 300


async def test_the_endpoint_states_the_limit_on_every_answer(db_url: str) -> None:
    tracker = await AvailabilityTracker.open(TrackerConfig(database_url=db_url, clock=ManualClock(T0)))
    try:
        agent = GossipAgent(tracker, SMALL)
        app = create_app(tracker, gossip=agent)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            refused = await client.post("/v1/gossip", content=b"\x1f\x8b" + b"x" * 9_000)
            assert refused.status_code == 413
            assert refused.json()["error"]["code"] == "gossip_oversized"
            assert refused.headers[limits.HEADER] == "8000"
            unsigned = await client.post("/v1/gossip", content=b"x")
            assert unsigned.status_code == 401 and unsigned.headers[limits.HEADER] == "8000"
    finally:
        await tracker.close()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("-5", None),
        ("1e6", None),
        ("12 000", None),
        ("9" * 40, None),
        ("10", limits.MIN_BYTES),  # below what any tracker accepts
        ("5000", 5000),
        (" 5000 ", 5000),
        ("99999999", 8000),  # never above this tracker's own
        ("\u00b2", None),  # a digit to str.isdigit, not to int(): it was a 500 (QA round 14)
        ("\u0663\u0663\u0663\u0663", None),  # Arabic-Indic digits: int() takes them, HTTP should not
    ],
)
def test_a_stated_limit_is_read_strictly_and_clamped(value: str | None, expected: int | None) -> None:
    assert limits.stated(value, 8000) == expected

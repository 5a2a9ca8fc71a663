"""Gossip between trackers whose message limits differ: versions bigger than a relay's budget, and
settings under which no message could ever be accepted."""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from gossip_helpers import KEY, LocalNet
from sqlalchemy import select, update

from tracker import AvailabilityTracker, TrackerConfig
from tracker.db import run_read, run_write
from tracker.errors import ConfigError
from tracker.gossip.agent import GossipAgent
from tracker.gossip.config import GossipConfig
from tracker.queries import gossip as q
from tracker.schema import nodes
from tracker.testing import ManualClock

T0 = 1_800_000_000.0


@pytest.fixture
async def trackers(db_url: str, tmp_path: Path) -> AsyncIterator[list[AvailabilityTracker]]:
    """The relay on the engine under test, three more trackers on SQLite files."""
    clock = ManualClock(T0)
    urls = [db_url] + [f"sqlite+aiosqlite:///{tmp_path / f'{n}.db'}" for n in "bcd"]
    opened = [await AvailabilityTracker.open(TrackerConfig(database_url=u, clock=clock)) for u in urls]
    yield opened
    for tracker in opened:
        await tracker.close()


@pytest.mark.parametrize("busy", [False, True])
async def test_a_relay_with_a_smaller_budget_passes_on_bigger_versions_and_every_other_origin(
    trackers: list[AvailabilityTracker], busy: bool
) -> None:
    """``big`` stamps 40 rows per version; the relay and ``leaf`` send at most 20 rows a message.

    The relay used to stop at the first version over its budget: neither big's rows nor those of
    the origins sorted after it ever reached the leaf (QA round 6). Then such a version waited for
    a message it would come first in, which never came while the relay had fresh rows of its own
    (``busy``: a new peer before each message; QA round 9). Every row arrives now, in messages of
    at most the budget but one, plus one whole version.
    """
    relay_tracker, big_tracker, small_tracker, leaf_tracker = trackers
    net = LocalNet()
    small_limits = GossipConfig(keys=(KEY,), max_rows=20, stamp_chunk=5)
    relay = GossipAgent(relay_tracker, small_limits, transport=net)
    big = GossipAgent(big_tracker, GossipConfig(keys=(KEY,), max_rows=100, stamp_chunk=40), transport=net)
    small = GossipAgent(small_tracker, small_limits, transport=net)
    leaf = GossipAgent(leaf_tracker, small_limits, transport=net)
    net.agents.update({"http://relay": relay, "http://big": big, "http://small": small})
    for i in range(100):
        await big_tracker.record_peer_online(f"big-{i:03}")
    for i in range(12):
        await small_tracker.record_peer_online(f"small-{i:02}")
    for origin in (big, small):
        for _ in range(2):  # a first contact, then the rows (each exchange follows up while "more")
            await origin.exchange("http://relay")
    assert len(await relay_tracker.list_peers(limit=1000)) == 112
    replies: list[list[tuple[str, int]]] = []  # per reply: (origin, rows) of each part

    async def watch(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
        if busy:  # a fresh version of the relay's own in every reply
            await relay_tracker.record_peer_online(f"relay-{len(replies)}")
        status, answer, answer_headers = await net(url, body, headers)
        assert status == 200, answer
        parts = json.loads(gzip.decompress(answer))["deltas"]
        replies.append([(d["origin"], len(d["peers"]) + len(d["mappings"])) for d in parts])
        return status, answer, answer_headers

    leaf._transport = watch
    for _ in range(4):
        await leaf.exchange("http://relay")
    assert sorted(p.peer_id for p in await leaf_tracker.list_peers(limit=1000)) == sorted(
        p.peer_id for p in await relay_tracker.list_peers(limit=1000)
    )
    assert leaf.stats.rows_applied >= 112
    for parts in replies:  # the parts before the last within the budget; the last one version at most
        rows = [n for _, n in parts] or [0]
        assert sum(rows[:-1]) < 20 and rows[-1] <= 40, parts  # big's versions: 40, 40, 20 rows


async def test_settings_under_which_no_version_fits_a_message_are_refused(
    trackers: list[AvailabilityTracker],
) -> None:
    tracker = trackers[1]
    with pytest.raises(ConfigError, match=r"max_bytes \(1024\) cannot hold one version of stamp_chunk"):
        GossipAgent(tracker, GossipConfig(keys=(KEY,), max_bytes=1024))
    agent = GossipAgent(tracker, GossipConfig(keys=(KEY,), max_bytes=1024, stamp_chunk=1))
    await agent.aclose()


async def test_a_version_that_fits_no_message_is_left_out_with_an_error_and_the_rest_travels(
    trackers: list[AvailabilityTracker], caplog: pytest.LogCaptureFixture
) -> None:
    """Ids of 256 characters make one row bigger than the estimate behind the check above: a
    message of one such row is over 1 KiB. Sent, the receiver with the same limit refused it, and
    with it the rows of every other origin, which came after it in every message (QA round 9)."""
    net = LocalNet()
    limits = GossipConfig(keys=(KEY,), max_bytes=1024, stamp_chunk=1)
    other = GossipAgent(trackers[1], limits, transport=net)
    sender = GossipAgent(trackers[2], limits, transport=net)
    receiver = GossipAgent(trackers[3], limits, transport=net)
    net.agents.update({"http://receiver": receiver, "http://sender": sender})
    for i in range(3):
        await trackers[1].record_peer_online(f"small-{i}")
    for _ in range(3):
        await other.exchange("http://sender")
    peer = "".join(chr(0x4E00 + (i * 7919) % 20000) for i in range(256))
    await trackers[2].record_peer_online(peer)
    for speed in range(10):
        await trackers[2].record_download_speed(peer, 1_000_000 + speed * 7717)
    with caplog.at_level(logging.ERROR, logger="tracker.gossip"):
        for _ in range(3):
            await sender.exchange("http://receiver")
    oversized = [r for r in caplog.records if getattr(r, "action", None) == "gossip_message_oversized"]
    assert oversized and "raise max_bytes" in oversized[0].getMessage()
    assert all(r.origins == [trackers[2].node_key] for r in oversized)
    assert receiver.stats.rejected.get("oversized", 0) == 0
    assert [p.peer_id for p in await trackers[3].list_peers()] == ["small-0", "small-1", "small-2"]


async def test_origins_a_neighbour_lags_least_behind_go_first(trackers: list[AvailabilityTracker]) -> None:
    """A big backlog (here 10 versions of ``big``) no longer holds back the origins sorted after it
    by key until it is drained: the few fresh rows of ``small`` lead the message. Counted in rows:
    by versions, which follow the clock in milliseconds, small's stamp 30 s after big's put it
    30,000 behind (QA round 67)."""
    relay_tracker, big_tracker, small_tracker, _ = trackers
    net = LocalNet()
    relay = GossipAgent(relay_tracker, GossipConfig(keys=(KEY,), max_rows=200, stamp_chunk=10), transport=net)
    big = GossipAgent(big_tracker, GossipConfig(keys=(KEY,), max_rows=200, stamp_chunk=10), transport=net)
    small = GossipAgent(small_tracker, GossipConfig(keys=(KEY,), max_rows=200, stamp_chunk=10), transport=net)
    net.agents["http://relay"] = relay
    for i in range(100):
        await big_tracker.record_peer_online(f"big-{i:03}")
    for i in range(3):
        await small_tracker.record_peer_online(f"small-{i}")
    for origin in (big, small):
        for _ in range(2):
            await origin.exchange("http://relay")
        relay_tracker.config.clock.advance(30)  # type: ignore[attr-defined]

    async def rename(conn: Any) -> None:  # key order would put big first
        for old, new in ((big_tracker.node_key, "a-big"), (small_tracker.node_key, "z-small")):
            await conn.execute(update(nodes).where(nodes.c.node_key == old).values(node_key=new))

    await run_write(relay_tracker.engine, rename, 0)

    async def read(conn: Any) -> q.Delta:
        return await q.read_deltas(conn, {}, (), 20, relay_tracker.config.bandwidth_window)

    delta = await run_read(relay_tracker.engine, read)
    parts = [(d.origin, len(d.peers)) for d in delta.deltas]
    assert parts == [("z-small", 3), ("a-big", 10)] and delta.truncated, parts


async def test_a_message_visits_at_most_max_origins_and_the_follow_ups_take_the_rest(
    trackers: list[AvailabilityTracker], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every origin above the receiver's clock costs a message four statements and a thread hop, rows
    or not: 10,000 origins gone for good (their rows forgotten everywhere, their clocks kept) took
    70 s to build a new neighbour's first message, past its timeout at every round (QA round 50).
    A message visits MAX_ORIGINS; the exchange's follow-ups take the rest, and the newcomer ends
    with every clock (which answers asks for those origins: QA round 53)."""
    from tracker.queries.gossip import deltas

    monkeypatch.setattr(deltas, "MAX_ORIGINS", 2)
    old, new = trackers[0], trackers[1]
    await old.record_peer_online("p")
    gone = [f"gone-{i}" for i in range(5)]

    async def remember(conn: Any) -> None:  # what gossip leaves of origins whose rows were forgotten
        for key in gone:
            await conn.execute(nodes.insert().values(node_key=key, is_local=False, created_at=0.0, clock=3))

    await run_write(old.engine, remember, 0)

    async def first(conn: Any) -> q.Delta:
        return await q.read_deltas(conn, {}, (), 100, 10)

    delta = await run_read(old.engine, first)
    assert len(delta.deltas) == 2 and delta.truncated
    net = LocalNet()
    net.agents = {
        name: GossipAgent(t, GossipConfig(keys=(KEY,)), transport=net.transport_for(name))
        for name, t in (("http://old", old), ("http://new", new))
    }
    await net.agents["http://new"].exchange("http://old")

    async def clocks(conn: Any) -> dict[str, int]:
        return {str(k): int(c) for k, c in await conn.execute(select(nodes.c.node_key, nodes.c.clock))}

    held = await run_read(new.engine, clocks)
    assert {key: held.get(key) for key in gone} == dict.fromkeys(gone, 3)
    assert await new.get_peer_metrics("p") is not None


async def test_past_max_origins_the_most_behind_get_places_too(
    trackers: list[AvailabilityTracker], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cut at MAX_ORIGINS by least lag alone, origins that each changed between two messages, that
    many, kept an origin with a backlog out of every message for good (QA round 54)."""
    from tracker.queries.gossip import deltas

    monkeypatch.setattr(deltas, "MAX_ORIGINS", 2)
    relay, b, c, d = trackers
    net = LocalNet()
    net.agents = {
        name: GossipAgent(t, GossipConfig(keys=(KEY,)), transport=net.transport_for(name))
        for name, t in (("http://relay", relay), ("http://b", b), ("http://c", c), ("http://d", d))
    }
    for name, tracker in (("http://b", b), ("http://c", c), ("http://d", d)):
        for i in range(4 if tracker is d else 1):
            await tracker.record_peer_online(f"{name[-1]}-{i}")
            await net.agents[name].exchange("http://relay")  # a version each

    async def clocks(conn: Any) -> dict[str, int]:
        return {str(k): int(c) for k, c in await conn.execute(select(nodes.c.node_key, nodes.c.clock))}

    held = await run_read(relay.engine, clocks)
    # Busy b and c are one version ahead of this receiver; d is far behind.
    vector = {b.node_key: held[b.node_key] - 1, c.node_key: held[c.node_key] - 1, d.node_key: 0}
    vector[relay.node_key] = held[relay.node_key]

    async def message(conn: Any) -> q.Delta:
        return await q.read_deltas(conn, vector, (), 100, 10)

    delta = await run_read(relay.engine, message)
    assert delta.truncated and len(delta.deltas) == 2
    assert d.node_key in {part.origin for part in delta.deltas}

"""Gossip rows dated ahead of the receiver's clock: held back, never applied, never a crash.

An origin whose clock ran ahead (or a forged row under a valid key) once pinned peers online, won
every last-writer-wins and, at ``last_seen=1e12``, broke ``GET /v1/peers`` with a bare 500.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from gossip_helpers import KEY, LocalNet
from sqlalchemy import func, select, update

from tracker import AvailabilityTracker, TrackerConfig
from tracker.events import ContentAvailable, ContentUnavailable, PeerOnline
from tracker.gossip.agent import GossipAgent
from tracker.gossip.config import GossipConfig
from tracker.gossip.importer import import_snapshot
from tracker.gossip.protocol import Keyring, MappingState, Message, OriginDelta, PeerState, new_nonce, signed
from tracker.queries import gossip as q
from tracker.schema import bandwidth_samples, peer_stats
from tracker.service import ServiceSettings, create_app
from tracker.state_export import write_state_snapshot
from tracker.testing import ManualClock

T0 = 1_800_000_000.0
SKEW = 120.0


@pytest.fixture
async def agent(db_url: str) -> AsyncIterator[GossipAgent]:
    tracker = await AvailabilityTracker.open(TrackerConfig(database_url=db_url, clock=ManualClock(T0)))
    agent = GossipAgent(tracker, GossipConfig(keys=(KEY,), max_skew_s=SKEW))
    yield agent
    await tracker.close()


def _peer(name: str, version: int, last_seen: float, samples_version: int | None = None) -> PeerState:
    return PeerState(
        peer=name,
        first_seen=T0 - 1000,
        online=True,
        online_since=T0 - 1000,
        last_seen=last_seen,
        uptime_s=0.0,
        served=version,
        failed=0,
        success_weight=float(version),
        failure_weight=0.0,
        evidence_at=T0 - 1000,
        updated_at=min(last_seen, T0),
        version=version,
        samples=[(T0 - 500, 1000 * version)],
        samples_version=samples_version,
    )


def _mapping(cid: str, peer: str, version: int, changed_at: float) -> MappingState:
    return MappingState(
        cid=cid, peer=peer, available=True, since=T0 - 1000, last_confirmed=changed_at, changed_at=changed_at,
        version=version,
    )  # fmt: skip


async def _send(agent: GossipAgent, deltas: list[OriginDelta]) -> None:
    now = agent.tracker.config.clock()
    message = Message(kind="sync", node="sender", sent_at=now, nonce=new_nonce(), vector={}, deltas=deltas)
    body, headers = signed(message, Keyring([KEY]))
    status, answer, _ = await agent.handle(body, headers["Authorization"])
    assert status == 200, answer


async def _vectors(agent: GossipAgent) -> tuple[dict[str, int], dict[str, int]]:
    async with agent.tracker.engine.connect() as conn:
        return await q.vectors(conn)


async def _online(agent: GossipAgent) -> dict[str, Any]:
    return {p.peer_id: p.last_seen for p in await agent.tracker.list_peers(limit=100)}


async def test_rows_from_the_future_are_held_with_their_origins_later_versions(agent: GossipAgent) -> None:
    ahead = T0 + 200  # the origin's clock ran 200 s fast
    other = OriginDelta(
        origin="other",
        base=0,
        upto=4,
        samples_upto=4,
        peers=[_peer("a", 1, T0 - 10), _peer("b", 2, ahead), _peer("c", 3, T0 - 5)],
        mappings=[_mapping("cid", "a", 4, T0 - 10)],
    )
    third = OriginDelta(origin="third", base=0, upto=1, samples_upto=1, peers=[_peer("d", 1, T0 - 1)])
    await _send(agent, [other, third])

    assert agent.stats.rows_held_future == 3  # b (the future row) and everything of "other" after it
    assert set(await _online(agent)) == {"a", "d"}
    assert await agent.tracker.get_content_availability("cid") is None
    clocks, samples = await _vectors(agent)
    assert (clocks["other"], samples["other"]) == (1, 1)  # the next delta starts at version 2 again
    assert (clocks["third"], samples["third"]) == (1, 1)

    # Once the rows are no longer ahead, the same rows apply from where the clock stopped.
    agent.tracker.config.clock.advance(100)  # type: ignore[attr-defined]
    again = other.model_copy(update={"base": 1, "peers": other.peers[1:]})
    await _send(agent, [again])
    assert agent.stats.rows_held_future == 3
    assert set(await _online(agent)) == {"a", "b", "c", "d"}
    content = await agent.tracker.get_content_availability("cid")
    assert content is not None and [p.peer_id for p in content.peers] == ["a"]
    assert (await _vectors(agent))[0]["other"] == 4


async def test_a_row_within_the_skew_applies_and_one_just_beyond_it_is_held(agent: GossipAgent) -> None:
    at_limit = OriginDelta(origin="o", base=0, upto=1, samples_upto=1, peers=[_peer("x", 1, T0 + SKEW)])
    await _send(agent, [at_limit])
    beyond = OriginDelta(
        origin="o", base=1, upto=2, samples_upto=2, mappings=[_mapping("c", "x", 2, T0 + SKEW + 0.001)]
    )
    await _send(agent, [beyond])
    assert agent.stats.rows_held_future == 1
    assert set(await _online(agent)) == {"x"}
    assert await agent.tracker.get_content_availability("c") is None
    assert (await _vectors(agent))[0]["o"] == 1


async def test_a_row_dated_in_year_33658_leaves_every_read_working(agent: GossipAgent) -> None:
    absurd = OriginDelta(
        origin="o", base=0, upto=2, samples_upto=2,
        peers=[_peer("x", 1, T0 - 1), _peer("y", 2, 1e12)],
    )  # fmt: skip
    await _send(agent, [absurd])
    assert set(await _online(agent)) == {"x"}
    assert await agent.tracker.get_peer_metrics("y") is None
    metrics = await agent.tracker.get_peer_metrics("x")
    assert metrics is not None and metrics.chunks_served == 1


async def test_times_beyond_what_datetime_holds_read_as_its_limit_not_a_500(agent: GossipAgent) -> None:
    """Operators' SQL can write any time: the API still answers, with the datetime range's limits."""
    tracker = agent.tracker
    await tracker.record_peer_online("p")
    async with tracker.engine.begin() as conn:
        await conn.execute(update(peer_stats).values(last_seen=1e12, online_since=-1e12))
    metrics = await tracker.get_peer_metrics("p")
    assert metrics is not None and metrics.last_seen == datetime.max.replace(tzinfo=UTC)
    app = create_app(tracker, ServiceSettings())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as api:
        one = await api.get("/v1/peers/p")
        assert one.status_code == 200, one.text
        assert one.json()["last_seen"].startswith("9999-12-31T23:59:59")
        listing = await api.get("/v1/peers")
        assert listing.status_code == 200, listing.text


@asynccontextmanager
async def _pair(
    a_url: str, b_url: str, a_clock: ManualClock, b_clock: ManualClock
) -> AsyncIterator[tuple[GossipAgent, GossipAgent]]:
    """Two gossiping trackers, a and b, each on its own clock (with elapsed time), on one LocalNet."""
    net = LocalNet()
    trackers = []
    try:
        for url, clock, name in ((a_url, a_clock, "http://a"), (b_url, b_clock, "http://b")):
            config = TrackerConfig(database_url=url, clock=clock, monotonic=clock.monotonic)
            trackers.append(tracker := await AvailabilityTracker.open(config))
            net.agents[name] = GossipAgent(
                tracker, GossipConfig(keys=(KEY,)), transport=net.transport_for(name)
            )
        yield net.agents["http://a"], net.agents["http://b"]
    finally:
        for tracker in trackers:
            await tracker.close()


async def test_an_origin_whose_clock_is_set_back_releases_its_held_rows(
    db_url: str, other_db_url: str
) -> None:
    """A ran a day ahead from its start (nothing to compare with) and stamped rows; set right, its
    rows are a day ahead and B holds them, with every later row of A. A's next sweep brings its
    rows back to now and re-versions them, so B takes them at the next exchange instead of a day
    later (QA: gossip_origin_frozen.py)."""
    a_clock, b_clock = ManualClock(T0 + 86_400), ManualClock(T0)
    async with _pair(db_url, other_db_url, a_clock, b_clock) as (a, b):
        await a.tracker.sweep()
        await a.tracker.record_peer_online("p")
        await a.tracker.record_content_available("movie", "p")
        a_clock.leap(-86_400)  # set right (its messages are in step again, its rows are not)
        await a.exchange("http://b")
        assert b.stats.rows_held_future == 2 and await b.tracker.get_available_peers("movie") == []

        report = await a.tracker.sweep()
        assert report.future_rows_clamped >= 2
        await a.exchange("http://b")
        assert await b.tracker.get_available_peers("movie") == ["p"]
        metrics = await b.tracker.get_peer_metrics("p")
        assert metrics is not None and metrics.last_seen == datetime.fromtimestamp(T0, tz=UTC)


async def test_samples_dated_ahead_are_repaired_too_so_speeds_move_and_gossip_and_snapshots_flow(
    db_url: str, other_db_url: str, tmp_path: Path
) -> None:
    """The same with speed samples (QA round 7): the repair left them a day ahead, so the peer's
    speed ignored every new sample for a day, B held A's row and every later version of A for as
    long, and B refused a snapshot A wrote after its repair."""
    a_clock, b_clock = ManualClock(T0 + 86_400), ManualClock(T0)
    async with _pair(db_url, other_db_url, a_clock, b_clock) as (a, b):
        await a.tracker.sweep()
        await a.tracker.record_peer_online("p")
        for _ in range(10):
            a_clock.advance(1)
            await a.tracker.record_download_speed("p", 1_000_000)
        a_clock.leap(-86_400)
        a_clock.advance(60)
        assert (await a.tracker.sweep()).future_rows_clamped >= 11
        for _ in range(10):
            a_clock.advance(1)
            await a.tracker.record_download_speed("p", 5_000_000)
        metrics = await a.tracker.get_peer_metrics("p")
        assert metrics is not None and metrics.download_speed == 5_000_000
        await a.tracker.record_batch([PeerOnline("q"), ContentAvailable("movie", "q")])
        b_clock.advance(80)
        await a.exchange("http://b")
        await a.exchange("http://b")
        assert b.stats.rows_held_future == 0
        assert await b.tracker.get_available_peers("movie") == ["q"]
        metrics = await b.tracker.get_peer_metrics("p")
        assert metrics is not None and metrics.download_speed == 5_000_000
        async with a.tracker.engine.connect() as conn:
            ahead = select(func.count()).where(bandwidth_samples.c.at > a_clock.now + 120)
            assert (await conn.execute(ahead)).scalar_one() == 0
        path = await write_state_snapshot(a.tracker, tmp_path, a_clock.now)
        report = await import_snapshot(b.tracker, path)
        assert report.peers_read == 2


async def test_a_removal_made_elsewhere_after_the_correction_survives_the_origins_repair(
    db_url: str, other_db_url: str
) -> None:
    """A started a day ahead and announced p; once A's clock is set right, B removes the mapping,
    correctly dated. A's repair brings its row back to when its clock was set right, not to the
    time of its sweep, so B's removal still wins everywhere (QA round 2: it was overturned)."""
    a_clock, b_clock = ManualClock(T0 + 86_400), ManualClock(T0)
    async with _pair(db_url, other_db_url, a_clock, b_clock) as (a, b):
        await a.tracker.sweep()
        await a.tracker.record_batch([PeerOnline("p"), ContentAvailable("movie", "p")])
        a_clock.leap(-86_400)
        a.tracker.now()  # A notices the step back at T0
        for clock in (a_clock, b_clock):
            clock.advance(5)
        await b.tracker.record_batch(
            [PeerOnline("p", at=T0 + 5), ContentUnavailable("movie", "p", at=T0 + 5)]
        )
        for clock in (a_clock, b_clock):
            clock.advance(20)
        assert (await a.tracker.sweep()).future_rows_clamped >= 2
        await a.exchange("http://b")
        await b.exchange("http://a")
        for node in (a, b):
            assert await node.tracker.get_available_peers("movie") == [], node.node_key


async def test_the_pass_that_first_reads_a_step_back_repairs_at_once(db_url: str) -> None:
    clock = ManualClock(T0 + 86_400)
    config = TrackerConfig(database_url=db_url, clock=clock, monotonic=clock.monotonic)
    async with AvailabilityTracker(config) as tracker:
        await tracker.sweep()
        await tracker.record_batch([PeerOnline("p"), ContentAvailable("movie", "p")])
        clock.leap(-86_400)  # nothing reads the clock until the sweep
        assert (await tracker.sweep()).future_rows_clamped >= 3

"""``heartbeat_resolution_s``: which local changes wait for gossip's next version and which do not.

With a resolution, a heartbeat that only moves ``last_seen`` inside its window keeps the row's
version, so gossip does not carry it; everything else (a new window, a session that starts or ends,
an outcome, a sample) clears the version as every change does without one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from gossip_helpers import KEY, LocalNet, merged_view
from sqlalchemy import select

from tracker import AvailabilityTracker, TrackerConfig
from tracker.db import run_write
from tracker.events import PeerOnline
from tracker.gossip.agent import GossipAgent
from tracker.gossip.config import GossipConfig
from tracker.queries import gossip as q
from tracker.schema import peer_stats, peers
from tracker.testing import ManualClock

T0 = 1_800_000_000.0  # a multiple of 60: windows of a minute start at T0, T0 + 60, ...


async def _stamp(tracker: AvailabilityTracker) -> None:
    async def work(conn: Any) -> int:
        return (await q.stamp(conn, tracker.config.dialect, tracker.node_id, 100, at=0)).clock

    await run_write(tracker.engine, work, 3)


async def _version(tracker: AvailabilityTracker, peer: str) -> int | None:
    """The local row's gossip version (None: awaiting its stamp)."""
    stmt = (
        select(peer_stats.c.version)
        .join(peers, peers.c.id == peer_stats.c.peer_id)
        .where(peers.c.peer_key == peer, peer_stats.c.node_id == tracker.node_id)
    )
    async with tracker.engine.connect() as conn:
        return (await conn.execute(stmt)).scalar_one()


async def _stamped(tracker: AvailabilityTracker, peer: str) -> int:
    await _stamp(tracker)
    version = await _version(tracker, peer)
    assert version is not None
    return version


@pytest.fixture
async def minute(db_url: str) -> AsyncIterator[AvailabilityTracker]:
    """A tracker on the engine under test whose heartbeats travel once a minute."""
    config = TrackerConfig(database_url=db_url, clock=ManualClock(T0 + 120), heartbeat_resolution_s=60)
    async with AvailabilityTracker(config) as tracker:
        yield tracker


async def test_heartbeats_within_a_window_keep_the_version_and_other_changes_clear_it(
    minute: AvailabilityTracker,
) -> None:
    t = minute
    await t.record_peer_online("p", at=T0 + 1)
    assert await _version(t, "p") is None  # a new row always awaits its stamp
    v = await _stamped(t, "p")

    await t.record_peer_online("p", at=T0 + 20)  # same window, same session
    await t.record_peer_online("p", at=T0 + 5)  # late: changes nothing
    await t.record_batch([PeerOnline("p", at=T0 + 40), PeerOnline("p", at=T0 + 59.5)])  # one batch
    assert await _version(t, "p") == v
    metrics = await t.get_peer_metrics("p")
    assert metrics is not None and metrics.last_seen.timestamp() == T0 + 59.5  # held locally all the same

    await t.record_peer_online("p", at=T0 + 60)  # the next window
    assert await _version(t, "p") is None
    v = await _stamped(t, "p")

    # Each of these changes what gossip carries, inside the same window.
    changes = [
        ("success", lambda: t.record_upload_success("p", at=T0 + 61)),
        ("failure", lambda: t.record_upload_failure("p", at=T0 + 62)),
        ("sample", lambda: t.record_download_speed("p", 5_000, at=T0 + 63)),
        ("offline", lambda: t.record_peer_offline("p", at=T0 + 64)),
        ("new session", lambda: t.record_peer_online("p", at=T0 + 65)),
    ]
    for name, change in changes:
        await change()
        assert await _version(t, "p") is None, name
        assert await _stamped(t, "p") > v, name
        v = await _stamped(t, "p")

    # A sample's upsert is a quiet sighting; its speed refresh still clears the version.
    await t.record_peer_online("p", at=T0 + 70)
    assert await _version(t, "p") == v
    await t.record_download_speed("p", 7_000, at=T0 + 71)
    assert await _version(t, "p") is None


async def test_a_heartbeat_older_than_a_report_in_the_next_window_stays_quiet(
    minute: AvailabilityTracker,
) -> None:
    """Ordered by the peer's own latest time, a heartbeat older than a report is fresh, and compared
    with the report's window it cleared the version: the row travelled again with nothing changed
    that gossip carries (QA round 55)."""
    t = minute
    await t.record_peer_online("p", at=T0 + 50)
    await t.record_upload_success("p", at=T0 + 61)  # the next window
    v = await _stamped(t, "p")
    await t.record_peer_online("p", at=T0 + 59)  # late: online, its start and last_seen stay
    assert await _version(t, "p") == v


async def test_without_a_resolution_every_heartbeat_awaits_a_stamp(db_url: str) -> None:
    config = TrackerConfig(database_url=db_url, clock=ManualClock(T0))
    async with AvailabilityTracker(config) as t:
        await t.record_peer_online("p", at=T0 + 1)
        await _stamp(t)
        await t.record_peer_online("p", at=T0 + 2)
        assert await _version(t, "p") is None


@pytest.fixture
async def pair(db_url: str, tmp_path: Path) -> AsyncIterator[tuple[GossipAgent, GossipAgent, ManualClock]]:
    """Node a (engine under test, heartbeats once a minute) and node b (SQLite) on one clock."""
    clock = ManualClock(T0)
    net = LocalNet()
    urls = {"a": db_url, "b": f"sqlite+aiosqlite:///{tmp_path / 'b.db'}"}
    agents = []
    for name, url in urls.items():
        config = TrackerConfig(database_url=url, clock=clock, heartbeat_resolution_s=60 if name == "a" else 0)
        tracker = await AvailabilityTracker.open(config)
        agent = GossipAgent(tracker, GossipConfig(keys=(KEY,), max_rows=50, stamp_chunk=7), transport=net)
        net.agents[f"http://{name}"] = agent
        agents.append(agent)
    yield agents[0], agents[1], clock
    for agent in agents:
        await agent.aclose()
        await agent.tracker.close()


async def _last_seen(agent: GossipAgent, peer: str) -> float:
    metrics = await agent.tracker.get_peer_metrics(peer)
    assert metrics is not None
    return metrics.last_seen.timestamp()


async def test_a_neighbour_lags_less_than_a_window_and_agrees_once_the_session_closes(
    pair: tuple[GossipAgent, GossipAgent, ManualClock],
) -> None:
    a, b, clock = pair
    await a.tracker.record_peer_online("p", at=T0 + 1)
    await b.exchange("http://a")
    assert await _last_seen(b, "p") == T0 + 1

    for at in (T0 + 30, T0 + 59):  # heartbeats every ~30 s inside one window
        clock.now = at
        await a.tracker.record_peer_online("p")
        await b.exchange("http://a")
        assert await _last_seen(b, "p") == T0 + 1  # not carried: b lags by less than 60 s
        assert (await b.tracker.get_peer_metrics("p")).online  # type: ignore[union-attr]

    clock.now = T0 + 89
    await a.tracker.record_peer_online("p")  # a new window: carried
    await b.exchange("http://a")
    assert await _last_seen(b, "p") == T0 + 89

    clock.now = T0 + 100
    await a.tracker.record_peer_online("p")  # the peer's last heartbeat, inside that window
    await b.exchange("http://a")
    assert await _last_seen(b, "p") == T0 + 89
    assert await merged_view(a.tracker, []) != await merged_view(b.tracker, [])

    clock.now = T0 + 100 + a.tracker.config.peer_timeout + 1
    await a.tracker.sweep()  # a closes the session at its last sighting, and that change travels
    await b.exchange("http://a")
    assert await _last_seen(b, "p") == T0 + 100
    assert await merged_view(a.tracker, []) == await merged_view(b.tracker, [])

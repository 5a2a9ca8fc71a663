"""Departed peers are forgotten, the same way on every tracker: ``peer_retention_s`` after their
origin last wrote them, an origin's rows go with their samples, and then the peers and contents
nothing refers to any more.

Until 2026-12-06 ``peers``, ``contents``, ``peer_stats`` and each peer's latest samples were never
deleted, and with churning peer ids they grew with every id ever seen (QA round 24's soak: +17 peers,
+77 contents and +430 samples a minute on a quiet mesh).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from gossip_helpers import KEY, LocalNet, Pair, open_pair
from sqlalchemy import func, select, text

from tracker import AvailabilityTracker, TrackerConfig
from tracker.config import MIN_PEER_RETENTION_S
from tracker.db import run_read, run_write
from tracker.errors import ConfigError
from tracker.events import PeerOnline
from tracker.gossip.agent import GossipAgent
from tracker.gossip.config import GossipConfig
from tracker.gossip.protocol import MappingState, OriginDelta, PeerState
from tracker.queries import forget
from tracker.queries import gossip as gq
from tracker.schema import bandwidth_samples, content_peers, contents, peer_stats, peers
from tracker.sweeper import FORGET_EVERY_S
from tracker.testing import ManualClock

T0 = 1_800_000_000.0
TABLES = (peers, contents, peer_stats, bandwidth_samples, content_peers)


async def _rows(tracker: AvailabilityTracker) -> dict[str, int]:
    async def read(conn: Any) -> dict[str, int]:
        return {
            t.name: int((await conn.execute(select(func.count()).select_from(t))).scalar_one())
            for t in TABLES
        }

    return await run_read(tracker.engine, read)


async def _expire(tracker: AvailabilityTracker, clock: ManualClock) -> None:
    """A pass past the timeout, as a running sweeper makes: closing a session writes the row."""
    clock.advance(tracker.config.peer_timeout + 1)
    await tracker.sweep()


@pytest.fixture
async def solo(db_url: str) -> AsyncIterator[tuple[AvailabilityTracker, ManualClock]]:
    clock = ManualClock(T0)
    async with AvailabilityTracker(TrackerConfig(database_url=db_url, clock=clock)) as tracker:
        yield tracker, clock


async def test_a_departed_peer_goes_with_its_samples_mappings_and_contents(
    solo: tuple[AvailabilityTracker, ManualClock],
) -> None:
    tracker, clock = solo
    config = tracker.config
    await tracker.record_peer_online("gone")
    await tracker.record_download_speed("gone", 1_000)
    await tracker.record_upload_success("gone")
    await tracker.record_content_available("movie", "gone")
    await tracker.record_peer_online("stays")
    await tracker.record_content_available("movie", "stays")
    await _expire(tracker, clock)
    steps = int(config.peer_retention_s // 250) + 1
    for step in range(steps):  # "stays" keeps talking; the sweeper passes daily
        clock.advance(250)
        await tracker.record_peer_online("stays")
        if step % 345 == 0 and step < steps - 345:
            await tracker.sweep()  # its mapping's removal, and the removal's pruning a week later
    report = await tracker.sweep()
    # Past the retention: its row with its samples, and then the peer.
    assert (report.pruned["peer_stats"], report.pruned["peers"], report.pruned["contents"]) == (1, 1, 0)
    assert await tracker.get_peer_metrics("gone") is None
    assert await _rows(tracker) == {
        "peers": 1,
        "contents": 1,
        "peer_stats": 1,
        "bandwidth_samples": 0,
        "content_peers": 1,
    }
    assert await tracker.get_available_peers("movie") == ["stays"]
    # Announced under its old id again, the peer starts afresh.
    await tracker.record_peer_online("gone")
    metrics = await tracker.get_peer_metrics("gone")
    assert metrics is not None and metrics.online and metrics.chunks_served == 0


async def test_a_forgotten_peer_is_counted_as_documented_while_its_mappings_tombstone_stays(
    solo: tuple[AvailabilityTracker, ManualClock],
) -> None:
    """Its ``peers`` row waits for the tombstone of its mapping (a week more): ``stats()`` counts
    it, ``list_peers`` and ``get_peer_metrics`` no longer show it (TrackerStats.peers_total; QA
    rounds 63 and 65: counting peers with statistics cost 4-20x more at every /metrics scrape)."""
    tracker, clock = solo
    await tracker.record_peer_online("gone")
    await tracker.record_content_available("c", "gone")
    clock.advance(15 * 86_400)
    await tracker.record_peer_online("here")
    await tracker.sweep()
    assert await tracker.get_peer_metrics("gone") is None
    assert [m.peer_id for m in await tracker.list_peers()] == ["here"]
    assert (await _rows(tracker))["peers"] == 2  # the tombstone's peer, still
    assert (await tracker.stats()).peers_total == 2


async def test_a_content_nothing_refers_to_is_forgotten(
    solo: tuple[AvailabilityTracker, ManualClock],
) -> None:
    tracker, clock = solo
    await tracker.record_peer_online("p")
    await tracker.record_content_available("movie", "p")
    await tracker.record_content_unavailable("movie", "p")
    clock.advance(tracker.config.tombstone_keep_s + 10)
    await tracker.record_peer_online("p")
    report = await tracker.sweep()
    assert report.pruned["contents"] == 1
    counts = await _rows(tracker)
    assert (counts["contents"], counts["content_peers"], counts["peers"]) == (0, 0, 1)


async def test_a_row_written_within_the_retention_stays(
    solo: tuple[AvailabilityTracker, ManualClock],
) -> None:
    """What decides is the origin's last write of the row (``updated_at``), not the last sighting:
    a failed upload report is no sighting, but the row it changed is in use."""
    tracker, clock = solo
    await tracker.record_peer_online("p")
    await _expire(tracker, clock)
    clock.advance(tracker.config.peer_retention_s - 100)
    await tracker.record_upload_failure("p")
    clock.advance(200)
    report = await tracker.sweep()
    assert report.pruned["peer_stats"] == 0
    metrics = await tracker.get_peer_metrics("p")
    assert metrics is not None and metrics.chunks_failed == 1


async def test_forgetting_runs_at_most_hourly(solo: tuple[AvailabilityTracker, ManualClock]) -> None:
    tracker, clock = solo
    await tracker.record_peer_online("p")
    await _expire(tracker, clock)  # the process's first pass forgets (nothing yet)
    clock.advance(tracker.config.peer_retention_s + 10)
    assert (await tracker.sweep()).pruned["peer_stats"] == 1  # due: more than an hour since
    await tracker.record_peer_online("q")
    clock.advance(FORGET_EVERY_S - 10)
    assert "peer_stats" not in (await tracker.sweep()).pruned  # within the hour: not due
    clock.advance(20)
    assert (await tracker.sweep()).pruned["peer_stats"] == 0  # due again; q is in use
    assert await tracker.get_peer_metrics("q") is not None


def test_the_retention_has_a_floor() -> None:
    with pytest.raises(ConfigError, match="peer_retention_s"):
        TrackerConfig(peer_retention_s=MIN_PEER_RETENTION_S - 1)
    config = TrackerConfig.from_env({"TRACKER_PEER_RETENTION_S": "86400"})
    assert config.peer_retention_s == 86_400.0
    # Never sooner than a departed peer's mappings go: they are dated by these rows' sightings.
    config = TrackerConfig(peer_retention_s=3_600, offline_mapping_retention_s=7_200, tombstone_ttl_s=3_600)
    assert config.forget_after_s == 7_200 + config.tombstone_keep_s + config.max_clock_skew_s
    assert TrackerConfig().forget_after_s == 14 * 86_400
    # A quiet write's time may lag its sighting by up to the resolution (QA round 29).
    quiet = replace(config, heartbeat_resolution_s=150)
    assert quiet.forget_after_s == config.forget_after_s + 150


# --- gossip: the same verdict everywhere ----------------------------------------------------------


@pytest.fixture
async def pair(db_url: str, tmp_path: Path) -> AsyncIterator[Pair]:
    async for opened in open_pair(db_url, tmp_path, T0):
        yield opened


async def test_a_peer_back_after_one_tracker_forgot_it_counts_the_same_on_both(pair: Pair) -> None:
    """x forgets its row of p, p comes back to x, and y, which had not swept yet, takes x's new row as
    it stands: with the counters' maximum, y kept the forgotten history and counted 5 served where x
    counted 1, for good."""
    x, y, clock = pair.x, pair.y, pair.clock
    await x.record_peer_online("p")
    for _ in range(5):
        await x.record_upload_success("p")
    await pair.gossip()
    assert (await y.get_peer_metrics("p")).chunks_served == 5  # type: ignore[union-attr]
    await _expire(x, clock)
    await pair.gossip()
    clock.advance(x.config.peer_retention_s + 10)
    assert (await x.sweep()).pruned["peer_stats"] == 1
    await x.record_peer_online("p")
    await x.record_upload_success("p")
    await pair.gossip()
    for tracker in (x, y):
        metrics = await tracker.get_peer_metrics("p")
        assert metrics is not None and (metrics.chunks_served, metrics.online) == (1, True)
    await y.sweep()  # and y's own pass finds nothing of x's to forget: the row is new
    assert (await y.get_peer_metrics("p")).chunks_served == 1  # type: ignore[union-attr]


async def test_a_forgotten_row_sent_again_goes_again_with_its_mapping(pair: Pair) -> None:
    """A neighbour that has not swept yet (a first contact, a snapshot) may send a forgotten row again,
    with its peer's mapping: both are taken, and the next pass takes them away, the mapping by what
    the row says. Left out of the merge, the row took with it the only date the mapping's departure
    could go by, and the mapping stayed for good (QA round 27)."""
    x, y, clock = pair.x, pair.y, pair.clock
    await y.record_peer_online("p")
    await y.record_download_speed("p", 2_000)
    await y.record_content_available("movie", "p")
    await _expire(y, clock)
    sent = await _origin_delta(y)
    clock.advance(x.config.forget_after_s + 10)
    await x.sweep()  # x's first pass: forgetting has run, and is due again in an hour

    async def merge(conn: Any) -> gq.MergeCounts:
        return await gq.merge(conn, x.config.dialect, x.node_key, [sent], 10, x.now())

    counts = await run_write(x.engine, merge, 3)
    assert (counts.peers, counts.mappings) == (1, 1)
    clock.advance(FORGET_EVERY_S)
    report = await x.sweep()
    assert (report.pruned["content_peers"], report.pruned["peer_stats"], report.pruned["peers"]) == (1, 1, 1)
    assert await _rows(x) == dict.fromkeys((t.name for t in TABLES), 0)


async def test_a_mapping_that_came_before_its_peers_row_comes_back_with_it(pair: Pair) -> None:
    """A new tracker's first sync may bring a long-lived peer's mapping (announced days ago) in one
    message and its row in a later one; a pass in between deleted the mapping for want of a row,
    and gossip never sent it again (QA round 27): now it is sent again."""
    x, y, clock = pair.x, pair.y, pair.clock
    await y.record_peer_online("p")
    await y.record_content_available("movie", "p")
    (announced,) = (await _origin_delta(y)).mappings  # stamped: the mapping's version
    for _ in range(int((x.config.offline_mapping_retention_s + x.config.tombstone_keep_s) // 250) + 2):
        clock.advance(250)
        await y.record_peer_online("p")  # online all along; the announcement is old
    # The first message: complete through the mapping's version, which the row has moved beyond.
    first = OriginDelta(origin=y.node_key, base=0, upto=announced.version, mappings=[announced])

    async def merge(conn: Any) -> gq.MergeCounts:
        return await gq.merge(conn, x.config.dialect, x.node_key, [first], 10, x.now())

    assert (await run_write(x.engine, merge, 3)).mappings == 1
    # The process's first pass: forgetting runs. A mapping without rows, as old as a departed peer's
    # would be, goes (QA round 30: or one that came after its rows were forgotten stayed for good),
    # and y is asked for its rows again from the mapping's version.
    await x.sweep()
    assert (await _rows(x))["content_peers"] == 0
    await pair.gossip()  # the rest of the sync: the row, and the mapping again
    assert await x.get_available_peers("movie") == ["p"]
    await x.sweep()
    assert await x.get_available_peers("movie") == ["p"]


async def test_a_tracker_gone_for_good_leaves_nothing_behind(pair: Pair) -> None:
    """y's mappings and rows go from x when y never comes back: the mappings by the departure their
    peer's rows date (the retention and the tombstones' time), then the rows by their own age, and
    then the peer and the content."""
    x, y, clock = pair.x, pair.y, pair.clock
    await y.record_peer_online("p")
    await y.record_download_speed("p", 2_000)
    await y.record_content_available("movie", "p")
    await _expire(y, clock)
    await pair.gossip()
    pair.net.isolated.add("http://y")
    clock.advance(x.config.offline_mapping_retention_s + x.config.tombstone_keep_s + 10)
    report = await x.sweep()
    # The mapping goes, and the content with it; the peer's row is younger than the retention.
    assert (report.pruned["content_peers"], report.pruned["contents"], report.pruned["peer_stats"]) == (
        1,
        1,
        0,
    )
    clock.advance(x.config.forget_after_s)
    report = await x.sweep()
    assert (report.pruned["peer_stats"], report.pruned["peers"]) == (1, 1)
    assert await _rows(x) == dict.fromkeys((t.name for t in TABLES), 0)


async def test_a_late_pass_does_not_make_a_forgotten_row_young(pair: Pair) -> None:
    """A tracker back after longer than the retention (or one that ran without its sweeper) closes the
    stale sessions of its first pass. Dated by the pass, the closing write made the row young again
    and gossip took it, old counters and all, back to every tracker that had forgotten it (QA round
    27); dated when the session timed out, the same pass forgets it."""
    x, y, clock = pair.x, pair.y, pair.clock
    await x.record_peer_online("p")
    for _ in range(5):
        await x.record_upload_success("p")
    await pair.gossip()
    clock.advance(x.config.forget_after_s + x.config.peer_timeout + 10)
    assert (await y.sweep()).pruned["peer_stats"] == 1  # y forgot x's row
    report = await x.sweep()  # x's first pass since: it closes the session, and forgets the row
    assert (report.peers_marked_offline, report.pruned["peer_stats"]) == (1, 1)
    await pair.gossip()
    for tracker in (x, y):
        assert await tracker.get_peer_metrics("p") is None


async def test_a_quiet_write_keeps_the_rows_time(db_url: str) -> None:
    """With ``heartbeat_resolution_s``, a late event keeps the row's gossip version, and its time must
    stay with it: moved alone, the origin forgot the row up to ``max_event_age_s`` later than its
    neighbours, which hold the time gossip carried (QA round 27)."""
    clock = ManualClock(T0)
    config = TrackerConfig(database_url=db_url, clock=clock, heartbeat_resolution_s=60)
    async with AvailabilityTracker(config) as tracker:
        await tracker.record_peer_online("p")
        clock.advance(3 * 86_400)
        await tracker.record_peer_online("p", at=T0 - 10)  # late: changes nothing gossip carries

        async def read(conn: Any) -> float:
            return float((await conn.execute(select(peer_stats.c.updated_at))).scalar_one())

        assert await run_read(tracker.engine, read) == T0


async def test_forgetting_more_keys_than_a_statement_takes(db_url: str) -> None:
    """A slice's keys go in bounded lists: with ``sweep_batch_size`` above 32,767, Postgres refused
    the statement, and every pass failed from then on (QA round 27)."""
    clock = ManualClock(T0)
    config = TrackerConfig(database_url=db_url, clock=clock, sweep_batch_size=40_000)
    async with AvailabilityTracker(config) as tracker:
        await tracker.record_batch([PeerOnline(f"p{i}") for i in range(33_000)])
        await _expire(tracker, clock)
        clock.advance(config.forget_after_s + 10)
        report = await tracker.sweep()
        assert (report.pruned["peer_stats"], report.pruned["peers"]) == (33_000, 33_000)


async def _origin_delta(tracker: AvailabilityTracker) -> OriginDelta:
    """Everything of ``tracker``'s own origin as gossip sends it to a new neighbour (stamped first)."""

    async def read(conn: Any) -> OriginDelta:
        await gq.stamp(conn, tracker.config.dialect, tracker.node_id, 1000, at=0)
        got = await gq.read_deltas(conn, {tracker.node_key: 0}, (), 1000, 10)
        return next(d for d in got.deltas if d.origin == tracker.node_key)

    return await run_write(tracker.engine, read, 3)


# --- Postgres: a key a writer holds is not deleted under it --------------------------------------


@pytest.mark.parametrize("engine_name", ["postgresql"])
async def test_a_peer_whose_key_a_writer_holds_is_left_for_the_next_pass(db_url: str) -> None:
    """A writer that has just upserted the key (the lock ON CONFLICT takes) is about to refer to it:
    the sweeper passes over it (``SKIP LOCKED``) instead of deleting it, and its rows, under it."""
    clock = ManualClock(T0)
    async with AvailabilityTracker(TrackerConfig(database_url=db_url, clock=clock)) as tracker:
        await tracker.record_peer_online("p")
        await _expire(tracker, clock)
        clock.advance(tracker.config.peer_retention_s + 10)
        await tracker.record_peer_online("other")
        dsn = db_url.replace("postgresql+asyncpg://", "postgresql://")
        holder = await asyncpg.connect(dsn)
        try:
            async with holder.transaction():
                await holder.execute("SELECT id FROM peers WHERE peer_key = 'p' FOR NO KEY UPDATE")
                report = await tracker.sweep()
            assert (report.pruned["peer_stats"], report.pruned["peers"]) == (1, 0)
        finally:
            await holder.close()
        clock.advance(FORGET_EVERY_S)
        await tracker.record_peer_online("other")
        assert (await tracker.sweep()).pruned["peers"] == 1
        async with tracker.engine.connect() as conn:
            keys = (await conn.execute(text("SELECT peer_key FROM peers"))).scalars().all()
        assert keys == ["other"]


def _state(version: int, served: int, updated_at: float, carried: bool) -> PeerState:
    return PeerState(
        peer="p",
        first_seen=T0,
        online=True,
        online_since=T0,
        last_seen=T0,
        uptime_s=0.0,
        served=served,
        failed=0,
        success_weight=0.0,
        failure_weight=0.0,
        evidence_at=None,
        updated_at=updated_at,
        version=version,
        samples=[(T0, 1000)] if carried else None,
        samples_version=1,
    )


@pytest.mark.parametrize("carried", [True, False], ids=["with samples", "without"])
async def test_a_row_its_origin_restarted_replaces_the_counters_instead_of_their_maximum(
    solo: tuple[AvailabilityTracker, ManualClock], carried: bool
) -> None:
    """Both merge paths: a newer row written more than ``MIN_PEER_RETENTION_S`` after the stored one
    may be its origin's new start (its counters stand); one written sooner takes the maximum, so a
    copy restored from an old backup lowers no counter."""
    tracker, clock = solo
    clock.advance(2 * MIN_PEER_RETENTION_S)

    async def merge(state: PeerState) -> None:
        delta = OriginDelta(origin="f" * 32, base=0, upto=state.version, samples_upto=1, peers=[state])

        async def work(conn: Any) -> gq.MergeCounts:
            return await gq.merge(conn, tracker.config.dialect, tracker.node_key, [delta], 10, tracker.now())

        assert (await run_write(tracker.engine, work, 3)).peers == 1

    async def served() -> int:
        metrics = await tracker.get_peer_metrics("p")
        assert metrics is not None
        return metrics.chunks_served

    await merge(_state(1, 10, T0, carried=True))
    await merge(_state(2, 3, T0 + 100, carried))
    assert await served() == 10
    await merge(_state(3, 1, T0 + 100 + MIN_PEER_RETENTION_S + 1, carried))
    assert await served() == 1


# --- QA round 28 ---------------------------------------------------------------------------------


async def test_a_mapping_announced_since_the_last_sighting_here_is_not_a_departed_peers(
    solo: tuple[AvailabilityTracker, ManualClock],
) -> None:
    """A peer last seen nine days ago by one origin comes back on another and announces; a catch-up in
    slices brings the new mapping before the new row. Judged by the old row alone the peer had
    departed, and the pass deleted the live mapping, which gossip never sent again (QA round 28)."""
    tracker, clock = solo
    await _old_row_then_new_mapping(tracker, clock, days=9)
    report = await tracker.sweep()
    assert report.pruned["content_peers"] == 0
    assert (await _rows(tracker))["content_peers"] == 1


@pytest.mark.parametrize("engine_name", ["postgresql"])
async def test_a_merge_whose_peer_was_forgotten_under_it_is_retried(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The merge reads known keys without locking them; the forget pass deleted one between that read
    and the row that refers to it, and the merge failed on the foreign key, unretried, so the whole
    exchange failed (QA round 28). A fresh transaction finds the key gone and inserts it again."""
    merge_module = importlib.import_module("tracker.queries.gossip.merge")  # the package exports merge()

    clock = ManualClock(T0)
    async with AvailabilityTracker(TrackerConfig(database_url=db_url, clock=clock)) as tracker:
        async with tracker.engine.begin() as conn:
            await conn.execute(text("INSERT INTO peers (peer_key, first_seen, draw) VALUES ('p', 0, 0)"))
        read, go = asyncio.Event(), asyncio.Event()
        real = merge_module._merge_peers

        async def paused(*args: Any, **kwargs: Any) -> Any:
            if not go.is_set():
                read.set()
                await go.wait()
            return await real(*args, **kwargs)

        monkeypatch.setattr(merge_module, "_merge_peers", paused)
        delta = OriginDelta(
            origin="c" * 32, base=0, upto=1, samples_upto=1, peers=[_state(1, 0, T0, carried=True)]
        )

        async def work(conn: Any) -> gq.MergeCounts:
            return await gq.merge(conn, "postgresql", tracker.node_key, [delta], 10, tracker.now())

        merging = asyncio.create_task(run_write(tracker.engine, work, 3))
        await read.wait()

        async def forget_keys(conn: Any) -> tuple[int, int | None]:
            return await forget.forget_unused_peers(conn, "postgresql", -1, 100)

        assert (await run_write(tracker.engine, forget_keys, 3))[0] == 1
        go.set()
        assert (await merging).peers == 1
        assert (await _rows(tracker))["peer_stats"] == 1


async def test_gossiping_without_a_sweeper_is_warned_about(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A tracker that gossips but never sweeps keeps its departed peers' mappings and old rows and
    sends them to every new neighbour (QA round 28): its agent says so, once; not when a sweeper
    runs, nor when the application sweeps on its own schedule (QA round 29)."""
    # Warned after 0.75 s unswept: with 0.3 s, a pass of the application's own on a loaded machine
    # (a CI run beside other work) took that long, and the agent warned while it ran.
    config = TrackerConfig(database_url=db_url, update_interval=0.25)
    for how, warned in (("none", 1), ("sweeper", 0), ("own schedule", 0)):
        caplog.clear()
        async with AvailabilityTracker(replace(config, run_sweeper=how == "sweeper")) as tracker:
            agent = GossipAgent(tracker, GossipConfig(keys=(KEY,)), transport=LocalNet())
            with caplog.at_level(logging.WARNING, logger="tracker"):
                running = asyncio.create_task(agent.run())
                for _ in range(40):
                    if how == "own schedule":
                        await tracker.sweep()
                    await asyncio.sleep(0.05)
                running.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await running
        lines = [r for r in caplog.records if getattr(r, "action", None) == "gossip_without_sweeper"]
        assert len(lines) == warned, (how, [r.getMessage() for r in lines])


async def test_a_mapping_whose_row_never_comes_goes_with_its_peer_in_the_end(
    solo: tuple[AvailabilityTracker, ManualClock],
) -> None:
    """The mapping announced since its peer's last sighting here stays while its own row may be on its
    way; if that row never comes (its tracker is gone), the peer's other rows wait for the mapping
    instead of going first: forgotten first, they left the mapping, its peer and its content with
    nothing to date them by, for good (QA round 29)."""
    tracker, clock = solo
    await _old_row_then_new_mapping(tracker, clock, days=9)
    for _ in range(30):
        clock.advance(86_400)
        await tracker.sweep()
    assert await _rows(tracker) == dict.fromkeys((t.name for t in TABLES), 0)


async def _old_row_then_new_mapping(tracker: AvailabilityTracker, clock: ManualClock, days: int) -> None:
    """Origin c's row of p, last seen now; ``days`` later, origin a's mapping of p, announced a minute
    ago, without a's row."""

    async def merge(delta: OriginDelta) -> None:
        async def work(conn: Any) -> gq.MergeCounts:
            return await gq.merge(conn, tracker.config.dialect, tracker.node_key, [delta], 10, tracker.now())

        await run_write(tracker.engine, work, 3)

    now = clock()
    await merge(
        OriginDelta(origin="c" * 32, base=0, upto=1, samples_upto=1, peers=[_state(1, 0, now, carried=True)])
    )
    clock.advance(days * 86_400)
    at = clock() - 60
    announced = MappingState(
        cid="movie", peer="p", available=True, since=at, last_confirmed=at, changed_at=at, version=1
    )
    await merge(OriginDelta(origin="a" * 32, base=0, upto=1, mappings=[announced]))


# --- QA round 30 ---------------------------------------------------------------------------------


async def test_a_mapping_that_came_after_its_peers_rows_were_forgotten_goes_and_is_asked_for_again(
    solo: tuple[AvailabilityTracker, ManualClock],
) -> None:
    """A neighbour that never sweeps, or a snapshot imported in parts, brings a departed peer's old
    mapping after the rows it would be judged by were forgotten here: nothing took it, nor its peer
    and content, ever (QA round 30). It goes once it is as old as a departed peer's mapping would be,
    and its origin is asked for its rows again from its version (one that only came before its row
    comes back with it)."""
    tracker, clock = solo
    origin = "a" * 32
    at = clock() - 60
    announced = MappingState(
        cid="movie", peer="p", available=True, since=at, last_confirmed=at, changed_at=at, version=7
    )

    async def merge(conn: Any) -> gq.MergeCounts:
        return await gq.merge(
            conn,
            tracker.config.dialect,
            tracker.node_key,
            [OriginDelta(origin=origin, base=0, upto=9, mappings=[announced])],
            10,
            tracker.now(),
        )

    await run_write(tracker.engine, merge, 3)
    assert (await tracker.sweep()).pruned["content_peers"] == 0  # young: it may be a live peer's
    clock.advance(tracker.config.offline_mapping_retention_s + tracker.config.tombstone_keep_s)
    clock.advance(FORGET_EVERY_S)
    report = await tracker.sweep()
    assert (report.pruned["content_peers"], report.pruned["peers"], report.pruned["contents"]) == (1, 1, 1)
    assert await _rows(tracker) == dict.fromkeys((t.name for t in TABLES), 0)
    await tracker.sweep()  # the next pass asks
    async with tracker.engine.connect() as conn:
        clock_of_origin = (
            await conn.execute(text("SELECT clock FROM tracker_nodes WHERE node_key = :k"), {"k": origin})
        ).scalar_one()
    assert clock_of_origin == 6

"""Mappings of departed peers are removed as gossiped removals, so every tracker ends the same.

Deleted by each tracker's sweeper at its own moment, they diverged for good when the peer was heard
from again between two trackers' sweeps (QA round 24: 35 of 3,142 contents listed different holders
on two trackers of a quiet mesh, for as long as it ran).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from gossip_helpers import KEY, LocalNet, Pair, open_pair
from sqlalchemy import text

from tracker import AvailabilityTracker, ContentAvailable, PeerOnline, TrackerConfig
from tracker.db import run_read, run_write
from tracker.gossip import agent as agent_module
from tracker.gossip.agent import GossipAgent
from tracker.gossip.config import GossipConfig
from tracker.gossip.importer import import_snapshot
from tracker.queries import gossip as gq
from tracker.queries.sweep import AFTER_SIGHTING_S
from tracker.state_export import write_state_snapshot
from tracker.sweeper import ASKED_HOLD_S
from tracker.testing import ManualClock


@pytest.fixture
async def pair(db_url: str, tmp_path: Path) -> AsyncIterator[Pair]:
    async for opened in open_pair(db_url, tmp_path):
        yield opened


async def test_a_peer_back_between_two_trackers_sweeps_has_the_same_mappings_on_both(pair: Pair) -> None:
    x, y, clock = pair.x, pair.y, pair.clock
    await x.record_peer_online("p")
    await x.record_content_available("movie", "p")
    await x.record_content_available("song", "p")
    await pair.gossip()
    assert await y.get_available_peers("movie") == ["p"]
    clock.advance(x.config.offline_mapping_retention_s + 10)
    await y.record_peer_online("p")  # back, heard by y only; it announces nothing again
    swept_x = await x.sweep()  # before it heard: for x, p has departed, and the mappings are x's
    swept_y = await y.sweep()
    assert (swept_x.departed_mappings_removed, swept_y.departed_mappings_removed) == (2, 0)
    await pair.gossip()
    for tracker in (x, y):
        assert await tracker.get_available_peers("movie") == []
        assert await tracker.get_available_peers("song") == []
        metrics = await tracker.get_peer_metrics("p")
        assert metrics is not None and metrics.online
    # Announced again, the mapping is back everywhere: the removal is older.
    clock.advance(1)
    await y.record_content_available("movie", "p")
    await pair.gossip()
    for tracker in (x, y):
        assert await tracker.get_available_peers("movie") == ["p"]


async def test_a_tracker_cut_off_longer_than_the_retention_removes_none_of_the_others_mappings(
    pair: Pair,
) -> None:
    """Only the tracker a mapping came from removes it: x, cut off for more than the retention, saw
    no sighting of y's peer, and would have removed y's mapping everywhere once back."""
    x, y, clock = pair.x, pair.y, pair.clock
    await y.record_peer_online("p")
    await y.record_content_available("movie", "p")
    await pair.gossip()
    pair.net.isolated.add("http://x")
    for _ in range(int(x.config.offline_mapping_retention_s // 200) + 2):  # p keeps talking to y
        clock.advance(200)
        await y.record_peer_online("p")
    assert (await x.sweep()).departed_mappings_removed == 0  # for x, p has departed: not x's mapping
    pair.net.isolated.clear()
    clock.advance(300)  # beyond the back-off of the exchanges that failed
    await y.record_peer_online("p")
    await pair.gossip()
    for tracker in (x, y):
        assert await tracker.get_available_peers("movie") == ["p"]


async def test_a_mapping_its_tracker_never_removed_goes_after_the_removals_would_have(pair: Pair) -> None:
    """The tracker a mapping came from may be gone for good: past the removal's retention and its
    tombstone's, the mapping is deleted wherever it is, or it would stay forever."""
    x, y, clock = pair.x, pair.y, pair.clock
    await y.record_peer_online("p")
    await y.record_content_available("movie", "p")
    await pair.gossip()
    pair.net.isolated.add("http://y")  # y is never heard from again
    clock.advance(x.config.offline_mapping_retention_s + 10)
    report = await x.sweep()
    assert (report.departed_mappings_removed, report.pruned["content_peers"]) == (0, 0)
    clock.advance(x.config.tombstone_keep_s)
    report = await x.sweep()
    assert (report.departed_mappings_removed, report.pruned["content_peers"]) == (0, 1)


async def test_a_live_mapping_deleted_while_cut_off_comes_back_when_the_link_heals(pair: Pair) -> None:
    """y, cut off from x for longer than the removals' retention and their tombstones' time (a
    partition, a long downtime), held only p's old row and deleted x's mapping of p, which never
    left x. y's clock of x still covered the mapping, so gossip never sent it again, and y listed
    no holder for good (QA round 30): the deletion asks x's rows again from the mapping's version."""
    x, y, clock = pair.x, pair.y, pair.clock
    await x.record_peer_online("p")
    await x.record_content_available("movie", "p")
    await pair.gossip()
    pair.net.isolated.add("http://y")
    clock.advance(y.config.offline_mapping_retention_s + y.config.tombstone_keep_s + 10)
    await x.record_peer_online("p")  # p is on x, as it was all along
    report = await y.sweep()
    assert report.pruned["content_peers"] == 1  # y goes by what it holds: p unseen for 8 days
    assert await y.get_available_peers("movie") == []
    pair.net.isolated.clear()
    await pair.gossip()
    for tracker in (x, y):
        assert await tracker.get_available_peers("movie") == ["p"]
    assert (await y.sweep()).pruned["content_peers"] == 0  # p's new row came too: not departed


async def _mapping_rows(tracker: AvailabilityTracker) -> int:
    async with tracker.engine.connect() as conn:
        return int((await conn.execute(text("SELECT COUNT(*) FROM content_peers"))).scalar_one())


async def test_a_live_mapping_deleted_in_two_partitions_comes_back_after_each(pair: Pair) -> None:
    """A mapping asked for once and deleted again with the same version was not asked for again, so
    after a second long partition it never came back, restart or not (QA round 33); every deletion
    asks. A catch-up in slices (the mapping back before its peer's new row, and a pass between) and
    a relay that still held the old row deleted it twice in the same way."""
    x, y, clock = pair.x, pair.y, pair.clock
    await x.record_peer_online("p")
    await x.record_content_available("movie", "p")
    await pair.gossip()
    for _ in range(2):
        pair.net.isolated.add("http://y")
        clock.advance(y.config.offline_mapping_retention_s + y.config.tombstone_keep_s + 10)
        await x.record_peer_online("p")  # online at x all along: heartbeats, no new announcement
        assert (await y.sweep()).pruned["content_peers"] == 1
        pair.net.isolated.clear()
        clock.advance(300)
        await x.record_peer_online("p")
        await pair.gossip()
        assert await y.get_available_peers("movie") == ["p"]


async def test_a_stale_mapping_a_neighbour_that_never_sweeps_keeps_sending_is_asked_for_hourly(
    pair: Pair,
) -> None:
    """x never sweeps, so it keeps the mapping of a peer gone for good: a pass here deletes it and
    asks x's rows again, and x sends it back with all its rows since. Asked at every pass, that was
    a full resend every 30 s; the origin's mappings are left alone for ``ASKED_HOLD_S`` after an ask
    (which is also what lets a catch-up longer than one exchange finish). Its peer stays offline,
    so no download is sent to it."""
    x, y, clock = pair.x, pair.y, pair.clock
    await x.record_peer_online("p")
    await x.record_content_available("movie", "p")
    await pair.gossip()
    clock.advance(y.config.offline_mapping_retention_s + y.config.tombstone_keep_s + 10)
    for _ in range(2):
        assert (await y.sweep()).pruned["content_peers"] == 1  # deleted, and x asked
        await pair.gossip()
        assert await _mapping_rows(y) == 1  # sent back: x still holds it
        for _ in range(3):  # within the hour: left alone
            clock.advance(ASKED_HOLD_S / 4)
            assert (await y.sweep()).pruned["content_peers"] == 0
            assert await y.get_available_peers("movie") == []
            assert await y.select_best_peers("movie", 3) == []
        clock.advance(ASKED_HOLD_S / 4)


async def test_a_live_mapping_deleted_after_another_of_its_origin_still_comes_back(pair: Pair) -> None:
    """Two passes apart, y deleted two of x's live mappings, the second of a lower version than the
    first; an ask for it put off (an hour per origin) lived only in the process, and a restart lost
    it: the mapping never came back (QA round 32). Every deletion asks at once, and an origin just
    asked has its mappings left alone meanwhile."""
    x, y, clock = pair.x, pair.y, pair.clock
    await x.record_peer_online("p1")
    await x.record_content_available("movie1", "p1")  # the lower version
    await pair.gossip()
    clock.advance(100)
    await x.record_peer_online("p0")
    await x.record_content_available("movie0", "p0")
    await pair.gossip()
    clock.advance(100)
    await x.record_peer_online("p1")  # y last hears of p1 after p0
    await pair.gossip()
    pair.net.isolated.add("http://y")
    clock.advance(y.config.offline_mapping_retention_s + y.config.tombstone_keep_s - 50)
    for peer in ("p0", "p1"):
        await x.record_peer_online(peer)  # live on x all along
    assert (await y.sweep()).pruned["content_peers"] == 1  # movie0's
    clock.advance(120)
    for peer in ("p0", "p1"):
        await x.record_peer_online(peer)
    assert (await y.sweep()).pruned["content_peers"] == 0  # movie1's waits: x was just asked
    await y.close()
    restarted = await AvailabilityTracker.open(y.config)  # a new process: nothing remembered
    try:
        pair.net.agents["http://y"] = GossipAgent(
            restarted, GossipConfig(keys=(KEY,)), transport=pair.net.transport_for("http://y")
        )
        pair.net.isolated.clear()
        await pair.gossip()
        for cid, peer in (("movie0", "p0"), ("movie1", "p1")):
            assert await restarted.get_available_peers(cid) == [peer]
    finally:
        await restarted.close()


@pytest.mark.parametrize("back_after", ["the retention", "just before the retention ends", "half a second"])
async def test_a_removal_is_dated_at_the_last_sighting_not_at_the_sweep(pair: Pair, back_after: str) -> None:
    """Dated by the sweeping tracker's clock, a removal made late (a sweeper held back, a tracker
    cut off, or a clock running ahead) beat the announcement the peer made when it came back
    elsewhere meanwhile (QA round 26). Dated at the end of the retention, it still beat one made
    by a peer back before the retention ended, while x had not heard yet (QA round 30). Dated just
    after the last sighting here, it loses to any announcement made after the peer's return; a
    second after it, it beat a failover's announcement half a second later elsewhere (QA round 36)."""
    x, y, clock = pair.x, pair.y, pair.clock
    retention = x.config.offline_mapping_retention_s
    await x.record_peer_online("p")
    await x.record_content_available("movie", "p")
    await pair.gossip()
    last_seen = clock.now
    pair.net.isolated.add("http://x")
    advance = {"the retention": retention + 10, "just before the retention ends": retention - 30}
    clock.advance(advance.get(back_after, 0.5))
    await y.record_peer_online("p")  # back, on y: it announces again there
    await y.record_content_available("movie", "p")
    clock.advance(max(500.0, last_seen + retention + 500 - clock.now))  # x sweeps late, not having heard
    assert (await x.sweep()).departed_mappings_removed == 1
    assert await _tombstones(x) == [
        (last_seen + AFTER_SIGHTING_S, clock.now)
    ]  # by the sighting; kept from now
    pair.net.isolated.clear()
    clock.advance(300)
    await y.record_peer_online("p")
    await pair.gossip()
    for tracker in (x, y):
        assert await tracker.get_available_peers("movie") == ["p"]


async def test_a_departed_peers_removal_beats_its_last_announcement_without_versions(
    pair: Pair, tmp_path: Path
) -> None:
    """The peer's last act was an announcement: dated at that very sighting, the removal beat it only
    by its newer version, and a snapshot (its rows carry none) left the mapping available on the
    tracker it caught up (QA round 34). Dated a second after, it wins by time."""
    x, y, clock = pair.x, pair.y, pair.clock
    await x.record_batch([PeerOnline("p"), ContentAvailable("movie", "p")])
    await pair.gossip()
    pair.net.isolated.add("http://y")  # y is cut off; it is caught up from a snapshot
    clock.advance(x.config.offline_mapping_retention_s + 10)
    assert (await x.sweep()).departed_mappings_removed == 1
    snapshot = await write_state_snapshot(x, tmp_path / "snapshots", clock.now)
    assert (await import_snapshot(y, snapshot)).mappings_applied == 1
    assert await _available(y) == [False]


async def test_back_from_a_long_downtime_a_tracker_removes_its_departed_mappings_not_deletes_them(
    pair: Pair,
) -> None:
    """Down for longer than the retention and ``tombstone_keep_s``, x swept before its first
    exchange, and the deletion of stale mappings (any origin's) took x's own before they became
    removals: y kept them for good, and x never got them back (a tracker ignores rows of its own
    origin) (QA round 36). They become removals first, which travel."""
    x, y, clock = pair.x, pair.y, pair.clock
    await x.record_peer_online("p")
    await x.record_content_available("movie", "p")
    await pair.gossip()
    clock.advance(x.config.offline_mapping_retention_s + x.config.tombstone_keep_s + 10)
    assert (await x.sweep()).departed_mappings_removed == 1
    await pair.gossip()
    assert [await _available(t) for t in (x, y)] == [[False], [False]]


async def _tombstones(tracker: AvailabilityTracker) -> list[tuple[float, float]]:
    """Each removal's date and when this tracker took it."""
    async with tracker.engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT changed_at, removed_at FROM content_peers WHERE NOT available")
        )
        return [(float(changed_at), float(removed_at)) for changed_at, removed_at in rows]


async def test_a_snapshot_from_before_a_removal_does_not_bring_the_mapping_back(
    pair: Pair, tmp_path: Path
) -> None:
    """A removal dated a retention before it is made, pruned by its date, was gone within the time a
    snapshot taken before it may still be imported (``tombstone_keep_s``), and the snapshot's
    announcement brought the mapping back for good (QA round 32). It is kept from when each tracker
    took it."""
    x, y, clock = pair.x, pair.y, pair.clock
    retention, keep = x.config.offline_mapping_retention_s, x.config.tombstone_keep_s
    await x.record_peer_online("p")
    await x.record_content_available("movie", "p")
    await pair.gossip()
    clock.advance(retention - 100)
    snapshot = await write_state_snapshot(y, tmp_path / "snapshots", clock.now)  # the mapping is there
    clock.advance(110)
    assert (await x.sweep()).departed_mappings_removed == 1
    await pair.gossip()
    made = clock.now
    assert await _tombstones(y) == [(made - retention - 10 + AFTER_SIGHTING_S, made)]
    clock.advance(keep - 160)  # the snapshot is still young enough to import; the removal's date is not
    for tracker in (x, y):
        assert (await tracker.sweep()).pruned["content_peers"] == 0
    await import_snapshot(y, snapshot)
    assert await _available(y) == [False]
    clock.advance(200)  # past keep since the removal was made: it goes
    for tracker in (x, y):
        assert (await tracker.sweep()).pruned["content_peers"] == 1


async def test_a_late_removal_is_kept_from_when_it_came_not_from_its_date(pair: Pair, tmp_path: Path) -> None:
    """A removal event may be days late (up to ``max_event_age_s``): pruned by its date it went at
    the next pass on every tracker, and a snapshot taken before it came brought the mapping back."""
    x, y, clock = pair.x, pair.y, pair.clock
    keep, day = x.config.tombstone_keep_s, 86_400.0
    await x.record_peer_online("p")
    await x.record_content_available("movie", "p")
    await pair.gossip()
    dated = clock.now + 10
    clock.advance(5 * day)
    await x.record_peer_online("p")
    snapshot = await write_state_snapshot(y, tmp_path / "snapshots", clock.now)
    clock.advance(day)
    await x.record_content_unavailable("movie", "p", at=dated)  # a day-old event of that first minute
    await pair.gossip()
    took = clock.now
    for tracker in (x, y):
        assert await _tombstones(tracker) == [(dated, took)]
    clock.advance(2 * day)  # the removal's date is older than keep; it came only two days ago
    await x.record_peer_online("p")
    await pair.gossip()
    for tracker in (x, y):
        assert (await tracker.sweep()).pruned["content_peers"] == 0
    await import_snapshot(y, snapshot)
    assert await _available(y) == [False]
    assert await y.get_available_peers("movie") == []
    clock.advance(took + keep + 1 - clock.now)
    await x.record_peer_online("p")
    for tracker in (x, y):
        assert (await tracker.sweep()).pruned["content_peers"] == 1


async def _available(tracker: AvailabilityTracker) -> list[bool]:
    async with tracker.engine.connect() as conn:
        return [bool(a) for a in (await conn.execute(text("SELECT available FROM content_peers"))).scalars()]


async def test_a_live_mapping_comes_back_through_a_catch_up_longer_than_an_exchange(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a long partition the origin's rows come again in slices, oldest versions first: the
    mapping (announced long ago) before its peer's new row (heartbeats make it the newest). A pass
    between two exchanges deleted the mapping again and started the catch-up over, at every pass,
    so it never ended (QA round 33)."""
    x, y, clock = pair.x, pair.y, pair.clock
    monkeypatch.setattr(agent_module, "_MAX_FOLLOW_UPS", 1)  # an exchange carries one message
    small = GossipConfig(keys=(KEY,), max_rows=5, stamp_chunk=2, message_burst=10_000)
    for name, tracker in (("http://x", x), ("http://y", y)):
        pair.net.agents[name] = GossipAgent(tracker, small, transport=pair.net.transport_for(name))
    others = [f"o{i}" for i in range(30)]
    for peer in [*others, "p"]:
        await x.record_peer_online(peer)
    await x.record_content_available("movie", "p")
    for _ in range(20):
        await pair.gossip()
    assert await y.get_available_peers("movie") == ["p"]
    pair.net.isolated.add("http://y")
    clock.advance(y.config.offline_mapping_retention_s + y.config.tombstone_keep_s + 10)
    for peer in [*others, "p"]:
        await x.record_peer_online(peer)  # all live on x all along
    assert (await y.sweep()).pruned["content_peers"] == 1
    pair.net.isolated.clear()
    for _ in range(15):  # an exchange, then a pass, as the gossip loop and the sweeper take turns
        await pair.net.agents["http://y"].exchange("http://x")
        clock.advance(30)
        await x.record_peer_online("p")
        await y.sweep()
    assert await y.get_available_peers("movie") == ["p"]


async def test_a_tracker_that_first_syncs_from_one_that_deleted_a_live_mapping_still_gets_it(
    db_url: str, tmp_path: Path
) -> None:
    """a, cut off from o past the retention and the tombstones' time while p stayed on o, deleted
    o's live mapping of p. A new tracker n then took o's rows from a first. Had a deleted the row
    without asking, its clock of o still claimed the row, n was sent o's rows as complete without
    it and never asked (QA round 38: so lost a design that asked only once the peer was seen
    again): a's ask at the deletion keeps its claim below the row, and n gets it from o once o is
    back."""
    clock = ManualClock(1_800_000_000.0)
    hour = 3_600.0
    urls = {"a": f"sqlite+aiosqlite:///{tmp_path / 'a.db'}", "o": f"sqlite+aiosqlite:///{tmp_path / 'o.db'}"}
    urls["n"] = db_url
    net = LocalNet()
    opened: dict[str, AvailabilityTracker] = {}

    async def join(name: str) -> AvailabilityTracker:
        config = TrackerConfig(
            database_url=urls[name],
            clock=clock,
            offline_mapping_retention_s=hour,
            tombstone_ttl_s=hour,
            max_event_age_s=hour,
            outcome_retention_s=hour,
            peer_retention_s=2 * hour,
        )
        opened[name] = tracker = await AvailabilityTracker.open(config)
        url = f"http://{name}"
        net.agents[url] = GossipAgent(tracker, GossipConfig(keys=(KEY,)), transport=net.transport_for(url))
        return tracker

    async def exchange(a: str, b: str) -> None:
        await net.agents[f"http://{a}"].exchange(f"http://{b}")

    try:
        a, o = await join("a"), await join("o")
        await o.record_peer_online("p")
        await o.record_content_available("movie", "p")
        await exchange("a", "o")
        assert await a.get_available_peers("movie") == ["p"]
        net.isolated.add("http://o")
        end = clock() + 2 * hour + 1_200
        while clock() < end:  # p on o all along; both sweep
            clock.advance(600)
            await o.record_peer_online("p")
            for tracker in (a, o):
                await tracker.sweep()
        assert await a.get_available_peers("movie") == []  # deleted: p unseen here for that long
        n = await join("n")
        for _ in range(2):
            await exchange("n", "a")  # n's first contact is a
        net.isolated.clear()
        for _ in range(5):
            clock.advance(60)
            await o.record_peer_online("p")
            for x, y in (("n", "o"), ("a", "o"), ("n", "a"), ("a", "n"), ("o", "n")):
                await exchange(x, y)
            for tracker in (a, n, o):
                await tracker.sweep()
        for tracker in (o, a, n):
            assert await tracker.get_available_peers("movie") == ["p"]
    finally:
        for tracker in opened.values():
            await tracker.close()


async def test_a_tracker_claims_an_origins_rows_no_further_than_its_clock(pair: Pair) -> None:
    """x asked y's rows again (its clock of y lowered below a mapping it deleted) while it still held
    y's newer rows. Its delta for y then claimed completeness up to the first of those, past its own
    clock (a branch meant for a version too big for the budget took them for one): a tracker that
    synced y from x was told it held the deleted mapping's version, and never got the mapping (QA
    round 38's stale-tombstone case lost it on two trackers). Rows above the clock are not sent."""
    x, y, clock = pair.x, pair.y, pair.clock
    await y.record_peer_online("p")
    await y.record_content_available("movie", "p")
    await pair.gossip()
    clock.advance(60)
    await y.record_download_speed("p", 1_000)  # p's row moves on; the mapping keeps its version
    await pair.gossip()

    async def lower(conn: Any) -> int:  # what the sweeper's deletion of a departed peer's mapping does
        version = (await conn.execute(text("DELETE FROM content_peers RETURNING version"))).scalar_one()
        await conn.execute(
            text("UPDATE tracker_nodes SET clock = :c WHERE node_key = :k"),
            {"c": version - 1, "k": y.node_key},
        )
        return int(version) - 1

    lowered = await run_write(x.engine, lower, 3)

    async def read(conn: Any) -> Any:
        return await gq.read_deltas(conn, {}, (), 100, 10)

    (delta,) = [d for d in (await run_read(x.engine, read)).deltas if d.origin == y.node_key]
    assert delta.upto <= lowered
    assert all(row.version <= lowered for row in (*delta.peers, *delta.mappings))

"""One batch is its events applied one at a time, in order, whatever they repeat.

On Postgres the write path runs one statement per table for many events (``compiled.Rows``), and a peer's
or a mapping's later events go in later statements of the same batch; on SQLite each event is a row
of an executemany. Either way a batch must leave exactly the rows its events leave when recorded one
call each: the same presence sessions, counters, decayed evidence, speeds, samples, outcomes and
mappings, to the last bit.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from tracker import AvailabilityTracker, compiled
from tracker.events import (
    ContentAvailable,
    ContentUnavailable,
    Event,
    PeerOffline,
    PeerOnline,
    SpeedSample,
    UploadOutcome,
)
from tracker.queries._sql import PEER_STATE_COLUMNS
from tracker.schema import bandwidth_samples, content_peers, contents, peer_stats, peers, upload_outcomes
from tracker.testing import ManualClock

T0 = (
    1.8e9 - 86_400.0
)  # a day before the clock (within max_event_age_s): these runs compare rows, not what is online now
PEERS = ("p1", "p2", "p3")
CIDS = ("c1", "c2")

# Times on a coarse grid so that ties (equal ``at`` for one peer or one mapping) are common.
times = st.integers(0, 40).map(lambda step: T0 + 10.0 * step)
peer = st.sampled_from(PEERS)
cid = st.sampled_from(CIDS)
events = st.lists(
    st.one_of(
        st.builds(PeerOnline, peer, at=times),
        st.builds(PeerOffline, peer, at=times),
        st.builds(SpeedSample, peer, st.integers(0, 10**9), at=times),
        st.builds(UploadOutcome, peer, st.booleans(), at=times, cid=st.none() | cid),
        st.builds(ContentAvailable, cid, peer, at=times),
        st.builds(ContentUnavailable, cid, peer, at=times),
    ),
    min_size=1,
    max_size=40,
)


def _renamed(event: Event, prefix: str) -> Event:
    """The same event for the peer (and content) of another namespace, so both runs share one database."""
    fields: dict[str, Any] = {name: getattr(event, name) for name in event.__dataclass_fields__}
    fields["peer_id"] = prefix + event.peer_id
    if fields.get("cid") is not None:
        fields["cid"] = prefix + fields["cid"]
    return type(event)(**fields)


async def _state(tracker: AvailabilityTracker, prefix: str) -> dict[str, Any]:
    """Every row the events of one namespace left, keyed without the prefix."""

    def strip(key: str | None) -> str | None:
        return None if key is None else key.removeprefix(prefix)

    s, cp, o, b = peer_stats.c, content_peers.c, upload_outcomes.c, bandwidth_samples.c
    mine = peers.c.peer_key.startswith(prefix)
    async with tracker.engine.connect() as conn:
        stats = (
            await conn.execute(
                select(*PEER_STATE_COLUMNS, s.speed_bps, s.samples_version.is_(None))
                .join(peers, peers.c.id == s.peer_id)
                .where(mine)
            )
        ).all()
        mappings = (
            await conn.execute(
                select(
                    contents.c.content_key,
                    contents.c.first_seen,
                    peers.c.peer_key,
                    cp.available,
                    cp.since,
                    cp.last_confirmed,
                    cp.changed_at,
                )
                .join(contents, contents.c.id == cp.content_id)
                .join(peers, peers.c.id == cp.peer_id)
                .where(mine)
            )
        ).all()
        outcomes = (
            await conn.execute(
                select(peers.c.peer_key, o.at, o.success, contents.c.content_key)
                .join(peers, peers.c.id == o.peer_id)
                .outerjoin(contents, contents.c.id == o.content_id)
                .where(mine)
            )
        ).all()
        # Per peer in id order: the order the rolling speed breaks ties of equal ``at`` by.
        samples = (
            await conn.execute(
                select(peers.c.peer_key, b.at, b.bytes_per_sec)
                .join(peers, peers.c.id == b.peer_id)
                .where(mine)
                .order_by(peers.c.peer_key, b.id)
            )
        ).all()
    return {
        "stats": sorted((strip(r[0]), *r[1:]) for r in stats),
        "mappings": sorted((strip(r[0]), r[1], strip(r[2]), *r[3:]) for r in mappings),
        # Two outcomes of a peer at the same time may differ only by a content, one of them none.
        "outcomes": sorted(
            ((strip(r[0]), r[1], r[2], strip(r[3])) for r in outcomes),
            key=lambda r: (r[:3], r[3] is not None, r[3] or ""),
        ),
        "samples": [(strip(r[0]), *r[1:]) for r in samples],
    }


# On Postgres a keyed upsert runs its rounds as statements over arrays, and later rounds smaller than
# ``_SMALL_ROUND`` as one executemany of single rows: 1 takes the first way for every round, 1000 the
# second for every round but the first (this stream's rounds hold at most three peers). Arrays go in
# statements of at most ``ARRAY_ROWS`` rows: 2 splits nearly every round.
@pytest.mark.parametrize(
    ("small_round", "array_rows"),
    [(1, compiled.ARRAY_ROWS), (1000, compiled.ARRAY_ROWS), (1, 2)],
    ids=["arrays", "executemany", "arrays-in-chunks"],
)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stream=events)
async def test_a_batch_leaves_the_rows_its_events_leave_one_call_each(
    tracker: AvailabilityTracker,
    stream: list[Event],
    small_round: int,
    array_rows: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(compiled, "_SMALL_ROUND", small_round)
    monkeypatch.setattr(compiled, "ARRAY_ROWS", array_rows)
    run = f"{id(stream):x}-{small_round}-{array_rows}-"  # examples share the database: own keys each
    await tracker.record_batch([_renamed(e, run + "batch-") for e in stream])
    for event in stream:
        await tracker.record_batch([_renamed(event, run + "single-")])

    batch, single = await _state(tracker, run + "batch-"), await _state(tracker, run + "single-")
    assert batch["stats"], "the stream left no stats rows"
    assert batch == single


async def test_many_events_of_one_peer_and_one_mapping_in_one_batch(
    tracker: AvailabilityTracker, clock: ManualClock
) -> None:
    """A batch where one peer and one mapping repeat far more often than the rest (on Postgres: many
    successive statements for a few keys) gives the counts and last state of its events."""
    stream: list[Event] = []
    for i in range(200):
        at = clock.now - 199 + i
        stream.append(UploadOutcome("busy", i % 4 != 0, at=at, cid="hot"))
        stream.append((ContentAvailable if i % 2 else ContentUnavailable)("hot", "busy", at=at))
        if i % 50 == 0:
            stream.append(PeerOnline(f"quiet-{i}", at=at))
    await tracker.record_batch(stream)

    metrics = await tracker.get_peer_metrics("busy")
    assert metrics is not None
    assert (metrics.chunks_served, metrics.chunks_failed) == (150, 50)
    assert await tracker.get_available_peers("hot") == ["busy"]  # the last event (i = 199) announced it
    for i in range(0, 200, 50):
        assert await tracker.get_peer_metrics(f"quiet-{i}") is not None

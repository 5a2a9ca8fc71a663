"""The hot statements use indexes: none scans content_peers, bandwidth_samples or peer_stats in full.

A realistically filled database (2,000 peers, 500 contents held by 20 peers each, 10 bandwidth samples
per peer, ANALYZEd so the planners see real sizes); the SQL is captured while the public methods run,
then explained with the same parameters. Run with ``pytest -s`` to see the plans.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from tracker import AvailabilityTracker
from tracker.db import run_read, run_write
from tracker.events import ContentAvailable, ContentUnavailable, Event, PeerOnline, SpeedSample, UploadOutcome
from tracker.queries import gossip as q
from tracker.queries.sweep import prune_tombstones

PEERS, CONTENTS, HOLDERS_PER_CONTENT, SAMPLES_PER_PEER = 2_000, 500, 20, 10
# peer_leases is not guarded: this swarm has none, and a planner rightly scans an empty table.
GUARDED_TABLES = ("content_peers", "bandwidth_samples", "peer_stats")
CID, PEER = "cid-0123", "peer-0042"  # a content with 20 holders; a peer holding 5 contents
# A typical ingest batch: speed samples from the few peers one download used.
SAMPLED_PEERS = [f"peer-{i:04d}" for i in range(0, PEERS, PEERS // 20)]

Captured = tuple[str, Any]


def swarm(now: float) -> list[Event]:
    """Every peer online with samples and a few outcomes; each content held by 20 peers spread over the
    swarm, each peer holding 5 contents."""
    events: list[Event] = []
    for p in range(PEERS):
        peer = f"peer-{p:04d}"
        events.append(PeerOnline(peer, at=now - 600))
        events += [
            SpeedSample(peer, 1_000_000 + 997 * p + 10_007 * s, at=now - 60 + s)
            for s in range(SAMPLES_PER_PEER)
        ]
        events += [UploadOutcome(peer, success=(p + k) % 7 != 0, at=now - 300 + k) for k in range(p % 4)]
    spread = PEERS // HOLDERS_PER_CONTENT
    for c in range(CONTENTS):
        events += [
            ContentAvailable(f"cid-{c:04d}", f"peer-{(c + h * spread) % PEERS:04d}", at=now - 500)
            for h in range(HOLDERS_PER_CONTENT)
        ]
    return events


@pytest.fixture
async def swarm_tracker(tracker: AvailabilityTracker, clock: Callable[[], float]) -> AvailabilityTracker:
    await tracker.record_batch(swarm(clock()))
    async with tracker.engine.begin() as conn:
        await conn.exec_driver_sql("ANALYZE")
    return tracker


@contextmanager
def captured_statements(tracker: AvailabilityTracker) -> Iterator[list[Captured]]:
    """Every statement the tracker sends while the block runs, as the driver receives it (an
    executemany with its first parameter row: the plan is the same for every row): through the
    engine, and through the SQLite lanes where there are."""
    statements: list[Captured] = []

    def observe(statement: str, parameters: Any, executemany: bool) -> None:
        statements.append((statement, parameters[0] if executemany else parameters))

    def record(_conn: Any, _cur: Any, statement: str, parameters: Any, _ctx: Any, executemany: bool) -> None:
        observe(statement, parameters, executemany)

    engine, lanes = tracker.engine, tracker.sqlite_lanes
    event.listen(engine.sync_engine, "before_cursor_execute", record)
    if lanes is not None:
        lanes.observers.append(observe)
    try:
        yield statements
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", record)
        if lanes is not None:
            lanes.observers.remove(observe)


def the_statement(statements: list[Captured], starts_with: str) -> Captured:
    matching = [s for s in statements if s[0].lstrip().upper().startswith(starts_with)]
    assert len(matching) == 1, f"expected one {starts_with} statement, got {[s[0] for s in statements]}"
    return matching[0]


async def sqlite_plan(
    engine: AsyncEngine, statement: Captured, guarded: tuple[str, ...]
) -> tuple[str, list[str]]:
    """EXPLAIN QUERY PLAN as an indented tree, and its lines that scan a guarded table in full."""
    sql, parameters = statement
    async with engine.connect() as conn:
        rows = (await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", parameters)).all()
    depth: dict[int, int] = {0: -1}
    lines = []
    for node_id, parent, _unused, detail in rows:
        depth[node_id] = depth.get(parent, -1) + 1
        lines.append("  " * depth[node_id] + detail)
    # "SCAN t" and "SCAN t USING [COVERING] INDEX ix" both read every row; only "SEARCH" is a lookup.
    full_scan = re.compile(rf"^SCAN ({'|'.join(guarded)})\b")
    return "\n".join(lines), [line.strip() for line in lines if full_scan.match(line.strip())]


def _postgres_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _postgres_nodes(child)


def _reads_in_full(node: dict[str, Any]) -> bool:
    """A Seq Scan reads the whole table; an index scan without a condition reads the whole index."""
    if node["Node Type"] == "Seq Scan":
        return True
    return node["Node Type"] in ("Index Scan", "Index Only Scan") and "Index Cond" not in node


async def postgres_plan(
    engine: AsyncEngine, statement: Captured, guarded: tuple[str, ...]
) -> tuple[str, list[str]]:
    """EXPLAIN as text, and the nodes of EXPLAIN (FORMAT JSON) that read a guarded table in full."""
    sql, parameters = statement
    async with engine.connect() as conn:
        text = "\n".join((await conn.exec_driver_sql(f"EXPLAIN {sql}", parameters)).scalars())
        raw = (await conn.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {sql}", parameters)).scalar_one()
    document = json.loads(raw) if isinstance(raw, str) else raw
    full_scans = [
        f"{node['Node Type']} on {node['Relation Name']}"
        for node in _postgres_nodes(document[0]["Plan"])
        if node.get("Relation Name") in guarded and _reads_in_full(node)
    ]
    return text, full_scans


async def assert_no_full_scan(
    engine: AsyncEngine, label: str, statement: Captured, also: tuple[str, ...] = ()
) -> None:
    explain = sqlite_plan if engine.dialect.name == "sqlite" else postgres_plan
    plan, full_scans = await explain(engine, statement, GUARDED_TABLES + also)
    print(f"\n--- {engine.dialect.name}: {label} ---\n{statement[0]}\n-- parameters: {statement[1]}\n{plan}")
    assert full_scans == [], f"{label} scans {full_scans} in full on {engine.dialect.name}:\n{plan}"


Call = Callable[[AvailabilityTracker], Awaitable[object]]
READS: dict[str, Call] = {
    "select_best_peers": lambda t: t.select_best_peers(CID, 5),
    "get_available_peers": lambda t: t.get_available_peers(CID),
    "get_peer_metrics": lambda t: t.get_peer_metrics(PEER),
}


@pytest.mark.parametrize("method", sorted(READS))
async def test_read_statement_does_not_scan_a_large_table(
    swarm_tracker: AvailabilityTracker, method: str
) -> None:
    with captured_statements(swarm_tracker) as statements:
        answer = await READS[method](swarm_tracker)
    assert answer, f"{method} found nothing: the plan would not be the one real data gets"

    selects = [s for s in statements if s[0].lstrip().upper().startswith(("SELECT", "WITH"))]
    assert selects, f"{method} ran no SELECT"
    for number, statement in enumerate(selects):  # selection also counts the chosen peers' leases
        await assert_no_full_scan(swarm_tracker.engine, f"{method} #{number}", statement)


async def test_refresh_speeds_update_does_not_scan_a_large_table(swarm_tracker: AvailabilityTracker) -> None:
    batch = [SpeedSample(peer, 3_000_000) for peer in SAMPLED_PEERS]
    with captured_statements(swarm_tracker) as statements:
        await swarm_tracker.record_batch(batch)

    update = the_statement(statements, "UPDATE PEER_STATS SET SPEED_BPS")
    await assert_no_full_scan(swarm_tracker.engine, f"refresh_speeds ({len(batch)} peers)", update)


async def test_write_statements_do_not_scan_a_large_table(swarm_tracker: AvailabilityTracker) -> None:
    """Each statement of a mixed batch (on Postgres one per table, its rows as arrays) finds its
    peers and contents by key: a scan of either per statement would cost as much as the batch."""
    batch: list[Event] = []
    for peer in SAMPLED_PEERS:
        batch += [
            PeerOnline(peer),
            SpeedSample(peer, 2_000_000),
            UploadOutcome(peer, success=True, cid=CID),
            ContentAvailable(CID, peer),
        ]
    with captured_statements(swarm_tracker) as statements:
        await swarm_tracker.record_batch(batch)

    writes = [s for s in statements if s[0].lstrip().upper().startswith(("INSERT", "UPDATE"))]
    assert len(writes) >= 6, [s[0][:40] for s in statements]
    for number, statement in enumerate(writes):
        label = f"write #{number}: {' '.join(statement[0].split()[:3])}"
        await assert_no_full_scan(swarm_tracker.engine, label, statement, also=("peers", "contents"))


def _sorts(engine: AsyncEngine, plan: str, document: Any) -> list[str]:
    if engine.dialect.name == "sqlite":
        return [line.strip() for line in plan.splitlines() if "TEMP B-TREE" in line]
    return [n["Node Type"] for n in _postgres_nodes(document[0]["Plan"]) if "Sort" in n["Node Type"]]


async def test_a_gossip_delta_reads_no_more_rows_than_it_sends(swarm_tracker: AvailabilityTracker) -> None:
    """A first contact's message reads its rows in index order and stops at its budget.

    The fixture ANALYZEs before anything is stamped, so the planners last saw every version NULL:
    the state in which Postgres, asked for a tie-broken order, sorted every row past the base for
    each message (a 100k swarm's first contact took 218 s to read instead of ~6 s).
    """
    tracker = swarm_tracker
    dialect, engine = tracker.config.dialect, tracker.engine

    async def stamp(conn: Any) -> int:
        return (await q.stamp(conn, dialect, tracker.node_id, 100, at=0)).clock

    await run_write(engine, stamp, 3)
    budget = 500
    with captured_statements(tracker) as statements:
        delta = await run_read(engine, lambda conn: q.read_deltas(conn, {}, (), budget, 10, samples={}))
    sent = delta.deltas[0]
    assert delta.truncated and 0 < len(sent.peers) + len(sent.mappings) <= budget
    reads = [s for s in statements if "ORDER BY" in s[0] and "LIMIT" in s[0] and "version" in s[0]]
    assert len(reads) == 2, [s[0] for s in statements]  # the peer rows and the mapping rows
    for sql, parameters in reads:
        async with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                plan, _ = await sqlite_plan(engine, (sql, parameters), GUARDED_TABLES)
                document: Any = None
            else:
                raw = (
                    await conn.exec_driver_sql(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", parameters)
                ).scalar_one()
                document = json.loads(raw) if isinstance(raw, str) else raw
                plan = json.dumps(document, indent=1)
                scanned = [
                    node["Actual Rows"]
                    for node in _postgres_nodes(document[0]["Plan"])
                    if node.get("Relation Name") in ("peer_stats", "content_peers")
                ]
                # The scan stops once the limit (the budget and one more) is met.
                assert scanned and max(scanned) <= budget + 1, (scanned, plan)
        assert _sorts(engine, plan, document) == [], f"the delta read sorts:\n{sql}\n{plan}"


async def test_the_tombstone_delete_walks_its_partial_index(swarm_tracker: AvailabilityTracker) -> None:
    """Tombstones are few beside live mappings: expiring them must not read ``content_peers`` whole
    (``ix_content_peers_tombstones``, on ``removed_at`` since migration 0015; SQLite uses a partial
    index only for a condition spelled as the index's)."""
    removals = [
        ContentUnavailable(f"cid-{c:04d}", f"peer-{(c * 7) % PEERS:04d}") for c in range(0, CONTENTS, 5)
    ]
    await swarm_tracker.record_batch(removals)
    now = swarm_tracker.now()
    with captured_statements(swarm_tracker) as statements:
        deleted = await run_write(
            swarm_tracker.engine, lambda conn: prune_tombstones(conn, now, now + 1, 10), 3
        )
    assert deleted == 10
    for label, starts_with in (
        ("dating", "UPDATE CONTENT_PEERS SET REMOVED_AT"),
        ("delete", "DELETE FROM CONTENT_PEERS"),
    ):
        statement = the_statement(statements, starts_with)
        await assert_no_full_scan(swarm_tracker.engine, f"prune_tombstones: {label}", statement)

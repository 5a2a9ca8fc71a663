"""Postgres connections are killed under load: calls in flight run again on fresh connections (only a
write whose COMMIT went unanswered fails), nothing acknowledged is lost, and the sweeper and gossip
tasks live on."""

from __future__ import annotations

import asyncio
import itertools
import random
from pathlib import Path

import asyncpg
import asyncpg.transaction
import pytest
from gossip_helpers import KEY, LocalNet
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection
from stored import stored_outcomes

from tracker import AvailabilityTracker, TrackerConfig, db
from tracker.errors import CommitOutcomeUnknown, StorageError
from tracker.events import ContentAvailable, PeerOnline
from tracker.gossip.agent import GossipAgent
from tracker.gossip.config import GossipConfig


async def _kill_connections(url: str) -> int:
    admin = await asyncpg.connect(
        make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    )
    try:
        rows = await admin.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return len(rows)
    finally:
        await admin.close()


@pytest.mark.parametrize("engine_name", ["postgresql"], indirect=True)
async def test_killed_connections_cost_only_the_writes_caught_committing(db_url: str, tmp_path: Path) -> None:
    config = TrackerConfig(database_url=db_url, run_sweeper=True, update_interval=0.2, sweep_jitter=0.0)
    tracker = await AvailabilityTracker.open(config)
    other = await AvailabilityTracker.open(
        TrackerConfig(database_url=f"sqlite+aiosqlite:///{tmp_path / 'o.db'}")
    )
    net = LocalNet()
    gossip_cfg = GossipConfig(keys=(KEY,), interval_s=0.2, jitter=0.0, backoff_max_s=0.4)
    agent = GossipAgent(
        tracker, GossipConfig(**{**gossip_cfg.__dict__, "neighbors": ("http://other",)}), transport=net
    )
    net.agents["http://other"] = GossipAgent(other, gossip_cfg, transport=net)
    gossiping = asyncio.create_task(agent.run())
    sequence = itertools.count()
    acked: set[int] = set()
    errors: list[BaseException] = []
    stop = asyncio.Event()

    async def writer() -> None:
        while not stop.is_set():
            seq = next(sequence)
            try:
                await tracker.record_upload_success("outage-peer", bytes=seq)
            except StorageError as error:
                errors.append(error)
                continue
            acked.add(seq)

    async def reader() -> None:
        while not stop.is_set():
            try:
                await tracker.select_best_peers("nothing", 3)
            except StorageError as error:
                errors.append(error)

    try:
        tasks = [asyncio.create_task(writer()) for _ in range(8)] + [asyncio.create_task(reader())]
        rng = random.Random(3)
        killed = 0
        for _ in range(4):
            await asyncio.sleep(rng.uniform(0.3, 0.6))
            killed += await _kill_connections(db_url)
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*tasks)
        assert killed > 0
        sweeps_before, rounds_before = tracker.sweeper_state.passes, agent.stats.rounds
        # Working again, by itself: writes, reads, the sweeper and gossip all go on.
        await tracker.record_upload_success("outage-peer", bytes=10**9)
        acked.add(10**9)
        assert (await tracker.get_peer_metrics("outage-peer")) is not None
        # Each failed pass doubles the sweeper's wait, up to 10 intervals (2 s here): killed connections
        # can leave it backing off for longer than the outage lasted. It must resume within that bound.
        deadline = asyncio.get_running_loop().time() + 10 * config.update_interval + 1.0
        while not (
            tracker.sweeper_state.passes > sweeps_before
            and agent.stats.rounds > rounds_before + 1  # a whole round after the write above
            and await other.get_peer_metrics("outage-peer") is not None  # gossip carried it out
        ):
            assert asyncio.get_running_loop().time() < deadline, (
                f"not resumed: {tracker.sweeper_state}, {agent.stats.rounds - rounds_before} gossip rounds"
            )
            await asyncio.sleep(0.05)
        assert not gossiping.done()
        async with tracker.engine.connect() as conn:
            stored, served = await stored_outcomes(conn, "outage-peer", tracker.node_id)
        assert acked <= stored and served == len(stored)
        # Reads and selections ran again on fresh connections; only an outcome whose COMMIT was cut
        # off may fail (the kill can land while it commits).
        assert all(isinstance(e, CommitOutcomeUnknown) for e in errors), errors
        print(f"outage: {killed} connections killed, {len(errors)} calls failed, {len(acked)} acknowledged")
    finally:
        stop.set()
        gossiping.cancel()
        await asyncio.gather(gossiping, return_exceptions=True)
        await tracker.close()
        await other.close()


def _lose_commit_answers(monkeypatch: pytest.MonkeyPatch, *, applied: bool, times: int = 1) -> list[int]:
    """Make the next ``times`` COMMITs fail as a dropped connection would: after the server applied
    them (the answer is lost) or before it saw them. Returns the count still to lose."""
    real_commit = asyncpg.transaction.Transaction.commit
    left = [times]

    async def commit_losing_the_answer(self: asyncpg.transaction.Transaction) -> None:
        if left[0] > 0:
            left[0] -= 1
            if applied:
                await real_commit(self)
            else:
                self._connection.terminate()  # the server sees the socket close and rolls back
            raise asyncpg.exceptions.ConnectionDoesNotExistError("connection lost while committing")
        await real_commit(self)

    monkeypatch.setattr(asyncpg.transaction.Transaction, "commit", commit_losing_the_answer)
    return left


@pytest.mark.parametrize("engine_name", ["postgresql"], indirect=True)
@pytest.mark.parametrize("applied", [True, False], ids=["applied", "not-applied"])
async def test_a_commit_whose_answer_is_lost_is_settled_by_the_server_and_applied_once(
    db_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, applied: bool
) -> None:
    """The connection drops while committing a group's shared transaction. Re-running the group's
    requests one by one (as for any other failure) stored every outcome twice when the server had
    committed; now the transaction's id tells: committed is success, aborted runs again."""
    tracker = await AvailabilityTracker.open(TrackerConfig(database_url=db_url))
    left = _lose_commit_answers(monkeypatch, applied=applied)
    try:
        await asyncio.gather(*(tracker.record_upload_success("ambiguous") for _ in range(10)))
        assert left == [0] and tracker.ingest_stats.isolated_retries == 0
        metrics = await tracker.get_peer_metrics("ambiguous")
        assert metrics is not None and metrics.chunks_served == 10  # applied exactly once
        async with tracker.engine.connect() as conn:
            _, served = await stored_outcomes(conn, "ambiguous", tracker.node_id)
        assert served == 10
        actions = [getattr(r, "action", None) for r in caplog.records]
        assert ("commit_checked" in actions) == applied and ("write_retry" in actions) != applied
    finally:
        await tracker.close()


@pytest.mark.parametrize("engine_name", ["postgresql"], indirect=True)
async def test_a_commit_the_server_cannot_settle_fails_its_group_and_is_never_applied_twice(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No answer to COMMIT and none to the question after it (the server unreachable): every caller
    is told CommitOutcomeUnknown, and nothing runs again."""
    tracker = await AvailabilityTracker.open(TrackerConfig(database_url=db_url))
    _lose_commit_answers(monkeypatch, applied=True)

    async def unreachable(engine: object, xid: int) -> None:
        return None

    monkeypatch.setattr(db, "_commit_status", unreachable)
    try:
        results = await asyncio.gather(
            *(tracker.record_upload_success("ambiguous") for _ in range(10)), return_exceptions=True
        )
        assert all(isinstance(r, CommitOutcomeUnknown) for r in results), results
        assert tracker.ingest_stats.isolated_retries == 0
        metrics = await tracker.get_peer_metrics("ambiguous")
        assert metrics is not None and metrics.chunks_served == 10  # committed once, as the server did
        await tracker.record_upload_success("ambiguous")  # the next connection works
        metrics = await tracker.get_peer_metrics("ambiguous")
        assert metrics is not None and metrics.chunks_served == 11
    finally:
        await tracker.close()


async def _kill_own_backend(conn: AsyncConnection) -> None:
    await conn.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))


@pytest.mark.parametrize("engine_name", ["postgresql"], indirect=True)
async def test_a_read_or_write_whose_connection_dies_before_commit_runs_again_on_a_new_one(
    db_url: str,
) -> None:
    """The server rolls back a transaction whose connection is gone, so running it again is safe; the
    pool's pre-ping cannot catch a connection that dies while in use. Both raised StorageError."""
    tracker = await AvailabilityTracker.open(TrackerConfig(database_url=db_url))
    attempts: list[str] = []

    async def read_once_killed(conn: AsyncConnection) -> int:
        attempts.append("read")
        if len(attempts) == 1:
            await _kill_own_backend(conn)
        return int((await conn.execute(text("SELECT 41 + 1"))).scalar_one())

    async def write_once_killed(conn: AsyncConnection) -> None:
        attempts.append("write")
        await conn.execute(
            text("UPDATE tracker_nodes SET created_at = created_at + 1 WHERE id = :id"),
            {"id": tracker.node_id},
        )
        if attempts.count("write") == 1:
            await _kill_own_backend(conn)

    try:
        assert await db.run_read(tracker.engine, read_once_killed) == 42
        assert attempts == ["read", "read"]
        async with tracker.engine.connect() as conn:
            before = (
                await conn.execute(
                    text("SELECT created_at FROM tracker_nodes WHERE id = :id"), {"id": tracker.node_id}
                )
            ).scalar_one()
        await db.run_write(tracker.engine, write_once_killed, retries=3)
        assert attempts.count("write") == 2
        async with tracker.engine.connect() as conn:
            after = (
                await conn.execute(
                    text("SELECT created_at FROM tracker_nodes WHERE id = :id"), {"id": tracker.node_id}
                )
            ).scalar_one()
        assert after == before + 1  # the first, killed attempt left nothing

        async def always_killed(conn: AsyncConnection) -> None:
            await _kill_own_backend(conn)

        with pytest.raises(StorageError, match="terminat"):
            await db.run_read(tracker.engine, always_killed, retries=2)
    finally:
        await tracker.close()


@pytest.mark.parametrize("engine_name", ["postgresql"], indirect=True)
async def test_a_selection_whose_commit_is_unanswered_runs_again_and_the_cap_still_holds(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Granting leases twice only parks the first grant's leases until they lapse, so a selection is
    not failed for it (an upload outcome is: it would count twice)."""
    tracker = await AvailabilityTracker.open(TrackerConfig(database_url=db_url, max_load_per_peer=1))
    await tracker.record_batch(
        [event for p in ("a", "b", "c") for event in (PeerOnline(p), ContentAvailable("hot", p))]
    )
    left = _lose_commit_answers(monkeypatch, applied=True)
    try:
        first = await tracker.select_best_peers("hot", 2)
        assert left == [0] and len(first) == 1  # the lost grant's 2 leases hold 2 of the 3 peers
        assert await tracker.select_best_peers("hot", 2) == []  # every peer at its cap of 1
        async with tracker.engine.connect() as conn:
            leases = (await conn.execute(text("SELECT count(*) FROM peer_leases"))).scalar_one()
        assert leases == 3
    finally:
        await tracker.close()


@pytest.mark.parametrize("engine_name", ["postgresql"], indirect=True)
async def test_the_commit_check_reads_committed_aborted_and_gives_up_on_one_still_in_progress(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    tracker = await AvailabilityTracker.open(TrackerConfig(database_url=db_url))
    engine = tracker.engine
    try:
        xids = {}
        for ending in ("commit", "rollback"):
            async with engine.connect() as conn:
                await conn.execute(text("UPDATE tracker_nodes SET created_at = created_at WHERE is_local"))
                xids[ending] = (await conn.execute(text("SELECT txid_current_if_assigned()"))).scalar_one()
                await (conn.commit() if ending == "commit" else conn.rollback())
        assert await db._commit_status(engine, xids["commit"]) == "committed"
        assert await db._commit_status(engine, xids["rollback"]) == "aborted"
        monkeypatch.setattr(db, "_STATUS_WAIT_S", 0.3)
        async with engine.connect() as holder:
            await holder.execute(text("UPDATE tracker_nodes SET created_at = created_at WHERE is_local"))
            open_xid = (await holder.execute(text("SELECT txid_current_if_assigned()"))).scalar_one()
            assert await db._commit_status(engine, open_xid) is None  # still in progress: unknown
            await holder.rollback()
        assert await db._commit_status(engine, open_xid) == "aborted"
    finally:
        await tracker.close()


@pytest.mark.parametrize("engine_name", ["postgresql"], indirect=True)
async def test_a_refused_connection_is_retried_and_then_a_storage_error_never_a_bare_oserror(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restarting server refuses connections; asyncpg's ConnectionRefusedError came through
    SQLAlchemy unwrapped and out of record/get calls as a bare OSError (HTTP: 500)."""
    tracker = await AvailabilityTracker.open(TrackerConfig(database_url=db_url, write_retries=3))
    real_connect = asyncpg.connect
    refusals = [0]

    async def refusing_connect(*args: object, **kwargs: object) -> asyncpg.Connection:
        if refusals[0] > 0:
            refusals[0] -= 1
            raise ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 5432)")
        return await real_connect(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(asyncpg, "connect", refusing_connect)
    try:
        await tracker.engine.dispose()  # the next calls must connect anew
        refusals[0] = 2
        await tracker.record_upload_success("restart-peer")  # refused twice, then made it
        await tracker.engine.dispose()
        refusals[0] = 2
        assert (await tracker.get_peer_metrics("restart-peer")) is not None
        await tracker.engine.dispose()
        refusals[0] = 10**6  # down for good
        with pytest.raises(StorageError, match="Connect call failed"):
            await tracker.record_upload_success("restart-peer")
        with pytest.raises(StorageError, match="Connect call failed"):
            await tracker.get_peer_metrics("restart-peer")
        refusals[0] = 0
        metrics = await tracker.get_peer_metrics("restart-peer")
        assert metrics is not None and metrics.chunks_served == 1
    finally:
        refusals[0] = 0
        await tracker.close()


async def test_opening_a_tracker_on_a_server_that_refuses_raises_storage_error() -> None:
    """open() let asyncpg's ConnectionRefusedError out bare, unlike every other call."""
    with pytest.raises(StorageError, match="Connect call failed"):
        await AvailabilityTracker.open(
            TrackerConfig(database_url="postgresql+asyncpg://postgres@127.0.0.1:1/none")
        )


class _DropAtSetUp:
    """A loopback TCP relay to the test's Postgres that cuts the first ``drops`` connections when the
    client sends the tracker's connection set-up (``SET jit``): a backend killed right then, which
    pg_terminate_backend can only hit by chance."""

    def __init__(self, host: str, port: int, drops: int) -> None:
        self.host, self.port, self.drops = host, port, drops
        self.cut = 0
        self.armed = False
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        cut = self.armed and self.cut < self.drops

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, watch: bool) -> None:
            try:
                while data := await src.read(65536):
                    if watch and cut and b"SET jit" in data:
                        self.cut += 1
                        break
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                for w in (writer, up_writer):
                    w.close()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))


@pytest.mark.parametrize("engine_name", ["postgresql"], indirect=True)
@pytest.mark.parametrize("drops", [2, 100])
async def test_a_connection_lost_while_it_is_set_up_is_retried_or_a_storage_error(
    db_url: str, drops: int
) -> None:
    """The connect-time SET's failure passed SQLAlchemy as asyncpg's bare error: neither retried nor a
    StorageError, and the service answered 500 (QA round 50). A few such losses cost a retry; a
    server that keeps losing them is a StorageError, answered 503."""
    url = make_url(db_url)
    async with AvailabilityTracker(TrackerConfig(database_url=db_url)):
        pass  # migrated, straight to the server
    relay = _DropAtSetUp(url.host or "127.0.0.1", url.port or 5432, drops)
    async with relay as port:
        config = TrackerConfig(
            database_url=url.set(host="127.0.0.1", port=port).render_as_string(hide_password=False),
            auto_migrate=False,
            write_retries=3,
        )
        async with AvailabilityTracker(config) as tracker:
            relay.armed = True
            assert await _kill_connections(db_url) >= 1  # the pool's: new ones replace them
            if drops == 2:
                await tracker.record_peer_online("p")
                assert await tracker.get_available_peers("nothing") == []
                metrics = await tracker.get_peer_metrics("p")
                assert metrics is not None and metrics.online
            else:
                with pytest.raises(StorageError, match="setting up a new database connection failed"):
                    await tracker.record_peer_online("p")
                with pytest.raises(StorageError):
                    await tracker.get_peer_metrics("p")


@pytest.mark.parametrize("engine_name", ["postgresql"], indirect=True)
async def test_a_sweep_whose_lock_connection_is_lost_while_set_up_raises_a_storage_error(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep lock's own connection passed a bare ConnectionError, or SQLAlchemy's error, out of
    ``tracker.sweep()`` (QA round 53): the cut lands on it, after the pass's first read."""
    from tracker import sweeper

    url = make_url(db_url)
    async with AvailabilityTracker(TrackerConfig(database_url=db_url)):
        pass
    relay = _DropAtSetUp(url.host or "127.0.0.1", url.port or 5432, 1)
    async with relay as port:
        config = TrackerConfig(
            database_url=url.set(host="127.0.0.1", port=port).render_as_string(hide_password=False),
            auto_migrate=False,
        )
        async with AvailabilityTracker(config) as tracker:
            offset = sweeper._database_clock_offset

            async def offset_then_cut(tracker: AvailabilityTracker) -> float | None:
                found = await offset(tracker)
                relay.armed = True
                await _kill_connections(db_url)
                return found

            monkeypatch.setattr(sweeper, "_database_clock_offset", offset_then_cut)
            with pytest.raises(StorageError, match="setting up a new database connection failed"):
                await tracker.sweep()
            assert relay.cut == 1
            monkeypatch.setattr(sweeper, "_database_clock_offset", offset)
            assert (await tracker.sweep()).ran

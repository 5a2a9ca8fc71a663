"""Migrations and schema agree: ``upgrade head`` builds exactly ``tracker.schema.metadata``, on both engines.

Every test starts from an empty database (a new SQLite file, or a new Postgres database with no tables),
because that is what a first deployment and ``alembic upgrade head`` from the shell start from.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.command import upgrade
from alembic.runtime.migration import MigrationContext
from conftest import PG_URL, _dsn
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from tracker import AvailabilityTracker, SchemaOutOfDate, TrackerConfig, migrations
from tracker.db import create_engine
from tracker.drift import condition_text
from tracker.migrations import (
    MIGRATION_LOCK_KEY,
    alembic_config,
    current_revision,
    head_revision,
    migrate,
)
from tracker.queries.writes import draw_of
from tracker.schema import metadata

#: Where alembic.ini is: the shell's `alembic` runs there.
PROJECT = Path(__file__).resolve().parent.parent

# What `downgrade base` may leave behind: Alembic's own bookkeeping (and, on Postgres, its primary key).
ALEMBIC_OBJECTS = {"alembic_version", "alembic_version_pkc"}


@pytest.fixture
def empty_url(engine_name: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """An empty database of each engine: a new SQLite file, or a new Postgres database (not the template)."""
    if engine_name == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"
    request.getfixturevalue("pg_template")  # skips without Postgres (fails if TRACKER_REQUIRE_POSTGRES=1)
    return str(request.getfixturevalue("empty_pg_url"))


@pytest.fixture
async def engine(empty_url: str) -> AsyncIterator[AsyncEngine]:
    """The tracker's own engine (pragmas and all) on the empty database."""
    opened = create_engine(TrackerConfig(database_url=empty_url))
    yield opened
    await opened.dispose()


def _schema_diff(sync_conn: Connection) -> list[Any]:
    """Alembic's autogenerate comparison of the live database against ``tracker.schema.metadata``.

    Tables, columns (with types), nullability, server defaults, comments, indexes, unique constraints
    and foreign keys. Server defaults since QA round 62: a default dropped or changed in a migration
    went unnoticed, and processes of the release before rely on `DEFAULT 0` during a rolling upgrade.
    """
    options = {"compare_type": True, "compare_server_default": True}
    context = MigrationContext.configure(sync_conn, opts=options)
    return compare_metadata(context, metadata)


async def schema_diff(engine: AsyncEngine) -> list[Any]:
    async with engine.connect() as conn:
        return await conn.run_sync(_schema_diff)


async def schema_objects(engine: AsyncEngine) -> set[str]:
    """Names of every table, index and sequence in the database (SQLite's internal ones excepted)."""
    if engine.dialect.name == "sqlite":
        sql = "SELECT name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"
    else:
        sql = (
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = current_schema()"
        )
    async with engine.connect() as conn:
        return set((await conn.exec_driver_sql(sql)).scalars())


async def table_names(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as conn:
        return set(await conn.run_sync(lambda sync_conn: inspect(sync_conn).get_table_names()))


async def test_upgrade_head_in_process_builds_exactly_the_schema_metadata(engine: AsyncEngine) -> None:
    await migrate(engine)

    assert await current_revision(engine) == head_revision()
    assert await schema_diff(engine) == []


@pytest.mark.parametrize(
    ("table", "name", "unique", "where"),
    [
        # Without it only one node could exist.
        ("tracker_nodes", "uq_tracker_nodes_local", True, "is_local"),
        # Migration 0014: most outcomes name no content, and the index leaves them out.
        ("upload_outcomes", "ix_upload_outcomes_content", False, "content_id is not null"),
    ],
)
async def test_partial_indexes_keep_their_condition_after_upgrade(
    engine: AsyncEngine, table: str, name: str, unique: bool, where: str
) -> None:
    # compare_metadata does not look at an index's WHERE clause.
    await migrate(engine)

    async with engine.connect() as conn:
        indexes = await conn.run_sync(lambda sync_conn: inspect(sync_conn).get_indexes(table))
    index = next(ix for ix in indexes if ix["name"] == name)
    found = index.get("dialect_options", {}).get(f"{engine.dialect.name}_where")
    assert (bool(index["unique"]), str(found).strip("() ").lower()) == (unique, where), index


async def test_every_partial_index_and_rowid_choice_is_what_the_models_say(engine: AsyncEngine) -> None:
    """What compare_metadata leaves out, for every index and table the models declare, not the two
    the test above names (QA round 62: a condition dropped from the tombstones' index, or
    WITHOUT ROWID dropped from peer_stats, went unnoticed here)."""
    await migrate(engine)
    dialect = engine.dialect.name
    wanted: dict[str, str] = {}
    for table in metadata.tables.values():
        for index in table.indexes:
            where = index.dialect_options[dialect].get("where")
            if where is not None:
                compiled = where.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True})
                wanted[index.name or ""] = condition_text(compiled, table.name)
    assert len(wanted) >= 3

    def reflect(sync_conn: Connection) -> dict[str, str]:
        inspector = inspect(sync_conn)
        return {
            index["name"]: condition_text(index.get("dialect_options", {}).get(f"{dialect}_where"), name)
            for name in inspector.get_table_names()
            for index in inspector.get_indexes(name)
            if index["name"] in wanted
        }

    async with engine.connect() as conn:
        assert await conn.run_sync(reflect) == wanted
        if dialect == "sqlite":
            rowless = {
                t.name
                for t in metadata.tables.values()
                if t.dialect_options["sqlite"].get("with_rowid") is False
            }
            assert rowless
            rows = await conn.exec_driver_sql("SELECT name, sql FROM sqlite_master WHERE type = 'table'")
            found = {name for name, sql in rows if sql.rstrip().upper().endswith("WITHOUT ROWID")}
            assert found == rowless


@pytest.mark.parametrize("url_via", ["x_argument", "environment"])
async def test_alembic_command_upgrade_through_env_py_builds_exactly_the_schema_metadata(
    engine: AsyncEngine, empty_url: str, url_via: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = alembic_config()  # no URL and no connection: env.py opens its own async engine
    if url_via == "x_argument":
        monkeypatch.delenv("TRACKER_DATABASE_URL", raising=False)
        cfg.cmd_opts = argparse.Namespace(x=[f"url={empty_url}"])
    else:
        monkeypatch.setenv("TRACKER_DATABASE_URL", empty_url)

    # env.py runs its engine with asyncio.run(), as from the shell: give it a thread without a loop.
    await asyncio.to_thread(upgrade, cfg, "head")

    assert await current_revision(engine) == head_revision()
    assert await schema_diff(engine) == []


async def test_the_schema_comparison_sees_a_missing_index(engine: AsyncEngine) -> None:
    # Guards the tests above against an empty diff that comes from comparing nothing.
    await migrate(engine)
    async with engine.begin() as conn:
        await conn.exec_driver_sql("DROP INDEX ix_content_peers_peer")

    diff = await schema_diff(engine)

    assert len(diff) == 1 and diff[0][0] == "add_index", diff
    assert diff[0][1].name == "ix_content_peers_peer", diff


async def test_downgrade_to_base_leaves_no_tracker_tables_and_upgrade_works_again(
    engine: AsyncEngine,
) -> None:
    await migrate(engine)

    await migrate(engine, "base", downgrade=True)

    assert await schema_objects(engine) <= ALEMBIC_OBJECTS
    assert await current_revision(engine) is None
    diff = await schema_diff(engine)
    assert sorted(d[1].name for d in diff if d[0] == "add_table") == sorted(metadata.tables), diff
    await migrate(engine)
    assert await current_revision(engine) == head_revision()
    assert await schema_diff(engine) == []


async def test_opening_a_tracker_on_an_empty_database_migrates_it_to_head(empty_url: str) -> None:
    async with AvailabilityTracker(TrackerConfig(database_url=empty_url)) as tracker:
        assert await current_revision(tracker.engine) == head_revision()
        assert tracker.node_key is not None
        assert await schema_diff(tracker.engine) == []


async def test_opening_without_auto_migrate_on_an_empty_database_fails_and_creates_nothing(
    engine: AsyncEngine, empty_url: str, engine_name: str
) -> None:
    # An SQLite file that is not there is not created (it was, empty, behind the error).
    expected = "no database at .*check the path" if engine_name == "sqlite" else "revision none"
    with pytest.raises(SchemaOutOfDate, match=rf"{expected}.*tracker db upgrade"):
        async with AvailabilityTracker(TrackerConfig(database_url=empty_url, auto_migrate=False)):
            pass

    if engine_name == "sqlite":
        assert not Path(make_url(empty_url).database or "").exists()
        return
    assert await table_names(engine) == set()
    assert await current_revision(engine) is None


async def test_concurrent_opens_of_one_empty_database_all_succeed_and_agree_on_the_local_node(
    empty_url: str,
) -> None:
    config = TrackerConfig(database_url=empty_url)
    opens = (AvailabilityTracker.open(config) for _ in range(4))
    opened = await asyncio.gather(*opens, return_exceptions=True)
    try:
        failures = [result for result in opened if isinstance(result, BaseException)]
        assert failures == []
        trackers = [result for result in opened if isinstance(result, AvailabilityTracker)]
        assert len({tracker.node_key for tracker in trackers}) == 1
        assert await current_revision(trackers[0].engine) == head_revision()
        async with trackers[0].engine.connect() as conn:
            nodes = (await conn.exec_driver_sql("SELECT node_key FROM tracker_nodes")).scalars().all()
        assert nodes == [trackers[0].node_key]
    finally:
        for result in opened:
            if isinstance(result, AvailabilityTracker):
                await result.close()


async def _rows_and_layout(engine: AsyncEngine) -> tuple[dict[str, list[Any]], dict[str, str], set[str]]:
    """Every row of the two tables 0007 rebuilds, their CREATE statements, and all index definitions."""
    rows, tables = {}, {}
    async with engine.connect() as conn:
        for table, key in (("peer_stats", "peer_id, node_id"), ("content_peers", "content_id, peer_id")):
            rows[table] = [
                tuple(r) for r in await conn.exec_driver_sql(f"SELECT * FROM {table} ORDER BY {key}")
            ]
            tables[table] = (
                await conn.exec_driver_sql(f"SELECT sql FROM sqlite_master WHERE name = '{table}'")
            ).scalar_one()
        indexes = set(
            (
                await conn.exec_driver_sql(
                    "SELECT sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
                )
            )
            .scalars()
            .all()
        )
        # The analytics views read both tables and must still work after the rebuild.
        await conn.exec_driver_sql("SELECT count(*) FROM peer_scores")
        await conn.exec_driver_sql("SELECT count(*) FROM under_replicated_content")
    return rows, tables, indexes


async def test_migrations_0007_and_0008_keep_rows_indexes_and_views_of_the_clustered_peer_tables(
    tmp_path: Path,
) -> None:
    """An edge node upgrading in place: data written under 0006 is all there, in tables WITHOUT
    ROWID, with the same indexes; downgrading restores rowid tables with the same rows."""
    engine = create_engine(TrackerConfig(database_url=f"sqlite+aiosqlite:///{tmp_path / 'edge.db'}"))
    try:
        await migrate(engine, "0006")
        async with engine.begin() as conn:
            await conn.exec_driver_sql(
                "INSERT INTO tracker_nodes (id, node_key, is_local, created_at, clock) "
                "VALUES (1, 'local', 1, 0, 0), (2, 'remote', 0, 0, 7)"
            )
            await conn.exec_driver_sql(
                "INSERT INTO peers (id, peer_key, first_seen) VALUES (1, 'p1', 1.0), (2, 'p2', 2.0)"
            )
            await conn.exec_driver_sql(
                "INSERT INTO contents (id, content_key, first_seen) VALUES (1, 'c', 1.0)"
            )
            await conn.exec_driver_sql(
                "INSERT INTO peer_stats VALUES "
                "(1, 1, 1, 10.0, 20.0, 5.0, 3, 1, 2.5, 0.5, 19.0, 1000.0, 20.0, NULL), "
                "(1, 2, 0, NULL, 15.0, 1.0, 1, 0, 1.0, 0.0, 14.0, NULL, 15.0, 7), "
                "(2, 1, 1, 11.0, 21.0, 0.0, 0, 0, 0.0, 0.0, NULL, NULL, 21.0, 3)"
            )
            await conn.exec_driver_sql(
                "INSERT INTO content_peers VALUES "
                "(1, 1, 1, 1, 5.0, 6.0, 6.0, NULL), (1, 2, 2, 0, 5.0, 5.0, 9.0, 7)"
            )
        before_rows, before_tables, before_indexes = await _rows_and_layout(engine)
        assert all("WITHOUT ROWID" not in ddl for ddl in before_tables.values())

        await migrate(engine, "0007")

        rows, tables, indexes = await _rows_and_layout(engine)
        assert rows == before_rows and indexes == before_indexes
        assert all(ddl.endswith("WITHOUT ROWID") for ddl in tables.values()), tables

        # 0008 adds samples_version (each row's own version) to the clustered table, and its
        # downgrade drops it again without rebuilding the table (which would lose WITHOUT ROWID).
        await migrate(engine)
        assert await schema_diff(engine) == []
        async with engine.connect() as conn:
            pairs = (
                await conn.exec_driver_sql("SELECT version, samples_version FROM peer_stats ORDER BY 1")
            ).all()
        assert pairs == [(None, None), (3, 3), (7, 7)]
        await migrate(engine, "0007", downgrade=True)
        rows, tables, indexes = await _rows_and_layout(engine)
        assert rows == before_rows and indexes == before_indexes
        assert all(ddl.endswith("WITHOUT ROWID") for ddl in tables.values()), tables

        await migrate(engine, "0006", downgrade=True)

        rows, tables, indexes = await _rows_and_layout(engine)
        assert rows == before_rows and indexes == before_indexes
        assert all("WITHOUT ROWID" not in ddl for ddl in tables.values()), tables
    finally:
        await engine.dispose()


@pytest.mark.parametrize("engine_name", ["postgresql"], indirect=True)
async def test_alembic_from_the_shell_waits_for_the_lock_trackers_take_to_migrate(
    engine: AsyncEngine, empty_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deployment's `alembic upgrade head` beside trackers that migrate as they open: without the
    lock both created the tables, and the second failed (QA round 6)."""
    monkeypatch.setenv("TRACKER_DATABASE_URL", empty_url)
    holder = await asyncpg.connect(_dsn(empty_url))
    try:
        await holder.execute(f"SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})")  # a tracker migrating
        upgrading = asyncio.create_task(asyncio.to_thread(upgrade, alembic_config(), "head"))
        waiting = (
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            f" AND objid = {MIGRATION_LOCK_KEY} AND database = (SELECT oid FROM pg_database"
            " WHERE datname = current_database())"
        )
        for _ in range(600):
            if await holder.fetchval(waiting) or upgrading.done():
                break
            await asyncio.sleep(0.05)
        assert not upgrading.done(), upgrading.exception()
        assert await holder.fetchval(waiting) == 1
        assert await table_names(engine) == set()
    finally:
        await holder.close()  # the lock goes with the session
    await asyncio.wait_for(upgrading, 120)
    assert await current_revision(engine) == head_revision()
    assert await schema_diff(engine) == []


async def _shell_alembic(env: dict[str, str], timeout_s: float, *args: str) -> tuple[int | None, str]:
    """``alembic ARGS`` run from the shell in the project directory: its exit code and output."""
    shell = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "alembic",
        *args,
        cwd=PROJECT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    said = (await asyncio.wait_for(shell.communicate(), timeout_s))[0].decode()
    return shell.returncode, said


@pytest.mark.parametrize("engine_name", ["sqlite"], indirect=True)
async def test_alembic_from_the_shell_three_times_at_once_on_one_new_sqlite_file(
    engine: AsyncEngine, empty_url: str
) -> None:
    """Without the file's write lock for the chain (env.py serialised only on Postgres) the second
    failed on a table the first had made, the third on alembic_version (QA round 49). A setting
    that is no migration's, even a bad one, is not the shell's business (QA round 53)."""
    env = {**os.environ, "TRACKER_DATABASE_URL": empty_url, "TRACKER_PEER_TIMEOUT": "5m"}
    ran = await asyncio.gather(*(_shell_alembic(env, 120, "upgrade", "head") for _ in range(3)))
    assert [code for code, _ in ran] == [0, 0, 0], ran
    assert await current_revision(engine) == head_revision()
    assert await schema_diff(engine) == []
    async with engine.connect() as conn:
        assert (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar_one() == "wal"


@pytest.mark.parametrize("engine_name", ["sqlite"], indirect=True)
async def test_alembic_current_from_the_shell_neither_waits_for_a_writer_nor_changes_the_file(
    engine: AsyncEngine, empty_url: str
) -> None:
    """Only the commands that move the schema take the write lock: `alembic current` waited for any
    writer, switched a rollback-journal file to WAL, and failed on a read-only file (QA round 52)."""
    await migrate(engine)
    await engine.dispose()
    path = str(make_url(empty_url).database)
    writer = sqlite3.connect(path, isolation_level=None)
    try:
        writer.execute("PRAGMA journal_mode=DELETE")
        writer.execute("BEGIN IMMEDIATE")  # a writer, which readers of a rollback journal pass
        env = {**os.environ, "TRACKER_DATABASE_URL": empty_url, "TRACKER_SQLITE_BUSY_TIMEOUT_S": "30"}
        code, said = await _shell_alembic(env, 20, "current")
        assert code == 0 and f"{head_revision()} (head)" in said, said
        writer.execute("ROLLBACK")
        assert writer.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    finally:
        writer.close()


async def test_alembic_renders_sql_offline_and_names_the_sqlite_revisions_that_need_the_database(
    engine: AsyncEngine, empty_url: str
) -> None:
    """``alembic upgrade --sql`` renders the chain for a DBA. On SQLite three revisions read the
    database (0007 its schema, 0011 and 0013 every peer's key): rendered offline they failed with
    "'NoneType' object has no attribute 'scalar_one'" and a traceback. They say so, and what to do;
    the ranges between them render."""
    env = {**os.environ, "TRACKER_DATABASE_URL": empty_url}
    if engine.dialect.name == "postgresql":
        code, said = await _shell_alembic(env, 120, "upgrade", "base:head", "--sql")
        assert code == 0 and "CREATE TABLE peer_stats" in said and "own_seen" in said, said[-2_000:]
        return
    for revision, before in (("0007", "0006"), ("0011", "0010"), ("0013", "0012")):
        code, said = await _shell_alembic(env, 120, "upgrade", f"{before}:{revision}", "--sql")
        assert code != 0, said
        assert f"FAILED: revision {revision} " in said and f"({revision}:head)" in said, said[-2_000:]
        assert "Traceback" not in said
    code, said = await _shell_alembic(env, 120, "downgrade", "0007:0006", "--sql")
    assert code != 0 and "FAILED: revision 0007 " in said, said[-2_000:]
    code, said = await _shell_alembic(env, 120, "upgrade", "0013:head", "--sql")
    assert code == 0 and "own_seen" in said, said[-2_000:]
    assert await table_names(engine) == set()  # offline: nothing touched


async def test_migration_0011_gives_existing_peers_the_draw_their_keys_give(engine: AsyncEngine) -> None:
    """Postgres fills ``draw`` in SQL and SQLite from Python: both must equal what the write path
    stores for a new peer (``draw_of``), or draws would differ by where a peer was first written."""
    keys = ["peer-1", "Peer-2", "ünïcode-🙂", "x" * 256, "bafy/🙂:with spaces"]
    await migrate(engine, "0010")
    async with engine.begin() as conn:
        for key in keys:
            await conn.execute(text("INSERT INTO peers (peer_key, first_seen) VALUES (:k, 0)"), {"k": key})
    await migrate(engine)
    async with engine.connect() as conn:
        stored = dict((await conn.execute(text("SELECT peer_key, draw FROM peers"))).all())
    assert stored == {key: draw_of(key) for key in keys}
    assert await schema_diff(engine) == []
    await migrate(engine, "0010", downgrade=True)  # in place: the peers stay
    async with engine.connect() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM peers"))).scalar_one() == len(keys)


async def test_migration_0013_widens_draws_to_31_bits_and_back(engine: AsyncEngine) -> None:
    """Two keys whose MD5s share their first 24 bits had one draw, and one weighted ``u`` for
    every seed (QA round 12); 0013 takes 31 bits, and its downgrade gives back what 0011 stored."""
    keys = ["peer-2600", "peer-4285", "ünïcode-🙂", "x" * 256]
    await migrate(engine, "0012")
    async with engine.begin() as conn:
        for key in keys:
            await conn.execute(text("INSERT INTO peers (peer_key, first_seen) VALUES (:k, 0)"), {"k": key})
    await migrate(engine, "0010", downgrade=True)
    await migrate(engine, "0012")  # 0011 fills the 24-bit draws
    async with engine.connect() as conn:
        narrow = dict((await conn.execute(text("SELECT peer_key, draw FROM peers"))).all())
    assert narrow["peer-2600"] == narrow["peer-4285"]
    await migrate(engine)
    async with engine.connect() as conn:
        wide = dict((await conn.execute(text("SELECT peer_key, draw FROM peers"))).all())
    assert wide == {key: draw_of(key) for key in keys} and wide["peer-2600"] != wide["peer-4285"]
    await migrate(engine, "0012", downgrade=True)
    async with engine.connect() as conn:
        assert dict((await conn.execute(text("SELECT peer_key, draw FROM peers"))).all()) == narrow


async def test_migration_0015_keeps_existing_tombstones_from_their_date_and_back(engine: AsyncEngine) -> None:
    """Tombstones already there keep the schedule they had (``removed_at = changed_at``); live
    mappings have none; a downgrade gives the index on ``changed_at`` back."""
    await migrate(engine, "0014")
    async with engine.begin() as conn:
        await conn.execute(text("INSERT INTO peers (peer_key, first_seen, draw) VALUES ('p', 0, 1)"))
        await conn.execute(text("INSERT INTO contents (content_key, first_seen) VALUES ('a', 0), ('b', 0)"))
        await conn.execute(
            text("INSERT INTO tracker_nodes (node_key, is_local, created_at) VALUES ('n', :t, 0)"),
            {"t": True},
        )
        node = await conn.scalar(text("SELECT id FROM tracker_nodes"))
        for cid, available in (("a", True), ("b", False)):
            await conn.execute(
                text(
                    "INSERT INTO content_peers (content_id, peer_id, node_id, available, since, "
                    "last_confirmed, changed_at) SELECT c.id, p.id, :node, :available, 5, 5, 7 "
                    "FROM contents c, peers p WHERE c.content_key = :cid"
                ),
                {"node": node, "available": available, "cid": cid},
            )
    await migrate(engine)
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT c.content_key, cp.removed_at FROM content_peers cp "
                "JOIN contents c ON c.id = cp.content_id"
            )
        )
        assert sorted(rows.all()) == [("a", None), ("b", 7.0)]
    assert await schema_diff(engine) == []
    await migrate(engine, "0014", downgrade=True)
    async with engine.connect() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM content_peers"))).scalar_one() == 2
        indexes = await conn.run_sync(lambda sync_conn: inspect(sync_conn).get_indexes("content_peers"))
    assert [ix["column_names"] for ix in indexes if ix["name"] == "ix_content_peers_tombstones"] == [
        ["changed_at"]
    ]


async def test_draws_of_a_latin1_database_are_those_of_the_keys_utf8_bytes(
    request: pytest.FixtureRequest,
) -> None:
    """0011 and 0013 hashed ``md5(peer_key)``, the key in the database's encoding: on a LATIN1
    database every non-ASCII key drew apart from what the write path (and every other database)
    gives it (QA round 15)."""
    request.getfixturevalue("pg_template")  # reachability / TRACKER_REQUIRE_POSTGRES, as every PG test
    name = f"tracker_t_latin1_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(_dsn(PG_URL))
    try:
        await admin.execute(f"CREATE DATABASE \"{name}\" ENCODING 'LATIN1' LOCALE 'C' TEMPLATE template0")
        url = make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
        engine = create_engine(TrackerConfig(database_url=url))
        try:
            keys = ["café-1", "naïve-2", "ascii-3", "Ünïcødé-4"]
            await migrate(engine, "0010")
            async with engine.begin() as conn:
                for key in keys:
                    await conn.execute(
                        text("INSERT INTO peers (peer_key, first_seen) VALUES (:k, 0)"), {"k": key}
                    )
            await migrate(engine, "0011")
            async with engine.connect() as conn:
                narrow = dict((await conn.execute(text("SELECT peer_key, draw FROM peers"))).all())
            assert narrow == {key: draw_of(key) >> 7 for key in keys}
            await engine.dispose()  # 0012 changes peer_key's type under the cached statement
            await migrate(engine)
            async with engine.connect() as conn:
                wide = dict((await conn.execute(text("SELECT peer_key, draw FROM peers"))).all())
            assert wide == {key: draw_of(key) for key in keys}
            await migrate(engine, "0012", downgrade=True)
            async with engine.connect() as conn:
                assert dict((await conn.execute(text("SELECT peer_key, draw FROM peers"))).all()) == narrow
        finally:
            await engine.dispose()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@asynccontextmanager
async def _report_reading(url: str, table: str) -> AsyncIterator[None]:
    """A session named "report" that reads ``table`` in a transaction left open until the block ends."""
    report = await asyncpg.connect(_dsn(url), server_settings={"application_name": "report"})
    try:
        await report.execute(f"BEGIN; SELECT count(*) FROM {table}")
        yield
    finally:
        await report.execute("COMMIT")
        await report.close()


async def test_a_migration_waiting_for_a_tables_lock_lets_the_trackers_traffic_through(
    empty_pg_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A report left idle in its transaction kept a migration's ALTER waiting, and every statement on
    that table queued behind the ALTER: ingest stopped for as long as the report stayed open
    (QA round 19). The migration now waits a short while at a time and names who holds the table."""
    monkeypatch.setattr(migrations, "LOCK_ATTEMPT_S", 0.2, raising=False)
    async with AvailabilityTracker(TrackerConfig(database_url=empty_pg_url)) as tracker:
        await tracker.record_peer_online("p0")
        async with _report_reading(empty_pg_url, "peers"):
            migrating = asyncio.create_task(migrate(tracker.engine, "0011", downgrade=True))
            for _ in range(200):
                if "migration_lock_wait" in [getattr(r, "action", None) for r in caplog.records]:
                    break
                await asyncio.sleep(0.05)
            waits = [
                r.getMessage() for r in caplog.records if getattr(r, "action", None) == "migration_lock_wait"
            ]
            assert waits and "report, in a transaction for" in waits[0], waits
            for i in range(1, 6):  # each waits at most one attempt behind the migration's request
                await asyncio.wait_for(tracker.record_peer_online(f"p{i}"), 5)
            assert not migrating.done()
        await asyncio.wait_for(migrating, 60)
        assert await current_revision(tracker.engine) == "0011"
        await migrate(tracker.engine)
        assert (metrics := await tracker.get_peer_metrics("p5")) is not None and metrics.online


async def test_opening_a_database_at_head_logs_nothing_of_alembic(
    empty_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Alembic's "Context impl" and "Will assume ... DDL" lines came at every open and /readyz probe
    of a database with nothing to migrate (QA round 22); a migration that runs still logs its steps."""
    with caplog.at_level("INFO", logger="alembic"):
        async with AvailabilityTracker(TrackerConfig(database_url=empty_url, run_sweeper=False)):
            pass
        assert any("Running upgrade" in r.getMessage() for r in caplog.records)
        caplog.clear()
        async with AvailabilityTracker(TrackerConfig(database_url=empty_url, run_sweeper=False)) as tracker:
            assert await current_revision(tracker.engine) == head_revision()
    assert [r.getMessage() for r in caplog.records if r.name.startswith("alembic")] == []


async def test_an_upgrade_waiting_for_a_tables_lock_keeps_the_revisions_it_completed(
    empty_pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole chain ran in one transaction: each attempt that lost on a table's lock rolled back
    and redid every revision before it (QA round 47: 0013 rewrote a million peer rows at every
    attempt). An upgrade now commits each revision: while 0015 waits for content_peers, which a
    report holds, the database is at 0014 already."""
    monkeypatch.setattr(migrations, "LOCK_ATTEMPT_S", 0.2, raising=False)
    async with AvailabilityTracker(TrackerConfig(database_url=empty_pg_url)) as tracker:
        await tracker.record_content_available("c", "p0")
        await migrate(tracker.engine, "0012", downgrade=True)
        async with _report_reading(empty_pg_url, "content_peers"):
            migrating = asyncio.create_task(migrate(tracker.engine, timeout_s=60))
            for _ in range(200):
                if await current_revision(tracker.engine) == "0014":
                    break
                await asyncio.sleep(0.05)
            assert await current_revision(tracker.engine) == "0014"
            assert not migrating.done()
        await asyncio.wait_for(migrating, 60)
        assert await current_revision(tracker.engine) == head_revision()
        assert await tracker.get_available_peers("c") == ["p0"]


async def test_a_long_revision_does_not_eat_the_time_the_next_may_wait_for_the_migration_lock(
    empty_pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One revision a transaction, another process may take the migration lock between two. Counted
    from the start, a long revision's own work left the next 1 ms to wait, and the upgrade failed
    with "held for 5 s" while the other process finished it (QA round 49). The waits start again
    after each revision."""
    real = migrations._migrate_once
    calls = 0
    holder: asyncio.Task[None] | None = None

    async def hold_briefly() -> None:
        conn = await asyncpg.connect(_dsn(empty_pg_url))
        try:
            await conn.execute(f"SELECT pg_advisory_lock({migrations.MIGRATION_LOCK_KEY})")
            await asyncio.sleep(0.3)
        finally:
            await conn.close()

    async def long_first_revision(*args: Any, **kwargs: Any) -> bool:
        nonlocal calls, holder
        done = await real(*args, **kwargs)
        calls += 1
        if calls == 1:
            await asyncio.sleep(1.2)  # the revision's own work, longer than the whole timeout
            holder = asyncio.create_task(hold_briefly())
            await asyncio.sleep(0.1)  # the other session has the lock
        return done

    monkeypatch.setattr(migrations, "_migrate_once", long_first_revision)
    engine = create_engine(TrackerConfig(database_url=empty_pg_url))
    try:
        await migrate(engine, timeout_s=1.0)
        assert await current_revision(engine) == migrations.head_revision()
    finally:
        if holder is not None:
            await holder
        await engine.dispose()

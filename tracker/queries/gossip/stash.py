"""The temporary tables a snapshot import stashes peer rows and samples in (``gossip.importer``).

A peer's samples must be merged with it, and a snapshot file does not put them together (the
exporter writes every peer row, then every sample): held in memory, a million-peer snapshot did not
fit. They wait here, in the import's own transaction, and are read back a page of peers at a time
with each peer's newest samples. Dropped with the transaction (Postgres: ``ON COMMIT DROP``; SQLite
keeps a connection's temporary tables, so they are dropped before and after).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Double,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    and_,
    bindparam,
    func,
    select,
)
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.schema import CreateIndex, CreateTable, DropTable

_temp = MetaData()
PEER_COLUMNS = (
    "origin",
    "peer",
    "first_seen",
    "online",
    "online_since",
    "last_seen",
    "uptime_s",
    "served",
    "failed",
    "success_weight",
    "failure_weight",
    "evidence_at",
    "updated_at",
)
import_peers = Table(
    "tracker_import_peers",
    _temp,
    Column("seq", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=False),
    Column("origin", Text, nullable=False),
    Column("peer", Text, nullable=False),
    Column("first_seen", Double, nullable=False),
    Column("online", Boolean, nullable=False),
    Column("online_since", Double),
    Column("last_seen", Double, nullable=False),
    Column("uptime_s", Double, nullable=False),
    Column("served", BigInteger, nullable=False),
    Column("failed", BigInteger, nullable=False),
    Column("success_weight", Double, nullable=False),
    Column("failure_weight", Double, nullable=False),
    Column("evidence_at", Double),
    Column("updated_at", Double, nullable=False),
    prefixes=["TEMPORARY"],
    postgresql_on_commit="DROP",
)
import_samples = Table(
    "tracker_import_samples",
    _temp,
    Column("origin", Text, nullable=False),
    Column("peer", Text, nullable=False),
    Column("at", Double, nullable=False),
    Column("bytes_per_sec", BigInteger, nullable=False),
    prefixes=["TEMPORARY"],
    postgresql_on_commit="DROP",
)
_samples_by_peer = Index("tracker_import_samples_peer", import_samples.c.origin, import_samples.c.peer)


async def create_tables(conn: AsyncConnection) -> None:
    # Dropped first: on SQLite a connection keeps its temporary tables across transactions.
    for table in (import_samples, import_peers):
        await conn.execute(DropTable(table, if_exists=True))
    for table in (import_peers, import_samples):
        await conn.execute(CreateTable(table))


async def index_tables(conn: AsyncConnection) -> None:
    """Once the tables are full: built at once, the index costs less than kept up row by row (on
    Postgres, with ``ANALYZE``, so that the pages' joins probe it rather than hash the table)."""
    await conn.execute(CreateIndex(_samples_by_peer))
    if conn.dialect.name == "postgresql":
        await conn.exec_driver_sql("ANALYZE tracker_import_peers, tracker_import_samples")


async def drop_tables(conn: AsyncConnection) -> None:
    for table in (import_samples, import_peers):
        await conn.execute(DropTable(table, if_exists=True))


_p, _s = import_peers.c, import_samples.c
_PAGE = (
    select(_p.seq, *(_p[name] for name in PEER_COLUMNS))
    .where(_p.seq.between(bindparam("first"), bindparam("last")))
    .order_by(_p.seq)
)
_ranked = (
    select(
        _p.seq,
        _s.at,
        _s.bytes_per_sec,
        func.row_number()
        .over(partition_by=_p.seq, order_by=(_s.at.desc(), _s.bytes_per_sec.desc()))
        .label("rn"),
    )
    .join_from(import_peers, import_samples, and_(_s.origin == _p.origin, _s.peer == _p.peer))
    .where(_p.seq.between(bindparam("first"), bindparam("last")))
    .subquery("ranked")
)
#: Each peer's newest ``window`` samples, newest first (ties: the higher speed first), as
#: ``sorted(samples, reverse=True)[:window]`` made them when a whole file was read.
_PAGE_SAMPLES = (
    select(_ranked.c.seq, _ranked.c.at, _ranked.c.bytes_per_sec)
    .where(_ranked.c.rn <= bindparam("window"))
    .order_by(_ranked.c.seq, _ranked.c.rn)
)


async def page(conn: AsyncConnection, first: int, last: int, window: int) -> tuple[list[Any], list[Any]]:
    """Stashed peer rows ``first`` to ``last`` (their ``seq``, file order), and their newest
    ``window`` samples as (seq, at, bytes_per_sec)."""
    bounds = {"first": first, "last": last}
    rows = (await conn.execute(_PAGE, bounds)).all()
    samples = (await conn.execute(_PAGE_SAMPLES, {**bounds, "window": window})).all()
    return list(rows), list(samples)

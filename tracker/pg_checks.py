"""What a tracker checks of the PostgreSQL server it is given, when it opens: settings it cannot work
well without, said once in the log rather than found out from a slow swarm."""

from __future__ import annotations

import logging

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from . import schema

log = logging.getLogger("tracker.postgres")


async def warn_without_vacuum(engine: AsyncEngine) -> bool:
    """Log a warning when autovacuum cannot run on the server; whether it can.

    Every heartbeat rewrites its peer's row, so the tracker's tables make dead rows all the time.
    With autovacuum off nothing reclaims them: in QA round 24's soak ``peer_stats`` held 7,600 live
    rows and 391,000 dead ones after 25 minutes, the database tripled, and selections took three
    times as long until a manual VACUUM. A diagnosis only: a failure to ask is not the tracker's.
    """
    try:
        async with engine.connect() as conn:
            row = (
                await conn.execute(
                    text("SELECT current_setting('autovacuum'), current_setting('track_counts')")
                )
            ).one()
    except Exception:  # the server answered the migration; this is advice, not a requirement
        return True
    autovacuum, track_counts = (str(value).lower() for value in row)
    tables_ok = await _warn_tables_without_vacuum(engine)
    if autovacuum == "on" and track_counts == "on":
        return tables_ok
    log.warning(
        "autovacuum cannot run on this PostgreSQL server (autovacuum = %s, track_counts = %s): the "
        "tracker rewrites a peer's row at every heartbeat, and without vacuum the dead rows pile up, "
        "the tables grow and selections slow down. Turn both on (docs/operations.md, 'Several tracker "
        "processes on one PostgreSQL'), or VACUUM the tracker's tables often",
        autovacuum,
        track_counts,
        extra={"action": "postgres_autovacuum_off"},
    )
    return False


#: What Postgres reads as false in a boolean storage parameter (``parse_bool``: unique prefixes).
_FALSE = ("0", "f", "fa", "fal", "fals", "false", "n", "no", "of", "off")


async def _warn_tables_without_vacuum(engine: AsyncEngine) -> bool:
    """Log a warning naming the tracker's tables whose own storage parameters turn autovacuum off
    (``ALTER TABLE ... SET (autovacuum_enabled = off)``); whether there are none.

    The server's setting said nothing of those: with autovacuum on, a ``peer_stats`` set apart (by
    an operator's bulk load, say, never set back) piled up dead rows just the same, unwarned."""
    names = sorted(schema.metadata.tables)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                text(
                    "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                    " WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p')"
                    " AND c.relname = ANY(:names) AND EXISTS (SELECT 1 FROM unnest(c.reloptions) o"
                    " WHERE lower(split_part(o, '=', 1)) = 'autovacuum_enabled'"
                    " AND lower(split_part(o, '=', 2)) = ANY(:false)) ORDER BY c.relname"
                ),
                {"names": names, "false": list(_FALSE)},
            )
            off = [str(name) for (name,) in rows]
    except Exception:  # advice, not a requirement
        return True
    if not off:
        return True
    log.warning(
        "autovacuum is turned off for the tracker's table(s) %s (ALTER TABLE ... SET "
        "(autovacuum_enabled = off)): their dead rows pile up and selections slow down. Turn it back "
        "on with ALTER TABLE ... RESET (autovacuum_enabled), or VACUUM them often",
        ", ".join(off),
        extra={"action": "postgres_autovacuum_off_tables", "tables": off},
    )
    return False


async def warn_without_utf8(engine: AsyncEngine) -> bool:
    """Log a warning when the database's encoding is not UTF8; whether it is.

    Ids are any Unicode (docs/api.md); a database of another encoding refuses the characters it
    lacks, and those requests fail with 422 ``invalid_input`` (``errors.UnstorableInput``). Said
    once at the start rather than found out from the first peer with such an id (QA round 40).
    """
    try:
        async with engine.connect() as conn:
            encoding = str((await conn.execute(text("SELECT current_setting('server_encoding')"))).scalar())
    except Exception:  # advice, not a requirement
        return True
    if encoding.upper() in ("UTF8", "UTF-8"):
        return True
    log.warning(
        "this PostgreSQL database's encoding is %s, not UTF8: peer and content ids with characters "
        "outside it are refused (422). Create the tracker's database with ENCODING 'UTF8' "
        "(docs/operations.md, 'Several tracker processes on one PostgreSQL')",
        encoding,
        extra={"action": "postgres_not_utf8", "encoding": encoding},
    )
    return False

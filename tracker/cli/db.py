"""``tracker db``: the schema's version, and moving it (Alembic, run in-process).

These commands open a bare engine, never a tracker: opening a tracker would migrate, and ``check`` must
report the schema as it is.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer
from sqlalchemy.ext.asyncio import AsyncEngine

from .. import db, migrations
from ..config import TrackerConfig
from ..drift import schema_drift
from ..errors import InvalidInput
from ._common import (
    DatabaseUrlOption,
    DebugOption,
    JsonOption,
    app,
    config_for,
    discard_created_sqlite,
    errors_as_messages,
    print_json,
    require_existing_sqlite,
    run,
    stdout,
)

T = TypeVar("T")
#: Differences named on `db check`'s one line; the rest are counted.
_SHOWN_DIFFERENCES = 10

db_app = typer.Typer(no_args_is_help=True, help="Show or change the database schema version (migrations).")
app.add_typer(db_app, name="db")


async def _with_engine(config: TrackerConfig, work: Callable[[AsyncEngine], Awaitable[T]]) -> T:
    engine = db.create_engine(config)
    try:
        return await work(engine)
    finally:
        await engine.dispose()


async def _state(engine: AsyncEngine) -> tuple[str | None, str | None]:
    return await migrations.current_revision(engine), migrations.head_revision()


async def _checked(engine: AsyncEngine) -> tuple[str | None, str | None, list[str]]:
    """``_state``, and at the newest revision how the schema differs from what it makes."""
    at, head = await _state(engine)
    return at, head, await schema_drift(engine) if at == head else []


@db_app.command()
def upgrade(
    revision: Annotated[str, typer.Option(help="Target revision.")] = "head",
    database_url: DatabaseUrlOption = None,
    debug: DebugOption = False,
) -> None:
    """Bring the schema up to `--revision` (default: the newest). Creates an SQLite file if needed.

    Safe to run from several processes at once (they take turns); a no-op when already there.
    """
    with errors_as_messages(debug):
        config = config_for(database_url)
        # Before the file is created: a failed command leaves a file it put in WAL mode in place.
        migrations.require_known_revision(revision)

        async def work(engine: AsyncEngine) -> tuple[str | None, str | None]:
            before = await migrations.current_revision(engine)
            await db.ensure_wal(engine)
            await migrations.migrate(engine, revision, timeout_s=config.migration_timeout_s)
            return before, await migrations.current_revision(engine)

        db.require_creatable(config)
        created = db.missing_sqlite_file(config)
        try:
            before, after = run(_with_engine(config, work))
        except BaseException:
            if created is not None:
                discard_created_sqlite(created)
            raise
        # `--revision base` leaves no revision: "schema at None" said nothing (QA round 49).
        said = f"schema at {after or 'base (empty)'} (was {before or 'empty'})"
        if after is not None and after == before and revision not in ("head", "heads", after):
            # An upgrade never goes down: "schema at 0017 (was 0017)" for --revision 0005 read as done.
            said += f"; already past {revision}: `tracker db downgrade {revision}` takes it down"
        stdout.print(said, highlight=False)


# A relative step (`-1`) reads as an option to Click: "No such option: -1" (QA round 59 #10g). Unknown
# options come through as the revision instead, and one that is not a step is refused as Click would.
@db_app.command(context_settings={"ignore_unknown_options": True})
def downgrade(
    revision: Annotated[
        str,
        typer.Argument(help="Revision to go down to: a number, `-1` (one step), or `base` (every table)."),
    ],
    database_url: DatabaseUrlOption = None,
    debug: DebugOption = False,
) -> None:
    """Take the schema down to REVISION (required: there is no default for destroying data).

    Downgrades drop what later migrations added, with its data. `base` drops every tracker table.
    """
    if revision.startswith("-") and not revision[1:].isdigit():
        raise typer.BadParameter(f"no such option: {revision.split('=', 1)[0]}", param_hint="'REVISION'")
    with errors_as_messages(debug):
        config = config_for(database_url)
        migrations.require_known_revision(revision)
        require_existing_sqlite(config)

        async def work(engine: AsyncEngine) -> str | None:
            await migrations.migrate(engine, revision, downgrade=True, timeout_s=config.migration_timeout_s)
            return await migrations.current_revision(engine)

        after = run(_with_engine(config, work))
        stdout.print(f"schema at {after or 'base (empty)'}", highlight=False)


@db_app.command()
def current(
    database_url: DatabaseUrlOption = None, as_json: JsonOption = False, debug: DebugOption = False
) -> None:
    """Show the schema's revision and whether it is the newest this tracker knows."""
    with errors_as_messages(debug):
        config = config_for(database_url)
        require_existing_sqlite(config)
        at, head = run(_with_engine(config, _state))
        if as_json:
            print_json({"current": at, "head": head, "up_to_date": at == head})
        else:
            ahead = migrations.unknown_revision_problem(at)
            note = "up to date" if at == head else f"behind: the newest is {head}"
            note = f"unknown to this tracker: {ahead}" if ahead else note
            stdout.print(f"{at or 'empty (no schema)'} ({note})", highlight=False)


@db_app.command()
def check(database_url: DatabaseUrlOption = None, debug: DebugOption = False) -> None:
    """Exit 0 when the schema is at the newest revision and is what that revision makes, 1 (with one
    line saying why) otherwise: a column, index, constraint or default missing or changed by hand
    (a partial index's condition too), a view missing, or a column, constraint or unique index
    added to the tracker's tables.

    For deployment scripts: run `tracker db upgrade` when this fails.
    """
    with errors_as_messages(debug):
        config = config_for(database_url)
        require_existing_sqlite(config)
        at, head, differences = run(_with_engine(config, _checked))
        if problem := migrations.unknown_revision_problem(at):
            raise InvalidInput(problem)
        if at != head:
            raise InvalidInput(
                f"schema at {at or 'empty'}, this tracker needs {head}: run `tracker db upgrade`"
            )
        if differences:
            shown = "; ".join(differences[:_SHOWN_DIFFERENCES])
            more = len(differences) - _SHOWN_DIFFERENCES
            raise InvalidInput(
                f"schema at {at}, but not the schema {at} makes: {shown}"
                f"{f' (and {more} more)' if more > 0 else ''}. Changed by hand? Put it back (a backup, "
                "or the statements of the migrations in alembic/versions), or migrate into an empty "
                "database and copy the rows over"
            )
        stdout.print(f"schema at {at}: up to date", highlight=False)

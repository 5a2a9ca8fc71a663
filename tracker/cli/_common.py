"""What every ``tracker`` command shares: the app, options, running async bodies, errors, output.

Each command opens an ``AvailabilityTracker`` (or, for ``db``, a bare engine), calls the API and renders
the answer with Rich, or as JSON with ``--json`` for scripts. Every error becomes one line on stderr and
exit code 1; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Coroutine, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import click
import typer
from rich.console import Console
from rich.text import Text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from ..config import TrackerConfig
from ..core import AvailabilityTracker
from ..errors import InvalidInput, TrackerError

T = TypeVar("T")

app = typer.Typer(
    name="tracker",
    no_args_is_help=True,
    rich_markup_mode="markdown",
    add_completion=False,
    # Locals can hold whole event batches; a traceback (with --debug) should stay readable.
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _root() -> None:
    """Track the peers of a P2P CDN and pick the best ones to download each content from.

    Every command is a thin shell over the Python API (see README.md); run `tracker COMMAND --help`.
    """


DebugOption = Annotated[
    bool,
    typer.Option("--debug", envvar="TRACKER_DEBUG", help="On error, show the full traceback."),
]
DatabaseUrlOption = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        envvar="TRACKER_DATABASE_URL",
        help="sqlite+aiosqlite:///PATH or postgresql+asyncpg://USER@HOST/DB (default: ./tracker.db).",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON (stable keys) instead of tables.")]

stdout = Console()


def run(work: Coroutine[Any, Any, T]) -> T:
    """Run one command's async body on a fresh event loop, closed afterwards so nothing leaks."""
    return asyncio.run(work)


@contextmanager
def errors_as_messages(debug: bool) -> Iterator[None]:
    """Turn any error into one line on stderr and exit 1; ``--debug`` raises it with its traceback.

    Not only the tracker's own errors: a database that does not exist, a file that is not one, an
    unknown migration revision or a malformed URL surface from the driver, Alembic or SQLAlchemy,
    and a user needs their first line, not hundreds of lines of traceback. Click's own exits and
    usage errors pass through untouched.
    """
    try:
        yield
    except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
        raise
    except Exception as error:
        if debug:
            raise
        # A driver error wrapped by SQLAlchemy: the driver's sentence, not the SQL and the link.
        cause = error.orig if isinstance(error, DBAPIError) and error.orig is not None else error
        lines = str(cause).strip().splitlines() or [type(cause).__name__]
        ours = isinstance(error, TrackerError | OSError | DBAPIError)  # their sentence says it all
        first = lines[0] if ours else f"{type(cause).__name__}: {lines[0]}"
        message = Text.assemble(("error: ", "bold red"), first)
        if len(lines) > 1 or not ours:
            message.append(" (--debug for details)", style="dim")
        Console(stderr=True).print(message, soft_wrap=True, highlight=False)
        raise typer.Exit(1) from None


def config_for(database_url: str | None, **overrides: Any) -> TrackerConfig:
    """The tracker's configuration from ``TRACKER_*`` variables, with the command's options on top."""
    if database_url is not None:
        overrides["database_url"] = database_url
    return TrackerConfig.from_env(**overrides)


def require_existing_sqlite(config: TrackerConfig) -> None:
    """Refuse to create an SQLite file by reading from it: a typo in a path should not look like an
    empty swarm."""
    if config.dialect != "sqlite":
        return
    database = make_url(config.database_url).database
    if database and database != ":memory:" and not Path(database).exists():
        raise InvalidInput(
            f"no database at {database}; create it with `tracker db upgrade` or `tracker serve`"
        )


@asynccontextmanager
async def opened(database_url: str | None, *, create: bool = False) -> AsyncIterator[AvailabilityTracker]:
    """An existing tracker database, opened without migrating it (a read must not change the schema);
    with ``create``, for commands that write state in (gossip import and push), created and migrated
    like ``tracker serve`` does. ``TRACKER_AUTO_MIGRATE``, when set, decides either way."""
    explicit = "TRACKER_AUTO_MIGRATE" in os.environ
    config = config_for(database_url, **({} if explicit else {"auto_migrate": create}))
    if not create:
        require_existing_sqlite(config)
    async with AvailabilityTracker(config) as tracker:
        yield tracker


def print_json(value: Any) -> None:
    """JSON on stdout: plain ``print`` (Rich would wrap long lines and break the document)."""
    typer.echo(json.dumps(value, indent=2, default=str))

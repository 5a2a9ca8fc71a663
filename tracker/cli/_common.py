"""What every ``tracker`` command shares: the app, options, running async bodies, errors, output.

Each command opens an ``AvailabilityTracker`` (or, for ``db``, a bare engine), calls the API and renders
the answer with Rich, or as JSON with ``--json`` for scripts. Every error becomes one line on stderr and
exit code 1; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import asyncio
import difflib
import json
import os
import signal
import socket
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import click
import typer
from rich.console import Console
from rich.text import Text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError

from ..config import TrackerConfig, _without_password, env_value
from ..core import AvailabilityTracker
from ..db import is_driver_error, missing_sqlite_file, refuse_sqlite_directory
from ..errors import InvalidInput, TrackerError
from .render import iso_time

T = TypeVar("T")

app = typer.Typer(
    name="tracker",
    no_args_is_help=True,
    rich_markup_mode="markdown",
    add_completion=False,
    # Locals can hold whole event batches; a traceback (with --debug) should stay readable.
    pretty_exceptions_show_locals=False,
)


def _print_version(wanted: bool) -> None:
    if wanted:
        from .. import __version__

        typer.echo(f"peer-tracker {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
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
        # Not envvar=: Click took a TRACKER_DATABASE_URL of blanks for a URL, where every other
        # variable of blanks is unset (QA round 74); TrackerConfig.from_env reads it as they are read.
        help="sqlite+aiosqlite:///PATH or postgresql+asyncpg://USER@HOST/DB "
        "(default: TRACKER_DATABASE_URL, else ./tracker.db).",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON (stable keys) instead of tables.")]


def console(*, stderr: bool = False) -> Console:
    """A Rich console that prints text as it is: with markup on, a peer id ``evil[/]`` (any client
    may register one) made ``peers list`` fail with a MarkupError, ``[red]r`` printed as ``r`` (and a
    paging cursor that skipped peers), and ``[link=...]`` made a clickable link (QA round 59)."""
    return Console(stderr=stderr, markup=False)


def _stdout_console() -> Console:
    """Rich lays out for 80 columns when stdout is a pipe or a file, cutting peer ids to "…" in what
    scripts and operators save; there, tables take their natural width (``COLUMNS`` still wins)."""
    if os.isatty(1) or os.environ.get("COLUMNS", "").isdigit():
        return Console(markup=False)
    return Console(width=_PIPED_WIDTH, markup=False)


# Wide enough for every column at its longest (ids are at most 256 characters); tables never stretch.
_PIPED_WIDTH = 4096
stdout = _stdout_console()


# Python names a thread "Thread-N (target)"; aiosqlite runs each connection on one with this target.
_SQLITE_WORKER_SUFFIX = "(_connection_worker_thread)"
# Bounded because a connection someone leaked keeps its worker alive forever (in-process callers only:
# a process would wait for that non-daemon thread at exit anyway).
_SQLITE_WORKER_JOIN_TIMEOUT_S = 5.0


def run(work: Coroutine[Any, Any, T], *, stop_on_sigterm: bool = True) -> T:
    """Run one command's async body on a fresh event loop, closed afterwards so nothing leaks.

    The loop closes only after the aiosqlite workers the body started have finished: when a connect
    fails (a directory that does not exist), aiosqlite stops its worker without waiting for it, and a
    worker that then answers a closed loop dies printing a traceback under the one-line error.

    SIGTERM (``timeout``, cron wrappers, systemd) stops the body as Ctrl-C does, by cancelling it, so
    its clean-up runs, then exits 143: killed outright, ``gossip export`` left its half-written
    temporary file behind (QA round 59). ``serve`` handles its signals itself (``stop_on_sigterm=False``).
    """
    before = set(threading.enumerate())
    terminated = False

    async def body() -> T:
        if not stop_on_sigterm or threading.current_thread() is not threading.main_thread():
            return await work
        loop, task = asyncio.get_running_loop(), asyncio.current_task()
        assert task is not None

        def terminate() -> None:
            nonlocal terminated
            terminated = True
            task.cancel()

        previous = signal.getsignal(signal.SIGTERM)
        loop.add_signal_handler(signal.SIGTERM, terminate)
        try:
            return await work
        finally:
            loop.remove_signal_handler(signal.SIGTERM)  # which leaves SIG_DFL, whatever was there
            # A program running the CLI in-process (CliRunner, a test suite) keeps its own handler
            # (QA round 61).
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)

    with asyncio.Runner() as runner:
        try:
            return runner.run(body())
        except asyncio.CancelledError:
            if terminated:
                raise SystemExit(128 + signal.SIGTERM) from None
            raise
        finally:
            _join_sqlite_workers(set(threading.enumerate()) - before)


def _join_sqlite_workers(started: set[threading.Thread]) -> None:
    for thread in started:
        if thread.name.endswith(_SQLITE_WORKER_SUFFIX):
            thread.join(_SQLITE_WORKER_JOIN_TIMEOUT_S)


@contextmanager
def errors_as_messages(debug: bool) -> Iterator[None]:
    """Turn any error into one line on stderr and exit 1; ``--debug`` raises it with its traceback.

    Not only the tracker's own errors: a database that does not exist, a file that is not one, an
    unknown migration revision or a malformed URL surface from the driver, Alembic or SQLAlchemy,
    and a user needs their first line, not hundreds of lines of traceback. Click's own exits and
    usage errors pass through untouched, and so do ``KeyboardInterrupt`` and ``SystemExit``.
    """
    try:
        yield
    except (
        click.exceptions.Exit,
        click.exceptions.Abort,
        click.ClickException,
        typer.Exit,
        typer.Abort,
        typer.BadParameter,
    ):
        # Typer's own Exit, Abort and usage errors are not Click's since Typer 0.22 (a command's
        # `Exit(1)`, `BadParameter` for options that are wrong together: exit 2, with the usage).
        raise
    except Exception as error:
        if debug:
            raise
        if isinstance(error, BrokenPipeError):
            # The reader of stdout went away (`| head`, `| true`): nothing to say to it, and it was
            # called "cannot connect to the database" (a BrokenPipeError is a ConnectionError, QA 59).
            _silence_stdout()
            raise typer.Exit(1) from None
        console(stderr=True).print(_one_line(error), soft_wrap=True, highlight=False)
        raise typer.Exit(1) from None


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit does not fail a second time."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)


# Their exceptions are sentences written for whoever runs the command ("Can't locate revision
# identified by '9999'", "file is not a database"); matched by module so that no command imports
# Alembic or asyncpg just to recognise their errors.
_SPEAKING_MODULES = frozenset({"alembic", "asyncpg", "sqlite3"})


def _one_line(error: Exception) -> Text:
    """``error: `` and the first line of what went wrong; a class name only where the sentence needs
    it, and a pointer to ``--debug`` when the rest was cut."""
    advice = error.advice if isinstance(error, TrackerError) else None
    if (
        isinstance(error, TrackerError)
        and error.translated
        and isinstance(error.__cause__, Exception)
        and is_driver_error(error.__cause__)
    ):
        error = error.__cause__  # the tracker's StorageError around a driver error: the driver speaks
    # A driver error wrapped by SQLAlchemy: the driver's sentence, not the SQL and the link.
    cause = error.orig if isinstance(error, DBAPIError) and error.orig is not None else error
    lines = str(cause).strip().splitlines() or [type(cause).__name__]
    speaks = isinstance(error, TrackerError | OSError | DBAPIError) or (
        type(cause).__module__.partition(".")[0] in _SPEAKING_MODULES
    )
    first = lines[0] if speaks else f"{type(cause).__name__}: {lines[0]}"
    if isinstance(cause, ConnectionError | socket.gaierror):  # the driver's "Connect call failed"
        first = f"cannot connect to the database: {first}"
    first += _server_detail(cause) + (f" ({advice})" if advice and advice not in first else "")
    message = Text.assemble(("error: ", "bold red"), first)
    if len(lines) > 1 or not speaks:
        message.append(" (--debug for details)", style="dim")
    return message


def _server_detail(cause: BaseException) -> str:
    """What Postgres said beside its message: its DETAIL and HINT. "cannot alter type of a column
    used by a view or rule" alone left an operator whose own view blocked a migration to guess which
    view; the DETAIL names it (QA round 15). asyncpg keeps them on its error, which SQLAlchemy's
    adapter wraps."""
    for error in (cause, cause.__cause__):
        detail, hint = getattr(error, "detail", None), getattr(error, "hint", None)
        if isinstance(detail, str) or isinstance(hint, str):
            said = f" ({detail})" if isinstance(detail, str) and detail else ""
            return said + (f" hint: {hint}" if isinstance(hint, str) and hint else "")
    return ""


#: This project's variables that are no setting: the CLI's own, and the test suite's and benchmarks'.
_NOT_SETTINGS = frozenset(
    {
        "TRACKER_DEBUG",
        "TRACKER_TEST_POSTGRES_URL",
        "TRACKER_REQUIRE_POSTGRES",
        "TRACKER_BENCH_POSTGRES_URL",
        "TRACKER_BENCH_REDIS_URL",
    }
)


def unknown_variables(settings: frozenset[str], environ: Mapping[str, str] | None = None) -> list[str]:
    """A sentence for each ``TRACKER_*`` variable that is set but read by no setting, with the
    setting it most likely meant: ``TRACKER_PEER_TIMOUT=60`` left peers timing out after the
    default 300 s without a word (QA round 16)."""
    env = os.environ if environ is None else environ
    known = settings | _NOT_SETTINGS
    found = []
    for name in sorted(key for key in env if key.startswith("TRACKER_") and key not in known):
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.8)
        meant = f" (did you mean {close[0]}?)" if close else ""
        found.append(f"{name} is set, but no setting of this tracker has that name: ignored{meant}")
    return found


def config_for(database_url: str | None, *, warn: bool = True, **overrides: Any) -> TrackerConfig:
    """The tracker's configuration from ``TRACKER_*`` variables, with the command's options on top;
    ``warn``: say on stderr which ``TRACKER_*`` variables no setting reads (``serve`` logs them)."""
    if database_url is not None:
        overrides["database_url"] = database_url
    config = TrackerConfig.from_env(**overrides)
    _check_url(config.database_url)
    if warn:
        _warn_of_unknown_variables()
    return config


#: Variables already warned of by this process (a command may build its config more than once).
_warned: set[str] = set()


def _warn_of_unknown_variables() -> None:
    """``tracker serve`` logs a mistyped ``TRACKER_*`` variable; every other command ignored it
    without a word, and ``TRACKER_PEER_TIMOUT`` set for a cron job's ``tracker sweep`` timed peers
    out after the default 300 s (QA round 59). The service's and gossip's variables count as known:
    the commands run with the service's environment."""
    from ..gossip.config import GossipConfig
    from ..service.settings import ServiceSettings

    known = TrackerConfig.env_names() | ServiceSettings.env_names() | GossipConfig.env_names()
    for warning in unknown_variables(known):
        if warning not in _warned:
            _warned.add(warning)
            console(stderr=True).print(f"warning: {warning}", soft_wrap=True, highlight=False)


def unless_in_env(**defaults: Any) -> dict[str, Any]:
    """A command's own defaults, minus those whose ``TRACKER_*`` variable is set: options win over the
    environment, and the environment over defaults, the command's as much as the library's."""
    return {
        name: value
        for name, value in defaults.items()
        if env_value(os.environ, f"TRACKER_{name.upper()}") is None
    }


def _check_url(database_url: str) -> None:
    """SQLAlchemy parses the URL only when a command connects, and its complaint (``invalid literal
    for int()`` for a port that is not a number) does not say that the URL is what is wrong."""
    try:
        make_url(database_url)
    except (ArgumentError, ValueError) as error:
        reason = _without_password(str(error), database_url)
        raise InvalidInput(f"the database URL is not valid: {reason}") from error


def require_existing_sqlite(config: TrackerConfig) -> None:
    """Refuse to create an SQLite file by reading from it: a typo in a path should not look like an
    empty swarm."""
    refuse_sqlite_directory(config)  # SQLite said only "unable to open database file"
    if database := missing_sqlite_file(config):
        raise InvalidInput(
            f"no database at {database}; create it with `tracker db upgrade` or `tracker serve`"
        )


@asynccontextmanager
async def opened(database_url: str | None, *, create: bool = False) -> AsyncIterator[AvailabilityTracker]:
    """An existing tracker database, opened without migrating it (a read must not change the schema);
    with ``create``, for commands that write state in (gossip import and push), created and migrated
    like ``tracker serve`` does. ``TRACKER_AUTO_MIGRATE``, when set, decides either way. Never publishes
    its settings: the views keep computing with those of the trackers that serve the database."""
    # No sweeper, whatever TRACKER_RUN_SWEEPER says: a command run with the service's environment
    # swept and needed (or made) the service's snapshot_dir (QA round 74).
    config = config_for(database_url, run_sweeper=False, **unless_in_env(auto_migrate=create))
    if not create:
        require_existing_sqlite(config)
    created = missing_sqlite_file(config)
    try:
        async with AvailabilityTracker(config, publish_settings=False) as tracker:
            yield tracker
    except BaseException:
        if created is not None:
            discard_created_sqlite(created)
        raise


def discard_created_sqlite(path: str) -> None:
    """Remove the SQLite file a failed command created, while nobody can have begun using it: still
    0 bytes, with no ``-wal``, ``-shm`` or ``-journal`` beside it. Left behind, later commands took it
    for an empty database instead of saying there is none (QA round 40: a failed ``db upgrade``).

    Any tracker puts a file in WAL mode first thing when it opens it, which writes its header and
    makes the ``-wal`` and ``-shm`` files, so a file another process opened since this command created
    it stays. Looking for tables deleted the file a starting ``tracker serve`` was migrating (QA
    round 62), and taking its lock as well, one that process had opened but not yet written or was
    waiting to write (QA round 65): it went on in a deleted file. What remains is the moment between
    another process's connecting and its first statement. A file this command itself put in WAL
    mode stays too, with no schema: commands then say so ("empty"), and `tracker db upgrade` fills it."""
    try:
        if Path(path).stat().st_size > 0:
            return
        if any(Path(path + suffix).exists() for suffix in ("-wal", "-shm", "-journal")):
            return
        Path(path).unlink()
    except OSError:
        return  # gone already, or not ours to remove


def print_json(value: Any) -> None:
    """JSON on stdout: plain ``print`` (Rich would wrap long lines and break the document)."""
    typer.echo(json.dumps(value, indent=2, default=_jsonable))


def _jsonable(value: object) -> str:
    """Times as ISO 8601 (``T``-separated, as ``peers show`` and the HTTP API write them): ``str``
    of a datetime separates with a space (QA round 10)."""
    return str(iso_time(value)) if isinstance(value, datetime) else str(value)

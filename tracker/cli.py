"""The ``tracker`` command: a thin shell over the Python API, one subcommand per job.

Each command opens an ``AvailabilityTracker``, calls the API and renders the answer with Rich (or as
JSON for scripts). Errors the tracker raises on purpose become one line on stderr and exit code 1;
``--debug`` shows the traceback instead. New commands (``serve``, ``db``, ``peers``, ...) are functions
decorated with ``@app.command()`` that run their async body through :func:`_run`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from .config import TrackerConfig
from .core import AvailabilityTracker
from .demo import ProgressCallback, SwarmSpec, load_swarm, plan_swarm
from .errors import InvalidInput, TrackerError
from .models import PeerInfo

T = TypeVar("T")

app = typer.Typer(
    name="tracker",
    no_args_is_help=True,
    rich_markup_mode="markdown",
    add_completion=False,
    # Locals can hold whole event batches; a traceback (with --debug) should stay readable.
    pretty_exceptions_show_locals=False,
)

DebugOption = Annotated[
    bool,
    typer.Option("--debug", envvar="TRACKER_DEBUG", help="On error, show the full traceback."),
]


@app.callback()
def _root() -> None:
    """Track the peers of a P2P CDN and pick the best ones to download each content from.

    Every command is a thin shell over the Python API (see README.md); run `tracker COMMAND --help`.
    """
    # A callback keeps `demo` a subcommand even while it is the only one.


def main() -> None:
    """Console-script entry point (``tracker``) and what ``python -m tracker`` runs."""
    app(prog_name="tracker")


# ---------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DemoSelection:
    """The answer for one content: the best peers, and how many online holders they were chosen from."""

    cid: str
    holders_online: int
    peers: list[PeerInfo]


@dataclass(frozen=True, slots=True)
class DemoReport:
    """What ``tracker demo`` built and found, rendered as tables or as JSON."""

    database: Path
    spec: SwarmSpec
    events: int
    mappings: int
    load_s: float
    selections: list[DemoSelection]

    @property
    def events_per_sec(self) -> float:
        """Ingest throughput through ``record_batch``."""
        return self.events / self.load_s if self.load_s > 0 else 0.0


@app.command()
def demo(
    database: Annotated[
        Path, typer.Option("--database", help="SQLite file to (re)create; its -wal/-shm go too.")
    ] = Path("tracker-demo.db"),
    peers: Annotated[int, typer.Option(min=1, help="Peers in the swarm.")] = 1_000,
    contents: Annotated[int, typer.Option(min=1, help="Contents in the swarm.")] = 10_000,
    holders: Annotated[int, typer.Option(min=1, help="Distinct peers holding each content.")] = 5,
    show: Annotated[int, typer.Option(min=0, help="Contents to pick peers for (the first ones).")] = 5,
    best: Annotated[int, typer.Option("-n", "--best", min=1, help="Peers to pick per content.")] = 3,
    seed: Annotated[int, typer.Option(help="Generator seed: the same seed builds the same swarm.")] = 42,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON, not tables.")] = False,
    debug: DebugOption = False,
) -> None:
    """Build a synthetic swarm in an SQLite file and show the peers the tracker would pick.

    Peers of mixed quality (reliable, flaky, bad) report an hour of heartbeats, speed samples and
    upload outcomes; a tenth of them leave; every content is announced by `--holders` random peers.
    All of it goes through `record_batch`, then `select_best_peers` ranks the holders of the first
    `--show` contents. The file is deleted and rebuilt on every run; a file that is not an SQLite database is
    never deleted.

    Example: 200 peers, 3 best of 8 holders for 2 contents, as JSON:

        tracker demo --peers 200 --contents 1000 --holders 8 --show 2 -n 3 --json
    """
    with _errors_as_messages(debug):
        spec = SwarmSpec(peers=peers, contents=contents, holders=holders, seed=seed)
        stdout, stderr = Console(), Console(stderr=True)
        with Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=stderr,
            transient=True,
            # Outside a terminal a progress bar is only noise in logs; stdout never gets one.
            disable=not stderr.is_terminal,
        ) as progress:
            task = progress.add_task("Recording events", total=None)

            def on_progress(applied: int, total: int) -> None:
                progress.update(task, completed=applied, total=total)

            report = _run(_build_demo(database, spec, show=show, best=best, on_progress=on_progress))
        if as_json:
            typer.echo(json.dumps(_demo_json(report), indent=2))
        else:
            _print_demo(stdout, report)


async def _build_demo(
    database: Path, spec: SwarmSpec, *, show: int, best: int, on_progress: ProgressCallback
) -> DemoReport:
    """Recreate ``database``, load the planned swarm, then ask for the best peers of a few contents."""
    _reset_sqlite_file(database)
    # The swarm is a snapshot of one instant: its history ends at `now` and the tracker is asked at that
    # same instant, so the ranking depends on the seed alone, not on how long loading took.
    now = time.time()
    swarm = plan_swarm(spec, now)
    config = TrackerConfig(database_url=f"sqlite+aiosqlite:///{database.resolve()}", clock=lambda: now)
    async with AvailabilityTracker(config) as tracker:
        started = time.perf_counter()
        events = await load_swarm(tracker, swarm, on_progress=on_progress)
        load_s = time.perf_counter() - started
        selections = [
            DemoSelection(
                cid=cid,
                holders_online=len(await tracker.get_available_peers(cid)),
                peers=await tracker.select_best_peers(cid, best),
            )
            for cid in swarm.content_ids[:show]
        ]
    return DemoReport(
        database=database,
        spec=spec,
        events=events,
        mappings=swarm.mappings,
        load_s=load_s,
        selections=selections,
    )


_SQLITE_HEADER = b"SQLite format 3\x00"


def _reset_sqlite_file(path: Path) -> None:
    """Delete an earlier demo database and its side files, refusing anything that is not SQLite.

    The header check is what makes ``--database`` safe to mistype: a README is never deleted.
    """
    if path.is_dir():
        raise InvalidInput(f"--database {path} is a directory, not a file")
    if not path.parent.resolve().is_dir():
        raise InvalidInput(f"--database {path}: directory {path.parent} does not exist")
    if path.exists():
        with path.open("rb") as file:
            header = file.read(len(_SQLITE_HEADER))
        if header and header != _SQLITE_HEADER:
            raise InvalidInput(f"refusing to replace {path}: it is not an SQLite database")
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def _print_demo(console: Console, report: DemoReport) -> None:
    """One table per content, then the summary line."""
    for selection in report.selections:
        title = f"{selection.cid}: best {len(selection.peers)} of {selection.holders_online} online holders"
        table = Table(title=title, title_justify="left")
        for header in ("Rank", "Peer", "Reputation", "Success", "Uptime", "Speed", "Evidence"):
            table.add_column(header, justify="left" if header == "Peer" else "right")
        for peer in selection.peers:
            table.add_row(
                str(peer.rank),
                peer.peer_id,
                f"{peer.reputation:.3f}",
                f"{peer.success_rate:.1%}",
                f"{peer.uptime_factor:.3f}",
                format_speed(peer.download_speed),
                f"{peer.evidence:.1f}",
            )
        if not selection.peers:
            table.caption = "no online holder is good enough"
        console.print(table)
    spec = report.spec
    console.print(
        f"{spec.peers:,} peers, {spec.contents:,} contents, {report.mappings:,} mappings: "
        f"{report.events:,} events recorded in {report.load_s:.1f} s "
        f"({report.events_per_sec:,.0f} events/s) into {report.database}",
        soft_wrap=True,
        highlight=False,
    )


def _demo_json(report: DemoReport) -> dict[str, Any]:
    """The same results as :func:`_print_demo`, as plain JSON types."""
    spec = report.spec
    return {
        "database": str(report.database),
        "seed": spec.seed,
        "summary": {
            "peers": spec.peers,
            "contents": spec.contents,
            "mappings": report.mappings,
            "events": report.events,
            "seconds": round(report.load_s, 3),
            "events_per_sec": round(report.events_per_sec, 1),
        },
        "contents": [
            {
                "cid": selection.cid,
                "holders_online": selection.holders_online,
                "peers": [_peer_json(peer) for peer in selection.peers],
            }
            for selection in report.selections
        ],
    }


def _peer_json(peer: PeerInfo) -> dict[str, Any]:
    return {
        "rank": peer.rank,
        "peer_id": peer.peer_id,
        "reputation": peer.reputation,
        "success_rate": peer.success_rate,
        "uptime_factor": peer.uptime_factor,
        "download_bytes_per_sec": peer.download_speed,
        "evidence": peer.evidence,
        "proven": peer.proven,
    }


_SPEED_UNITS = ("kB/s", "MB/s", "GB/s", "TB/s")


def format_speed(bytes_per_sec: float) -> str:
    """A speed the way people read it, in decimal units like network speeds.

    >>> format_speed(2_500_000), format_speed(640), format_speed(999_990)
    ('2.5 MB/s', '640 B/s', '1.0 MB/s')
    """
    value = float(bytes_per_sec)
    if abs(round(value)) < 1000.0:
        return f"{value:.0f} B/s"
    for unit in _SPEED_UNITS:
        value /= 1000.0
        # Compare after rounding, so 999_990 B/s reads "1.0 MB/s", never "1000.0 kB/s".
        if abs(round(value, 1)) < 1000.0 or unit == _SPEED_UNITS[-1]:
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------
# serve
# ---------------------------------------------------------------------------------------------


@app.command()
def serve(
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url",
            envvar="TRACKER_DATABASE_URL",
            help="sqlite+aiosqlite:///PATH or postgresql+asyncpg://USER@HOST/DB (default: ./tracker.db).",
        ),
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="Address to bind (env TRACKER_HOST; default 127.0.0.1).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Port (env TRACKER_PORT; default 8750; 0 picks a free one).")
    ] = None,
    migrate: Annotated[
        bool,
        typer.Option(
            "--migrate/--no-migrate",
            help="Upgrade the schema on start (default), or refuse to start while it is behind.",
        ),
    ] = True,
    sweeper: Annotated[
        bool, typer.Option("--sweeper/--no-sweeper", help="Run the background sweeper (default on).")
    ] = True,
    log_json: Annotated[
        bool | None, typer.Option("--log-json/--log-text", help="Log lines as JSON (env TRACKER_LOG_JSON).")
    ] = None,
    debug: DebugOption = False,
) -> None:
    """Run the tracker as an HTTP service until SIGINT or SIGTERM, then exit 0.

    Binds 127.0.0.1 by default; any other address needs `TRACKER_API_TOKEN` (writes then require
    `Authorization: Bearer TOKEN`). Every other setting comes from `TRACKER_*` variables (see
    docs/operations.md). The API's schema is served at `/docs` and `/openapi.json`.

    Example, then a query from another shell:

        tracker serve --port 8750
        curl -s 'http://127.0.0.1:8750/v1/content/CID/best?n=3'
    """
    from .service import ServiceSettings
    from .service import serve as run_service
    from .service.logs import configure_logging

    with _errors_as_messages(debug):
        overrides: dict[str, Any] = {"auto_migrate": migrate, "run_sweeper": sweeper}
        if database_url is not None:
            overrides["database_url"] = database_url
        config = TrackerConfig.from_env(**overrides)
        settings = ServiceSettings.from_env(host=host, port=port, log_json=log_json)
        configure_logging(json_lines=settings.log_json, level=settings.log_level)
        _run(run_service(config, settings))


# ---------------------------------------------------------------------------------------------
# Shared plumbing
# ---------------------------------------------------------------------------------------------


def _run(work: Coroutine[Any, Any, T]) -> T:
    """Run one command's async body on a fresh event loop, closed afterwards so nothing leaks."""
    return asyncio.run(work)


@contextmanager
def _errors_as_messages(debug: bool) -> Iterator[None]:
    """Turn a deliberate tracker error (or a file-system error) into one line on stderr and exit 1.

    Driver errors carry the SQL and a link on further lines; the first line says what went wrong and
    ``--debug`` shows the rest, with the traceback.
    """
    try:
        yield
    except (TrackerError, OSError) as error:
        if debug:
            raise
        lines = str(error).strip().splitlines() or [type(error).__name__]
        message = Text.assemble(("error: ", "bold red"), lines[0])
        if len(lines) > 1:
            message.append(" (--debug for details)", style="dim")
        Console(stderr=True).print(message, soft_wrap=True, highlight=False)
        raise typer.Exit(1) from None

"""``tracker demo``: build a synthetic swarm in an SQLite file and show whom the tracker would pick."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..config import TrackerConfig
from ..core import AvailabilityTracker
from ..demo import ProgressCallback, SwarmSpec, load_swarm, plan_swarm
from ..errors import InvalidInput
from ..models import PeerInfo
from ._common import DebugOption, app, console, errors_as_messages, run, stdout
from .render import peer_info_json, peer_table

#: The largest swarm the demo plans: it holds the plan in memory, ~40 events a peer and one a
#: mapping at ~143 bytes each, and 2,000,000,000 peers took 23.6 GB before the kernel's OOM killer
#: ended it, and other processes with it (QA round 59). At most ~1.5 GB: 200,000 peers (~1.1 GB)
#: and 2,000,000 mappings (contents x holders; a million contents of 1,000 holders each would have
#: been ~143 GB, QA round 61). The benchmarks build larger swarms (benchmarks/, --scale 1m).
MOST_PEERS = 200_000
MOST_CONTENTS = 1_000_000
MOST_MAPPINGS = 2_000_000


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
        Path,
        typer.Option(
            "--database", help="SQLite file to (re)create, -wal/-shm too; only one the demo made is replaced."
        ),
    ] = Path("tracker-demo.db"),
    peers: Annotated[int, typer.Option(min=1, max=MOST_PEERS, help="Peers in the swarm.")] = 1_000,
    contents: Annotated[int, typer.Option(min=1, max=MOST_CONTENTS, help="Contents in the swarm.")] = 10_000,
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
    with errors_as_messages(debug):
        if contents * holders > MOST_MAPPINGS:
            raise typer.BadParameter(
                f"{contents:,} contents x {holders:,} holders is {contents * holders:,} mappings; the demo "
                f"plans at most {MOST_MAPPINGS:,} in memory",
                param_hint="'--contents' / '--holders'",
            )
        spec = SwarmSpec(peers=peers, contents=contents, holders=holders, seed=seed)
        stderr = console(stderr=True)
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

            report = run(_build_demo(database, spec, show=show, best=best, on_progress=on_progress))
        if as_json:
            typer.echo(json.dumps(_demo_json(report), indent=2))
        else:
            _print_demo(stdout, report)


async def _build_demo(
    database: Path, spec: SwarmSpec, *, show: int, best: int, on_progress: ProgressCallback
) -> DemoReport:
    """Recreate ``database``, load the planned swarm, then ask for the best peers of a few contents."""
    _reset_sqlite_file(database)
    _mark_demo_file(database)
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
#: The SQLite header's application id (bytes 68-71) of a database the demo created: "ptDM".
_DEMO_APPLICATION_ID = 0x7074444D


def _mark_demo_file(path: Path) -> None:
    """Create ``path`` as an SQLite file carrying the demo's application id, written to the file
    itself (before the tracker turns on WAL, where it could sit in the log until a checkpoint)."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute(f"PRAGMA application_id = {_DEMO_APPLICATION_ID}")
        conn.commit()


def _reset_sqlite_file(path: Path) -> None:
    """Delete an earlier demo database and its side files, refusing anything else.

    These checks are what make ``--database`` safe to mistype: a README is never deleted, and
    neither is a tracker's database (QA round 6: ``tracker.db`` was, under a running ``serve``
    that went on acknowledging writes into the deleted file). Only a file the demo marked as its
    own (its application id) or an empty one is replaced.
    """
    if path.is_dir():
        raise InvalidInput(f"--database {path} is a directory, not a file")
    if not path.parent.resolve().is_dir():
        raise InvalidInput(f"--database {path}: directory {path.parent} does not exist")
    if path.exists():
        with path.open("rb") as file:
            header = file.read(72)
        if header and not header.startswith(_SQLITE_HEADER):
            raise InvalidInput(f"refusing to replace {path}: it is not an SQLite database")
        if header and int.from_bytes(header[68:72], "big") != _DEMO_APPLICATION_ID:
            raise InvalidInput(
                f"refusing to replace {path}: it is an SQLite database the demo did not create "
                "(a tracker's?); remove it yourself or give another --database"
            )
        if header and not _unused(path):
            raise InvalidInput(
                f"refusing to replace {path}: another process has it open (a `tracker serve` or "
                "another demo?); stop it first or give another --database"
            )
    try:
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
    except OSError as error:
        raise InvalidInput(
            f"cannot replace {path}: {error.strerror or error}; give another --database"
        ) from None


def _unused(path: Path) -> bool:
    """Whether no other connection has the database open. Deleted under a running ``tracker serve``,
    the file lived on in that process, which answered reads from it and wrote into the next demo's
    (QA round 74). Leaving WAL mode needs every other connection gone (each holds a lock on the
    ``-shm`` file while open), so it fails at once, changing nothing, while any is open."""
    try:
        connection = sqlite3.connect(path, timeout=0, isolation_level=None)
        try:
            mode = connection.execute("PRAGMA journal_mode=DELETE").fetchone()
        finally:
            connection.close()
    except sqlite3.Error as error:
        # Busy or locked: someone has it open. Anything else (a read-only file, a damaged one the
        # demo replaced before) says nothing of other processes: deleting is what decides (QA 75).
        return getattr(error, "sqlite_errorname", "") not in ("SQLITE_BUSY", "SQLITE_LOCKED")
    return mode is not None and str(mode[0]).lower() == "delete"


def _print_demo(out: Console, report: DemoReport) -> None:
    """One table per content, then the summary line."""
    for selection in report.selections:
        title = f"{selection.cid}: best {len(selection.peers)} of {selection.holders_online} online holders"
        out.print(peer_table(title, selection.peers, empty="no online holder is good enough"))
    spec = report.spec
    out.print(
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
                "peers": [peer_info_json(peer) for peer in selection.peers],
            }
            for selection in report.selections
        ],
    }

"""``tracker sweep``, ``tracker stats`` and ``tracker gossip export|import|push``: operating a tracker."""

from __future__ import annotations

import dataclasses
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ..core import AvailabilityTracker
from ..models import TrackerStats
from ..state_export import write_state_snapshot
from ..sweeper import SweepReport
from ._common import (
    DatabaseUrlOption,
    DebugOption,
    JsonOption,
    app,
    config_for,
    console,
    errors_as_messages,
    opened,
    print_json,
    run,
    stdout,
)
from .render import iso_time


@app.command()
def sweep(
    database_url: DatabaseUrlOption = None, as_json: JsonOption = False, debug: DebugOption = False
) -> None:
    """Run one sweeper pass now: expire stale peers, apply retention, write a snapshot if configured.

    `tracker serve` runs this every `update_interval`; this command is for cron jobs and maintenance.
    """
    with errors_as_messages(debug):

        async def work() -> SweepReport:
            async with opened(database_url) as tracker:
                return await tracker.sweep()

        # A snapshot that fails is said once, below, as the command's outcome: the service's log
        # line said it first, with its retry advice, which a one-off pass has no use for (QA round 59).
        sweeper_log = logging.getLogger("tracker.sweeper")
        sweeper_log.addFilter(_snapshot_failure_said_below)
        try:
            report = run(work())
        finally:
            sweeper_log.removeFilter(_snapshot_failure_said_below)
        shown: dict[str, Any] = {
            "ran": report.ran,
            # A time, as every other time of the JSON the CLI writes (it was Unix seconds, QA 74).
            "now": iso_time(datetime.fromtimestamp(report.now, tz=UTC)),
            "peers_marked_offline": report.peers_marked_offline,
            "departed_mappings_removed": report.departed_mappings_removed,
            "pruned": report.pruned,
            "snapshot": None if report.snapshot_path is None else str(report.snapshot_path),
            "seconds": round(report.duration_s, 3),
            "clock_leap_s": report.clock_leap_s,
            "database_clock_offset_s": report.database_clock_offset_s,
            "future_rows_clamped": report.future_rows_clamped,
            "snapshot_error": report.snapshot_error,
        }
        if as_json:
            print_json(shown)
        elif not report.ran:
            stdout.print("skipped: another tracker process holds the sweep lock", highlight=False)
        else:
            pruned = (
                ", ".join(f"{table} {rows}" for table, rows in report.pruned.items() if rows) or "nothing"
            )
            clamped = report.future_rows_clamped
            stdout.print(
                f"{report.peers_marked_offline} peers marked offline; "
                f"{report.departed_mappings_removed} mappings of departed peers removed; pruned: {pruned}; "
                + (f"{clamped} rows dated ahead brought back to now; " if clamped else "")
                + (f"snapshot {report.snapshot_path}; " if report.snapshot_path else "")
                + f"{report.duration_s:.2f} s",
                highlight=False,
            )
        if report.clock_leap_s and not as_json:
            stdout.print(
                f"this host's clock is {report.clock_leap_s:.6g} s ahead of elapsed time (a leap not "
                "accepted yet): the pass ran on elapsed time (docs/operations.md, Clocks)",
                highlight=False,
            )
        if report.snapshot_error:  # the pass's other work stands; a cron job must still see this
            console(stderr=True).print(
                f"the snapshot was not written: {report.snapshot_error}", soft_wrap=True, highlight=False
            )
            raise typer.Exit(1)


def _snapshot_failure_said_below(record: logging.LogRecord) -> bool:
    return getattr(record, "action", None) != "snapshot_failed"


@app.command()
def stats(
    database_url: DatabaseUrlOption = None, as_json: JsonOption = False, debug: DebugOption = False
) -> None:
    """Counts of peers (total, online), contents, available mappings and open leases."""
    with errors_as_messages(debug):

        async def work() -> tuple[TrackerStats, str | None]:
            async with opened(database_url) as tracker:
                return await tracker.stats(), await _revision(tracker)

        counts, revision = run(work())
        shown = {**dataclasses.asdict(counts), "schema_revision": revision}
        if as_json:
            print_json(shown)
            return
        table = Table(show_header=False)
        table.add_column("what")
        table.add_column("value", justify="right")
        for key, value in shown.items():
            table.add_row(key.replace("_", " "), f"{value:,}" if isinstance(value, int) else str(value))
        stdout.print(table)


async def _revision(tracker: AvailabilityTracker) -> str | None:
    from .. import migrations

    return await migrations.current_revision(tracker.engine)


gossip_app = typer.Typer(no_args_is_help=True, help="Gossip: state snapshots, and exchanges with neighbours.")
app.add_typer(gossip_app, name="gossip")


@gossip_app.command("export")
def export(
    directory: Annotated[
        Path, typer.Option("--dir", help="Where to write the snapshot (created if missing).")
    ] = Path("."),
    database_url: DatabaseUrlOption = None,
    as_json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Write this tracker's whole state as a gossip snapshot (gzip JSON Lines, docs/sweeper.md).

    The file appears atomically (written aside, then renamed); older snapshots of this node beyond
    `snapshot_keep` are removed.
    """
    with errors_as_messages(debug):
        if directory.exists() and not directory.is_dir():
            raise NotADirectoryError(f"--dir {directory} is not a directory")
        stderr = console(stderr=True)

        async def work() -> Path:
            async with opened(database_url) as tracker:
                # Once the database is known to exist: made before, a missing database left an
                # empty directory (QA round 59). Made as the sweeper's snapshot_dir is (QA round 16).
                directory.mkdir(parents=True, exist_ok=True)
                with stderr.status("exporting state ...", spinner="dots") if stderr.is_terminal else _quiet():
                    return await write_state_snapshot(tracker, directory, tracker.now())

        path = run(work())
        if as_json:
            print_json({"snapshot": str(path), "bytes": path.stat().st_size})
        else:
            stdout.print(f"wrote {path} ({path.stat().st_size:,} bytes)", highlight=False)


def _quiet() -> Any:
    from contextlib import nullcontext

    return nullcontext()


@gossip_app.command("import")
def import_(
    path: Annotated[Path, typer.Argument(help="A snapshot file (snapshot-*.jsonl.gz).")],
    accept_old: Annotated[
        bool,
        typer.Option(
            "--accept-old",
            help="Import a snapshot older than removals are remembered (tombstone_ttl_s) too: mappings "
            "removed since it was taken may come back.",
        ),
    ] = False,
    database_url: DatabaseUrlOption = None,
    as_json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Merge a gossip snapshot (another tracker's, or a backup) into this database.

    Rows enter through the gossip merge at version 0: they fill in what is missing and never override
    what gossip brought; this node's own observations are left alone. The file is read as it is
    merged, in one transaction that commits only once its end has been checked: a truncated or
    corrupt file, or one with rows dated ahead of this clock, changes nothing; nor does one taken
    longer ago than removals are remembered, without --accept-old.
    """
    from rich.progress import Progress

    from ..gossip.config import GossipConfig
    from ..gossip.importer import ImportReport, check_snapshot, import_snapshot

    with errors_as_messages(debug):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is not a file")
        # Rows as far ahead as this environment's gossip applies them (TRACKER_GOSSIP_MAX_SKEW_S):
        # that setting alone; restoring a backup needs no other gossip setting to be valid (QA 48).
        gossip_skew = GossipConfig.from_env(
            {k: v for k, v in os.environ.items() if k == "TRACKER_GOSSIP_MAX_SKEW_S"}
        ).max_skew_s
        # Before the database is opened: with create=True a refused file left a new one behind.
        config = config_for(database_url)
        check_snapshot(
            path,
            config,
            config.clock(),
            accept_old=accept_old,
            max_skew_s=max(gossip_skew, config.max_clock_skew_s),
        )

        async def work() -> ImportReport:
            stderr = console(stderr=True)
            async with opened(database_url, create=True) as tracker:
                # Outside a terminal a bar is noise (and Rich left a blank line on stderr).
                disable = as_json or not stderr.is_terminal
                with Progress(console=stderr, transient=True, disable=disable) as bar:
                    task = bar.add_task("importing", total=None)
                    # Without a bar, no progress: its total costs the importer a pass over the file.
                    progress = (
                        None if disable else lambda done, total: bar.update(task, completed=done, total=total)
                    )
                    return await import_snapshot(
                        tracker,
                        path,
                        progress,
                        accept_old=accept_old,
                        max_skew_s=max(gossip_skew, tracker.config.max_clock_skew_s),
                    )

        report = run(work())
        if as_json:
            print_json(dataclasses.asdict(report))
        else:
            stdout.print(
                f"read {report.peers_read:,} peer rows and {report.mappings_read:,} mappings from node "
                f"{report.node}; applied {report.peers_applied:,} and {report.mappings_applied:,}",
                highlight=False,
            )


@gossip_app.command("push")
def push(
    url: Annotated[str, typer.Argument(help="A neighbour's base URL, e.g. http://127.0.0.1:8751")],
    database_url: DatabaseUrlOption = None,
    as_json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Gossip with one neighbour now: send what it lacks, take what this tracker lacks.

    Needs the shared key in `TRACKER_GOSSIP_KEYS`, like `tracker serve`; other `TRACKER_GOSSIP_*`
    settings (limits, timeout) apply too.
    """
    from ..errors import ConfigError
    from ..gossip.agent import GossipAgent
    from ..gossip.config import GossipConfig, check_url
    from ..gossip.sizing import check_fits

    with errors_as_messages(debug):
        config = GossipConfig.from_env()
        if not config.enabled:
            raise ConfigError("set TRACKER_GOSSIP_KEYS to the shared gossip key first")
        target = check_url(url)
        check_fits(config, config_for(database_url).bandwidth_window)  # before creating a database

        async def work() -> dict[str, int]:
            async with opened(database_url, create=True) as tracker:
                agent = GossipAgent(tracker, config)
                try:
                    applied = await agent.exchange(target)
                finally:
                    await agent.aclose()
                stats = agent.stats
                return {
                    "rows_sent": stats.rows_sent,
                    "rows_applied": applied,
                    "bytes_sent": stats.bytes_sent,
                    "bytes_received": stats.bytes_received,
                }

        result = run(work())
        if as_json:
            print_json({"neighbor": target, **result})
        else:
            stdout.print(
                f"{target}: sent {result['rows_sent']:,} rows ({result['bytes_sent']:,} bytes), "
                f"applied {result['rows_applied']:,} ({result['bytes_received']:,} bytes received)",
                highlight=False,
            )

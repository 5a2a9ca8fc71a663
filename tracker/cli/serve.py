"""``tracker serve``: the HTTP API, the sweeper and (when configured) gossip, in one process."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import replace
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from ..config import TrackerConfig
from ._common import (
    DatabaseUrlOption,
    DebugOption,
    app,
    config_for,
    errors_as_messages,
    run,
    unknown_variables,
    unless_in_env,
)

if TYPE_CHECKING:
    from ..service import ForcedShutdown

log = logging.getLogger("tracker.service")


@app.command()
def serve(
    database_url: DatabaseUrlOption = None,
    host: Annotated[
        str | None, typer.Option(help="Address to bind (env TRACKER_HOST; default 127.0.0.1).")
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(min=0, max=65535, help="Port (env TRACKER_PORT; default 8750; 0 picks a free one)."),
    ] = None,
    migrate: Annotated[
        bool | None,
        typer.Option(
            "--migrate/--no-migrate",
            help="Upgrade the schema on start, or refuse to start while it is behind "
            "(env TRACKER_AUTO_MIGRATE; default: upgrade).",
            show_default=False,
        ),
    ] = None,
    sweeper: Annotated[
        bool | None,
        typer.Option(
            "--sweeper/--no-sweeper",
            help="Run the background sweeper (env TRACKER_RUN_SWEEPER; default on).",
            show_default=False,
        ),
    ] = None,
    gossip_neighbor: Annotated[
        list[str] | None,
        typer.Option(
            "--gossip-neighbor",
            metavar="URL",
            help="Base URL of a neighbour tracker (repeat; env TRACKER_GOSSIP_NEIGHBORS). Gossip runs "
            "when TRACKER_GOSSIP_KEYS holds the shared key.",
        ),
    ] = None,
    log_json: Annotated[
        bool | None, typer.Option("--log-json/--log-text", help="Log lines as JSON (env TRACKER_LOG_JSON).")
    ] = None,
    debug: DebugOption = False,
) -> None:
    """Run the tracker as an HTTP service until SIGINT or SIGTERM, then exit 0 (130 when a second
    signal forced the shutdown, abandoning requests and writes still waiting on the database).

    Binds 127.0.0.1 by default; any other address needs `TRACKER_API_TOKEN` (writes and selections
    then require `Authorization: Bearer TOKEN`). Every other setting comes from `TRACKER_*` variables (see
    docs/operations.md). The API's schema is served at `/docs` and `/openapi.json`.

    Example, then a query from another shell:

        tracker serve --port 8750
        curl -s 'http://127.0.0.1:8750/v1/content/CID/best?n=3'
    """
    # Imported here: the service stack (FastAPI, uvicorn) is not needed by any other command.
    from ..gossip.config import GossipConfig
    from ..gossip.sizing import check_fits
    from ..service import ForcedShutdown, ServiceSettings
    from ..service import serve as run_service
    from ..service.logs import configure_logging

    with errors_as_messages(debug):
        config = config_for(database_url, warn=False, **_service_overrides(migrate=migrate, sweeper=sweeper))
        settings = ServiceSettings.from_env(host=host, port=port, log_json=log_json)
        gossip = GossipConfig.from_env()
        if gossip_neighbor:
            gossip = replace(gossip, neighbors=tuple(gossip_neighbor))
        if gossip.enabled:  # before the database is opened, or created
            check_fits(gossip, config.bandwidth_window)
        configure_logging(json_lines=settings.log_json, level=settings.log_level)
        settings_read = TrackerConfig.env_names() | ServiceSettings.env_names() | GossipConfig.env_names()
        for warning in unknown_variables(settings_read):
            log.warning(warning, extra={"action": "unknown_setting"})

        async def service() -> None:
            try:
                await run_service(config, settings, gossip, owns_process=True)
            except ForcedShutdown as forced:
                _exit_abandoning(forced)

        run(service(), stop_on_sigterm=False)


def _exit_abandoning(forced: ForcedShutdown) -> NoReturn:
    """Exit 130 (the conventional code of a process interrupted by SIGINT) now, without the
    interpreter's wait for threads: a write in an SQLite lane thread, stuck in the busy handler
    behind another process's lock, held the process up to ``sqlite_busy_timeout_s`` and then
    committed the write it had answered 503 for (QA round 16). Exiting here leaves its
    transaction uncommitted, which either database rolls back."""
    typer.echo(str(forced), err=True)
    logging.shutdown()  # flushes the log handlers, which os._exit would not
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


def _service_overrides(*, migrate: bool | None, sweeper: bool | None) -> dict[str, Any]:
    """The flags when given, else ``TRACKER_AUTO_MIGRATE`` / ``TRACKER_RUN_SWEEPER`` when set, else a
    service's defaults: migrate, and sweep (which an embedded library tracker does not by default)."""
    overrides = unless_in_env(auto_migrate=True, run_sweeper=True)
    if migrate is not None:
        overrides["auto_migrate"] = migrate
    if sweeper is not None:
        overrides["run_sweeper"] = sweeper
    return overrides

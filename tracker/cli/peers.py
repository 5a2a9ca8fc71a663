"""``tracker peers list|show``: what the tracker knows about peers."""

from __future__ import annotations

import shlex
from typing import Annotated

import typer
from rich.table import Table

from ..errors import InvalidInput
from ..models import PeerMetrics
from ._common import (
    DatabaseUrlOption,
    DebugOption,
    JsonOption,
    app,
    errors_as_messages,
    opened,
    print_json,
    run,
    stdout,
)
from .render import format_speed, peer_metrics_json

peers_app = typer.Typer(no_args_is_help=True, help="List peers or show one, with the parts of its score.")
app.add_typer(peers_app, name="peers")


@peers_app.command("list")
def list_peers(
    online: Annotated[bool, typer.Option("--online", help="Only peers online now.")] = False,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="Peers per page.")] = 100,
    after: Annotated[
        str | None, typer.Option(help="Start after this peer id (the last of the previous page).")
    ] = None,
    database_url: DatabaseUrlOption = None,
    as_json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """List peers in id order, a page at a time.

    Example, the second page of online peers:

        tracker peers list --online --limit 50 --after peer-0049
    """
    with errors_as_messages(debug):

        async def work() -> list[PeerMetrics]:
            async with opened(database_url) as tracker:
                return await tracker.list_peers(online_only=online, limit=limit, after=after)

        page = run(work())
        if as_json:
            next_after = page[-1].peer_id if len(page) == limit else None
            print_json({"peers": [peer_metrics_json(p) for p in page], "next_after": next_after})
            return
        table = Table(title=f"{len(page)} peers" + (" online" if online else ""), title_justify="left")
        for header in ("Peer", "Online", "Reputation", "Served", "Failed", "Speed", "Last seen"):
            table.add_column(header, justify="left" if header in ("Peer", "Last seen") else "right")
        for peer in page:
            table.add_row(
                peer.peer_id,
                "yes" if peer.online else "no",
                f"{peer.reputation_score or 0.0:.3f}",
                str(peer.chunks_served),
                str(peer.chunks_failed),
                format_speed(peer.download_speed),
                "" if peer.last_seen is None else peer.last_seen.isoformat(timespec="seconds"),
            )
        stdout.print(table)
        if len(page) == limit:
            # Quoted for the shell it is pasted into: `--after sp ace` failed, `evil[/]` globbed (QA 74).
            stdout.print(f"more: --after {shlex.quote(page[-1].peer_id)}", highlight=False)


@peers_app.command()
def show(
    peer_id: Annotated[str, typer.Argument(help="The peer's id.")],
    database_url: DatabaseUrlOption = None,
    as_json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """Everything known about one peer: presence, counters, speed and the parts of its reputation."""
    with errors_as_messages(debug):

        async def work() -> PeerMetrics | None:
            async with opened(database_url) as tracker:
                return await tracker.get_peer_metrics(peer_id)

        metrics = run(work())
        if metrics is None:
            raise InvalidInput(f"no peer {peer_id!r} is known")
        shown = peer_metrics_json(metrics)
        if as_json:
            print_json(shown)
            return
        table = Table(title=peer_id, title_justify="left", show_header=False)
        table.add_column("field")
        table.add_column("value")
        for key, value in shown.items():
            if key != "peer_id":
                table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
        stdout.print(table)

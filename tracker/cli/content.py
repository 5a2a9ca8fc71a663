"""``tracker content show`` and ``tracker best``: who holds a content, and whom to download it from."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from ..config import STRATEGIES
from ..errors import InvalidInput
from ..models import ContentAvailability, PeerInfo
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
from .render import peer_info_json, peer_table

#: Holders ``content show`` lists unless told: a content of 50,000 holders took 30 s and 368 MB to
#: lay out as a table (QA round 59); the HTTP API caps its list too (``max_page_size``).
SHOWN_HOLDERS = 100

content_app = typer.Typer(no_args_is_help=True, help="Show who holds a content.")
app.add_typer(content_app, name="content")


@content_app.command()
def show(
    cid: Annotated[str, typer.Argument(help="The content id.")],
    limit: Annotated[
        int,
        typer.Option(min=0, help="Show the best LIMIT holders; 0: every one (the count is of all)."),
    ] = SHOWN_HOLDERS,
    database_url: DatabaseUrlOption = None,
    as_json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """The online holders of CID, best first, with their load, and how many there are. Takes no leases."""
    with errors_as_messages(debug):

        async def work() -> ContentAvailability | None:
            async with opened(database_url) as tracker:
                return await tracker.get_content_availability(cid, limit=limit or None)

        availability = run(work())
        if availability is None:
            raise InvalidInput(f"no content {cid!r} is known")
        if as_json:
            print_json(
                {
                    "cid": cid,
                    "replication_factor": availability.replication_factor,
                    "last_updated": availability.last_updated,
                    "peers": [peer_info_json(p) for p in availability.peers],
                }
            )
            return
        shown = len(availability.peers)
        title = f"{cid}: {availability.replication_factor:,} online holders"
        if shown < availability.replication_factor:
            title += f", the best {shown:,} shown (--limit)"
        stdout.print(peer_table(title, availability.peers, empty="no holder is online"))


#: The choices as Typer wants them, so that a mistyped one is a usage error (exit 2) like any other.
Strategy = Enum("Strategy", {name: name for name in STRATEGIES}, type=str)  # type: ignore[misc]


@app.command()
def best(
    cid: Annotated[str, typer.Argument(help="The content id.")],
    n: Annotated[int, typer.Option("-n", min=1, max=100, help="How many peers.")] = 3,
    strategy: Annotated[
        Strategy | None, typer.Option(help="How to pick (default: the configured one).")
    ] = None,
    database_url: DatabaseUrlOption = None,
    as_json: JsonOption = False,
    debug: DebugOption = False,
) -> None:
    """The best N peers to download CID from now, as `select_best_peers` picks them.

    Like every selection, this hands each returned peer a lease (one unit of load for `lease_ttl_s`):
    asking repeatedly spreads the answers, as it would for real downloaders.
    """
    with errors_as_messages(debug):

        async def work() -> tuple[list[PeerInfo], str, float]:
            async with opened(database_url) as tracker:
                config = tracker.config
                used = config.selection_strategy if strategy is None else strategy.value
                return await tracker.select_best_peers(cid, n, strategy=used), used, config.lease_ttl_s

        chosen, used, lease_ttl_s = run(work())
        if as_json:  # the fields of GET /v1/content/{cid}/best
            peers = [peer_info_json(p) for p in chosen]
            print_json({"cid": cid, "strategy": used, "lease_ttl_s": lease_ttl_s, "peers": peers})
            return
        stdout.print(
            peer_table(f"{cid}: best {len(chosen)}", chosen, empty="no online holder can take a download")
        )

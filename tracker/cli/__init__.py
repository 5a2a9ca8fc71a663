"""The ``tracker`` command: a thin shell over the Python API, one module per group of subcommands.

Importing a module registers its commands on the shared Typer app (``_common.app``); adding a command
group is one more import below.
"""

from . import content, db, demo, ops, peers, serve  # noqa: F401  (registers the commands)
from ._common import app
from .render import format_speed

__all__ = ["app", "format_speed", "main"]


def main() -> None:
    """Console-script entry point (``tracker``) and what ``python -m tracker`` runs."""
    app(prog_name="tracker")

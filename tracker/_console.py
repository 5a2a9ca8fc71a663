"""The ``tracker`` console script's first code, light to import (``tracker/__init__`` loads its
names on first use): the CLI's libraries take ~0.6 s to load, seconds on a loaded host, and a
Ctrl-C meanwhile printed a traceback of imports (QA round 59 #10j) where it otherwise exits 130
quietly."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from .cli import main as cli
    except KeyboardInterrupt:
        sys.exit(130)
    cli()

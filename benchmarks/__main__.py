"""``python -m benchmarks run [--quick] [--engine ...] [--scale 100k|1m] [--out DIR] [--no-replay]
[--no-gossip]``.

The single benchmarks (``python -m benchmarks.sweep``, ``.http``, ``.loadbalance``, ``.gossip``, ``.soak``)
run on their own; ``run`` is the suite of ``benchmarks/suite.py``.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from .report import plot_scale
from .suite import run


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    suite = commands.add_parser("run", help="the benchmark suite, with its baselines")
    suite.add_argument("--quick", action="store_true", help="5,000 peers: under two minutes")
    suite.add_argument("--engine", choices=["sqlite", "postgresql", "all"], default="all")
    suite.add_argument("--scale", choices=["100k", "1m"], default="100k")
    suite.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    suite.add_argument(
        "--no-replay",
        dest="replay",
        action="store_false",
        help="skip replaying the write path's statements through the bare driver (halves ingest time)",
    )
    suite.add_argument(
        "--no-gossip",
        dest="gossip",
        action="store_false",
        help="skip the gossip delta of the whole swarm (minutes per engine at --scale 1m)",
    )
    scale = commands.add_parser("scale", help="plot cost against scale from several results.json")
    scale.add_argument("results", type=Path, nargs="+")
    scale.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    if args.command == "scale":
        plot_scale(args.results, args.out)
        return
    engines = ["sqlite", "postgresql"] if args.engine == "all" else [args.engine]
    asyncio.run(run(args.quick, engines, args.scale, args.out, replay=args.replay, gossip=args.gossip))


if __name__ == "__main__":
    main()

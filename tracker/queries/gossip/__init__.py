"""Gossip's statements: stamp local changes (``stamp``), read what a neighbour lacks (``deltas``),
merge what neighbours send (``merge``)."""

from .deltas import Delta, read_deltas, vectors
from .merge import MergeCounts, catch_up_own_clock, claim_nonce, merge
from .stamp import SLICE_ROWS, Stamp, stamp

__all__ = [
    "SLICE_ROWS",
    "Delta",
    "MergeCounts",
    "Stamp",
    "catch_up_own_clock",
    "claim_nonce",
    "merge",
    "read_deltas",
    "stamp",
    "vectors",
]

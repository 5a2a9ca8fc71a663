"""Gossip's statements: stamp local changes (``stamp``), read what a neighbour lacks (``deltas``),
merge what neighbours send (``merge``)."""

from .deltas import Delta, read_deltas, vectors
from .merge import MergeCounts, claim_nonce, merge
from .stamp import stamp

__all__ = ["Delta", "MergeCounts", "claim_nonce", "merge", "read_deltas", "stamp", "vectors"]

"""How big a gossip message of one version gets, so settings that could never carry one are refused.

A message completes at least one version, which is never split (``read_deltas``), so ``max_bytes``
must hold one: ``stamp_chunk`` rows of this tracker. With ``max_bytes`` of 1 KiB and the default
``stamp_chunk`` (500) every message was refused as oversized and gossip never converged (QA round 6).
"""

from __future__ import annotations

import random
from functools import cache

from ..errors import ConfigError
from .config import GossipConfig
from .protocol import MappingState, Message, OriginDelta, PeerState, encode

_ID_CHARS = "0123456789abcdef"
_ID_LENGTH = 64  # a hex SHA-256, as content ids and many peer ids are: random, so they compress little


def _key(rng: random.Random) -> str:
    return "".join(rng.choice(_ID_CHARS) for _ in range(_ID_LENGTH))


@cache
def version_bytes(rows: int, window: int) -> int:
    """Compressed bytes of a message holding one version of ``rows`` rows, the bigger of a version of
    peer rows with ``window`` samples each and one of mappings; ids are 64 random hex characters.

    An estimate for typical ids, not a bound: ids up to 256 characters make rows several times
    bigger, and those messages may not fit (they are sent anyway, with an error in the log).
    """
    rng = random.Random(rows * 1009 + window)
    at = 1_780_000_000.0
    peers = [
        PeerState(
            peer=_key(rng),
            first_seen=at - rng.random() * 1e6,
            online=True,
            online_since=at - rng.random() * 1e5,
            last_seen=at - rng.random() * 300,
            uptime_s=rng.random() * 1e5,
            served=rng.randrange(10**6),
            failed=rng.randrange(10**4),
            success_weight=rng.random() * 1e3,
            failure_weight=rng.random() * 1e2,
            evidence_at=at - rng.random() * 300,
            updated_at=at - rng.random() * 300,
            version=rows,
            samples=[(at - rng.random() * 1e4, rng.randrange(10**9)) for _ in range(window)],
            samples_version=rows,
        )
        for _ in range(rows)
    ]
    mappings = [
        MappingState(
            cid=_key(rng),
            peer=_key(rng),
            available=True,
            since=at - rng.random() * 1e6,
            last_confirmed=at - rng.random() * 300,
            changed_at=at - rng.random() * 300,
            version=rows,
        )
        for _ in range(rows)
    ]
    node = _key(rng)
    sizes = []
    for delta in (
        OriginDelta(origin=node, base=0, upto=rows, peers=peers),
        OriginDelta(origin=node, base=0, upto=rows, mappings=mappings),
    ):
        message = Message(
            kind="reply",
            node=node,
            sent_at=at,
            nonce="0" * 32,
            in_reply_to="0" * 32,
            vector={node: rows},
            samples_vector={node: rows},
            deltas=[delta],
        )
        sizes.append(len(encode(message)))
    return max(sizes)


def check_fits(config: GossipConfig, window: int) -> None:
    """Refuse settings under which no message of this tracker's could be accepted: checked by the
    agent, and by the commands before they open (or create) a database (QA round 10)."""
    needed = version_bytes(config.stamp_chunk, window)
    if needed > config.max_bytes:
        raise ConfigError(
            f"gossip max_bytes ({config.max_bytes}) cannot hold one version of stamp_chunk "
            f"({config.stamp_chunk}) rows, about {needed} bytes with bandwidth_window {window}, and no "
            "message would ever be accepted: raise max_bytes or lower stamp_chunk"
        )

"""Each tracker tells its neighbours its ``max_bytes``, so that neither sends what the other refuses.

A receiver refuses (413) a message over its own ``max_bytes``, and a sender used to know only its
own limit: a tracker configured smaller than a neighbour refused that neighbour's bigger messages
whole, every origin in them with them, for as long as the settings differed (QA round 10; a rolling
change of the setting did the same while it rolled). Every gossip request and response, refusals
included, now states its sender's limit in the ``X-Gossip-Max-Bytes`` header, and each side sizes
what it sends to the smaller of the two limits.

A header, not a message field: trackers of earlier releases refuse a message with a field they do
not know, and ignore a header they do not know. It is outside the signature (which covers the body
exactly as sent), so what it says is clamped to no more than this tracker's own limit and no less
than the smallest limit a tracker accepts: forged, it can make messages smaller, never bigger, and
whoever can rewrite headers in transit can drop messages anyway. From a tracker that states no
limit (an earlier release), a refusal as ``oversized`` halves the size of the next try.
"""

from __future__ import annotations

HEADER = "X-Gossip-Max-Bytes"
#: The smallest ``max_bytes`` a tracker accepts (``GossipConfig`` refuses less).
MIN_BYTES = 1024


def stated(value: str | None, own: int) -> int | None:
    """The limit a neighbour stated in ``HEADER``, clamped to ``[MIN_BYTES, own]``; ``None`` when it
    stated none, or nothing that reads as a limit (``own`` then applies, as it always did)."""
    if value is None:
        return None
    value = value.strip()
    # ASCII digits only: "²" is a digit to str.isdigit and not to int() (QA round 14: a 500).
    if not (value.isascii() and value.isdigit()) or len(value) > 18:
        return None
    return max(MIN_BYTES, min(own, int(value)))


def after_refusal(stated_limit: int | None, refused_bytes: int, own: int) -> int:
    """The limit to send a neighbour within, after it refused ``refused_bytes`` as oversized: the
    limit its refusal stated, else half what it refused (a tracker of an earlier release)."""
    if stated_limit is not None and stated_limit < refused_bytes:
        return stated_limit
    return max(MIN_BYTES, min(own, refused_bytes // 2))


def headers(own: int) -> dict[str, str]:
    """The header every gossip request and response of this tracker carries."""
    return {HEADER: str(own)}

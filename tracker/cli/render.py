"""How the CLI shows peers: Rich tables for people, plain dicts (stable keys) for ``--json``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from rich.table import Table

from .. import reputation as rep
from ..models import PeerInfo, PeerMetrics

_SPEED_UNITS = ("kB/s", "MB/s", "GB/s", "TB/s")


def format_speed(bytes_per_sec: float) -> str:
    """A speed the way people read it, in decimal units like network speeds.

    >>> format_speed(2_500_000), format_speed(640), format_speed(999_990)
    ('2.5 MB/s', '640 B/s', '1.0 MB/s')
    """
    value = float(bytes_per_sec)
    if abs(round(value)) < 1000.0:
        return f"{value:.0f} B/s"
    for unit in _SPEED_UNITS:
        value /= 1000.0
        # Compare after rounding, so 999_990 B/s reads "1.0 MB/s", never "1000.0 kB/s".
        if abs(round(value, 1)) < 1000.0 or unit == _SPEED_UNITS[-1]:
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def peer_table(title: str, peers: list[PeerInfo] | tuple[PeerInfo, ...], *, empty: str) -> Table:
    """Ranked peers with every part of their score, so a reader sees why each one is where it is."""
    table = Table(title=title, title_justify="left")
    for header in ("Rank", "Peer", "Reputation", "Success", "Uptime", "Speed", "Evidence", "Load"):
        table.add_column(header, justify="left" if header == "Peer" else "right", min_width=len(header))
    for peer in peers:
        table.add_row(
            str(peer.rank),
            peer.peer_id,
            f"{peer.reputation:.3f}",
            f"{peer.success_rate:.1%}",
            f"{peer.uptime_factor:.3f}",
            format_speed(peer.download_speed),
            f"{peer.evidence:.1f}",
            f"{peer.load}/{peer.capacity}",
        )
    if not peers:
        table.caption = empty
    return table


def iso_time(moment: datetime | None) -> str | None:
    """A time as the HTTP API writes it (pydantic: UTC as ``Z``), so a script reading both compares
    strings: ``isoformat()`` wrote ``+00:00`` (QA round 74)."""
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def peer_info_json(peer: PeerInfo) -> dict[str, Any]:
    """A ranked peer as JSON."""
    return {
        "rank": peer.rank,
        "peer_id": peer.peer_id,
        "reputation": peer.reputation,
        "success_rate": peer.success_rate,
        "uptime_factor": peer.uptime_factor,
        "download_bytes_per_sec": peer.download_speed,
        "evidence": peer.evidence,
        "proven": peer.proven,
        "load": peer.load,
        "capacity": peer.capacity,
        "last_seen": iso_time(peer.last_seen),
    }


def peer_metrics_json(metrics: PeerMetrics) -> dict[str, Any]:
    """Everything known about one peer as JSON, with the parts of its score (same keys as the API)."""
    successes, failures = metrics.evidence
    return {
        "peer_id": metrics.peer_id,
        "online": metrics.online,
        "reputation": metrics.reputation_score,
        "reliable": metrics.is_reliable(),
        "proven": metrics.is_proven,
        "success_rate": rep.success_rate(successes, failures, metrics.params),
        "uptime_factor": rep.uptime_factor(metrics.uptime.total_seconds(), metrics.params),
        "uptime_s": metrics.uptime.total_seconds(),
        "download_bytes_per_sec": metrics.download_speed,
        "chunks_served": metrics.chunks_served,
        "chunks_failed": metrics.chunks_failed,
        "last_seen": iso_time(metrics.last_seen),
        "first_seen": iso_time(metrics.first_seen),
        "online_since": iso_time(metrics.online_since),
    }

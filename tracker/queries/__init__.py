"""Every SQL statement the tracker runs, as named async functions; the only place with dialect branches.

``writes`` applies batches of events; ``reads`` answers questions with one ranking statement each.
"""

from .analytics import under_replicated_count, write_settings
from .clocks import load_clock_state, save_clock_state
from .leases import (
    current_loads,
    grant_leases,
    lock_peers,
    open_loads,
    probe_loads,
    prune_expired_leases,
    shift_held_leases,
)
from .listing import Counts, counts, peer_page
from .reads import (
    PeerRow,
    RankedRow,
    available_peer_keys,
    best_holders,
    content_last_updated,
    peer_row,
    ranked_holders,
)
from .writes import Timed, apply_events, ensure_local_node

__all__ = [
    "Counts",
    "PeerRow",
    "RankedRow",
    "Timed",
    "apply_events",
    "available_peer_keys",
    "best_holders",
    "content_last_updated",
    "counts",
    "current_loads",
    "ensure_local_node",
    "grant_leases",
    "load_clock_state",
    "lock_peers",
    "open_loads",
    "peer_page",
    "peer_row",
    "probe_loads",
    "prune_expired_leases",
    "ranked_holders",
    "save_clock_state",
    "shift_held_leases",
    "under_replicated_count",
    "write_settings",
]

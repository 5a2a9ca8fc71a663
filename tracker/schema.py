"""The tables: a public interface for SQL analytics, documented column by column in docs/schema.md.

Times are Unix seconds (UTC) as double precision everywhere: one comparison-friendly number on both
engines (``to_timestamp(last_seen)`` on Postgres, ``datetime(last_seen, 'unixepoch')`` on SQLite).

Observations are kept per origin tracker (``node_id``): today only this node's own, tomorrow also
what gossip relays from others, so merged views sum or take the max over origins.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    text,
)

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)

# SQLite only auto-assigns INTEGER PRIMARY KEY (the rowid); Postgres wants 64 bits for event tables.
Id = BigInteger().with_variant(Integer(), "sqlite")
Key = String(256)
#: A key compared by code point, as SQLite compares every string: Postgres's default collation
#: may not (``en_US.UTF-8`` puts ``a`` before ``B``).
CodePointKey = String(256).with_variant(String(256, collation="C"), "postgresql")

nodes = Table(
    "tracker_nodes",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("node_key", String(64), nullable=False, unique=True),
    Column("is_local", Boolean, nullable=False),
    Column("created_at", Double, nullable=False),
    # Highest version of this origin held completely (for the local node: the last one stamped).
    Column("clock", BigInteger, nullable=False, server_default=text("0")),
    # Every row of this origin whose samples changed at or before this version is held with them
    # (or newer): gossip sends a row's samples only past it. Unused for the local node.
    Column("samples_clock", BigInteger, nullable=False, server_default=text("0")),
    comment="Origin trackers whose observations this database holds; exactly one is local.",
)
Index(
    "uq_tracker_nodes_local",
    nodes.c.is_local,
    unique=True,
    sqlite_where=nodes.c.is_local,
    postgresql_where=nodes.c.is_local,
)

peers = Table(
    "peers",
    metadata,
    Column("id", Id, primary_key=True),
    # Compared by code point on both engines (migration 0012): listings page in the same order.
    Column("peer_key", CodePointKey, nullable=False, unique=True),
    Column("first_seen", Double, nullable=False),
    # From the key alone (queries.writes.draw_of: 31 bits of its MD5), so weighted selections draw
    # alike on every engine and tracker for one seed; the surrogate id differs (Postgres skips
    # sequence values on conflicts).
    Column("draw", Integer, nullable=False, server_default=text("0")),
    comment="Peers seen or reported, by their external id, until the sweeper forgets them.",
)

contents = Table(
    "contents",
    metadata,
    Column("id", Id, primary_key=True),
    Column("content_key", CodePointKey, nullable=False, unique=True),
    Column("first_seen", Double, nullable=False),
    comment="Content ids announced or named by upload reports, until the sweeper forgets them.",
)

peer_stats = Table(
    "peer_stats",
    metadata,
    Column("peer_id", Id, ForeignKey("peers.id", ondelete="CASCADE"), primary_key=True),
    Column("node_id", Integer, ForeignKey("tracker_nodes.id", ondelete="CASCADE"), primary_key=True),
    Column("online", Boolean, nullable=False),
    Column("online_since", Double, nullable=True),
    Column("last_seen", Double, nullable=False),
    Column("uptime_s", Double, nullable=False),
    Column("served_count", BigInteger, nullable=False),
    Column("failed_count", BigInteger, nullable=False),
    Column("success_weight", Double, nullable=False),
    Column("failure_weight", Double, nullable=False),
    Column("evidence_at", Double, nullable=True),
    Column("speed_bps", Double, nullable=True),
    Column("updated_at", Double, nullable=False),
    # The origin's version of this row for gossip deltas; null while a local change awaits its stamp.
    Column("version", BigInteger, nullable=True),
    # The row's version when its samples last changed (<= version): gossip sends samples only to
    # neighbours that lack that version. Null on a local row whose samples changed since the last stamp.
    Column("samples_version", BigInteger, nullable=True),
    # The latest time of the peer's own event (heartbeat, goodbye, announcement) on a local row: its
    # own events are ordered by it, not by last_seen, which downloaders' reports move too (migration
    # 0017). 0 on a row only reports made; null on other origins' rows and on rows from before 0017.
    Column("own_seen", Double, nullable=True),
    # The latest time of a report (a success, a sample) that counted as a sighting, on a local row:
    # own_seen orders the peer's own events only while last_seen is that time (migration 0017).
    Column("report_seen", Double, nullable=True),
    comment="One origin's view of one peer: presence, exact lifetime counters, decayed evidence, speed.",
    # Read and written by its key: stored clustered on it, one search per probe (migration 0007).
    sqlite_with_rowid=False,
)
# Gossip deltas ("this origin's rows after version v") and the stamper ("local rows without one").
Index("ix_peer_stats_node_version", peer_stats.c.node_id, peer_stats.c.version)

bandwidth_samples = Table(
    "bandwidth_samples",
    metadata,
    Column("id", Id, primary_key=True),
    Column("peer_id", Id, ForeignKey("peers.id", ondelete="CASCADE"), nullable=False),
    Column("node_id", Integer, ForeignKey("tracker_nodes.id", ondelete="CASCADE"), nullable=False),
    Column("at", Double, nullable=False),
    Column("bytes_per_sec", BigInteger, nullable=False),
    comment="Download speed samples; a peer's speed is the mean of its latest bandwidth_window.",
)
# Serves "latest N samples of a peer" as a backward index walk; id breaks ties between equal times.
Index(
    "ix_bandwidth_samples_peer_latest",
    bandwidth_samples.c.peer_id,
    bandwidth_samples.c.node_id,
    bandwidth_samples.c.at,
    bandwidth_samples.c.id,
)

upload_outcomes = Table(
    "upload_outcomes",
    metadata,
    Column("id", Id, primary_key=True),
    Column("peer_id", Id, ForeignKey("peers.id", ondelete="CASCADE"), nullable=False),
    Column("node_id", Integer, ForeignKey("tracker_nodes.id", ondelete="CASCADE"), nullable=False),
    Column("at", Double, nullable=False),
    Column("success", Boolean, nullable=False),
    Column("content_id", Id, ForeignKey("contents.id", ondelete="SET NULL"), nullable=True),
    Column("bytes", BigInteger, nullable=True),
    comment="Raw upload outcomes, the events behind peer_stats counters and weights.",
)
Index("ix_upload_outcomes_peer_at", upload_outcomes.c.peer_id, upload_outcomes.c.at)
# Retention deletes the oldest outcomes first; times arrive nearly in order, so this index only grows at
# its right edge and costs little on insert.
Index("ix_upload_outcomes_at", upload_outcomes.c.at)
# A content's outcomes, which its deletion sets to NULL (migration 0014): without it, forgetting a
# content scanned every outcome. Partial: most outcomes name no content.
Index(
    "ix_upload_outcomes_content",
    upload_outcomes.c.content_id,
    sqlite_where=text("content_id IS NOT NULL"),
    postgresql_where=text("content_id IS NOT NULL"),
)

content_peers = Table(
    "content_peers",
    metadata,
    Column("content_id", Id, ForeignKey("contents.id", ondelete="CASCADE"), primary_key=True),
    Column("peer_id", Id, ForeignKey("peers.id", ondelete="CASCADE"), primary_key=True),
    Column("node_id", Integer, ForeignKey("tracker_nodes.id", ondelete="CASCADE"), nullable=False),
    Column("available", Boolean, nullable=False),
    Column("since", Double, nullable=False),
    Column("last_confirmed", Double, nullable=False),
    Column("changed_at", Double, nullable=False),
    Column("version", BigInteger, nullable=True),
    # When this tracker took the removal (its own clock; NULL while available): a tombstone is kept
    # tombstone_keep_s after that, not after its date (migration 0015).
    Column("removed_at", Double, nullable=True),
    comment="Who holds what. available=false rows are tombstones that stop stale announcements.",
    # A content's holders are one range of the clustered key (migration 0007).
    sqlite_with_rowid=False,
)
Index("ix_content_peers_peer", content_peers.c.peer_id, content_peers.c.content_id)
Index("ix_content_peers_node_version", content_peers.c.node_id, content_peers.c.version)
# Tombstones are few; a partial index lets the sweeper expire them without scanning live mappings.
Index(
    "ix_content_peers_tombstones",
    content_peers.c.removed_at,
    sqlite_where=text("NOT available"),
    postgresql_where=text("NOT available"),
)

peer_leases = Table(
    "peer_leases",
    metadata,
    Column("id", Id, primary_key=True),
    Column("peer_id", Id, ForeignKey("peers.id", ondelete="CASCADE"), nullable=False),
    Column("content_id", Id, ForeignKey("contents.id", ondelete="CASCADE"), nullable=True),
    Column("node_id", Integer, ForeignKey("tracker_nodes.id", ondelete="CASCADE"), nullable=False),
    Column("leased_at", Double, nullable=False),
    Column("expires_at", Double, nullable=False),
    Column("closed_at", Double, nullable=True),
    comment="Assignments handed out by selection; a peer's load is its open, unexpired leases.",
)
# A peer's open leases (its load) and latest lease, and the oldest one an outcome closes; closed_at
# and id make the load probe read the index alone.
Index(
    "ix_peer_leases_peer_expires",
    peer_leases.c.peer_id,
    peer_leases.c.expires_at,
    peer_leases.c.closed_at,
    peer_leases.c.id,
)
# The sweeper deletes lapsed leases oldest first.
Index("ix_peer_leases_expires", peer_leases.c.expires_at)
# A content's leases, which its deletion cascades to (migration 0014).
Index("ix_peer_leases_content", peer_leases.c.content_id)

gossip_nonces = Table(
    "gossip_nonces",
    metadata,
    Column("nonce", String(64), primary_key=True),
    Column("node_key", String(64), nullable=False),
    Column("expires_at", Double, nullable=False),
    comment="Nonces of accepted gossip messages, kept until their message would be too old anyway.",
)
Index("ix_gossip_nonces_expires", gossip_nonces.c.expires_at)

clocks = Table(
    "tracker_clocks",
    metadata,
    # The kernel's boot id (/proc/sys/kernel/random/boot_id): elapsed times compare only within one boot.
    Column("boot_id", String(64), primary_key=True),
    # The latest reading of the wall clock found in step with elapsed time, and elapsed time then.
    Column("wall", Double, nullable=False),
    Column("elapsed", Double, nullable=False),
    # Elapsed time when the wall clock was seen leaping ahead, while that leap is neither over nor
    # accepted as a correction; else null.
    Column("held_since", Double, nullable=True),
    # After an accepted leap: its size, and the elapsed time until which sweeps stay behind it.
    Column("lag_s", Double, nullable=False),
    Column("lag_until", Double, nullable=False),
    # The tracker's time of the write (old rows of past boots are pruned by it).
    Column("saved_at", Double, nullable=False),
    comment="Per host boot: the tracker's clock against elapsed time, so a process started later "
    "notices a clock that leapt while none ran (tracker/clockleap.py).",
)

settings = Table(
    "tracker_settings",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Double, nullable=False),
    comment=(
        "Settings the analytics views read (peer_timeout_s, reputation.*, reliable_threshold, "
        "min_reputation, replication_target)."
    ),
)
# Views (created by migration 0004, not modelled here): peer_scores, content_replication,
# under_replicated_content. See docs/analytics.md.

"""Prometheus metrics of one service instance (``/metrics``).

Each app owns its own ``CollectorRegistry`` rather than the process-global one, so several apps (tests,
or an embedder mounting the API twice) never collide on metric names. Three kinds of figures:

- counted as they happen (events ingested, selections and their latency, requests, rejections);
- read from in-memory state at scrape time (sweeper passes, group-commit counters): a custom collector,
  because copying them into counters on every change would spread metrics code through the core;
- read from the database at scrape time (peers online, under-replicated contents): refreshed by the
  ``/metrics`` handler before rendering, because a collector's ``collect`` is synchronous and must
  not block the event loop on a query.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError

from ..core import AvailabilityTracker
from ..errors import TrackerError
from ..gossip.agent import GossipAgent
from ..models import TrackerStats
from ..sqlite_lane import lane_path

#: How long a scrape waits for the figures read from the database (Prometheus's default scrape
#: timeout is 10 s).
REFRESH_WAIT_S = 5.0
# Selections are one or two statements: sub-millisecond to tens of milliseconds on these machines.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _TrackerStateCollector(Collector):
    """Sweeper and group-commit counters, read from the tracker's in-memory state on each scrape."""

    def __init__(self, tracker: AvailabilityTracker, gossip: GossipAgent | None = None) -> None:
        self._tracker = tracker
        self._gossip = gossip

    def collect(self) -> Iterator[Metric]:
        sweeps = self._tracker.sweeper_state
        yield CounterMetricFamily("tracker_sweeps", "Sweeper passes completed.", value=sweeps.passes)
        yield CounterMetricFamily(
            "tracker_sweep_failures",
            "Sweeper passes that failed (retried with back-off).",
            value=sweeps.failures,
        )
        yield CounterMetricFamily(
            "tracker_snapshot_failures",
            "Sweeper passes whose due state snapshot could not be written (the rest of the pass stands).",
            value=sweeps.snapshot_failures,
        )
        yield CounterMetricFamily(
            "tracker_sweeps_skipped",
            "Passes skipped because another process held the sweep lock.",
            value=sweeps.skipped,
        )
        self._tracker.now()  # a reading is what notices a leap, or its end
        yield GaugeMetricFamily(
            "tracker_clock_leap_seconds",
            "How far this host's clock has leapt ahead of elapsed time (0: in step; docs/operations.md).",
            value=self._tracker.now.leap_s,
        )
        if sweeps.database_clock_offset_s is not None:  # Postgres, after a pass
            yield GaugeMetricFamily(
                "tracker_database_clock_offset_seconds",
                "The database server's clock less this tracker's time at the latest sweep (Postgres).",
                value=sweeps.database_clock_offset_s,
            )
        report = sweeps.last_report
        yield GaugeMetricFamily(
            "tracker_sweep_last_duration_seconds",
            "Duration of the latest completed sweeper pass.",
            value=0.0 if report is None else report.duration_s,
        )
        ingest = self._tracker.ingest_stats
        yield CounterMetricFamily(
            "tracker_ingest_transactions",
            "Write transactions committed by the group committer.",
            value=ingest.transactions,
        )
        yield CounterMetricFamily(
            "tracker_ingest_requests", "Write requests (calls, batches) committed.", value=ingest.requests
        )
        yield GaugeMetricFamily(
            "tracker_ingest_oldest_wait_seconds",
            "How long the oldest write not yet committed has waited (0: none waiting); a write stuck "
            "behind a lock holds up the writes queued after it.",
            value=self._tracker.ingest_oldest_wait_s(),
        )
        load = self._tracker.ranking_load()
        yield GaugeMetricFamily(
            "tracker_heavy_contents",
            "Contents whose rankings average 100 ms or more: they rank on SQLite's read lane and "
            "leave a ranking slot to the other contents (docs/load-balancing.md).",
            value=load.heavy_contents,
        )
        waiting = GaugeMetricFamily(
            "tracker_rankings_waiting",
            "Selections and holder readings waiting for a ranking slot now, by the content's weight.",
            labels=["content"],
        )
        waiting.add_metric(["light"], load.light_waiting)
        waiting.add_metric(["heavy"], load.heavy_waiting)
        yield waiting
        if (path := lane_path(self._tracker.config)) is not None:
            yield GaugeMetricFamily(
                "tracker_sqlite_wal_bytes",
                "Size of the SQLite write-ahead log: it grows for as long as a read stays open (an "
                "analytics session, a half-read cursor) and is cut back once the read ends.",
                value=_size(f"{path}-wal"),
            )
        if self._gossip is not None:
            yield from _gossip_metrics(self._gossip)


def _size(path: str) -> int:
    """A file's size, 0 when there is none (a stat: no I/O the event loop would wait for)."""
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def _gossip_metrics(agent: GossipAgent) -> Iterator[Metric]:
    stats = agent.stats
    for name, help_text, value in (
        ("tracker_gossip_rounds", "Gossip rounds started by this process.", stats.rounds),
        ("tracker_gossip_exchanges", "Exchanges with a neighbour that completed.", stats.exchanges),
        ("tracker_gossip_failures", "Exchanges that failed (retried with back-off).", stats.failures),
        ("tracker_gossip_sent_bytes", "Gossip bytes sent (compressed).", stats.bytes_sent),
        ("tracker_gossip_received_bytes", "Gossip bytes received (compressed).", stats.bytes_received),
        (
            "tracker_gossip_rows_applied",
            "Rows that gossip changed here.",
            stats.rows_applied,
        ),
        (
            "tracker_gossip_resends_asked",
            "Merges that left peer rows out for want of their samples and asked the origin's rows again.",
            stats.resends_asked,
        ),
        (
            "tracker_gossip_rows_held_future",
            "Rows held back because they are dated beyond this clock plus the allowed skew.",
            stats.rows_held_future,
        ),
    ):
        yield CounterMetricFamily(name, help_text, value=value)
    rejected = CounterMetricFamily(
        "tracker_gossip_rejected", "Gossip messages refused, by reason (nothing applied).", labels=["reason"]
    )
    for reason, count in sorted(stats.rejected.items()):
        rejected.add_metric([reason], count)
    yield rejected
    # Per neighbour: the totals above cannot say which neighbour is down.
    failing = GaugeMetricFamily(
        "tracker_gossip_neighbor_failures",
        "Failed exchanges with a neighbour since its last one that worked.",
        labels=["neighbor"],
    )
    last = GaugeMetricFamily(
        "tracker_gossip_neighbor_last_success_timestamp_seconds",
        "When an exchange started here with a neighbour last completed (absent: never).",
        labels=["neighbor"],
    )
    for state in agent.neighbor_states():
        failing.add_metric([state.url], state.consecutive_failures)
        if state.last_success_at is not None:
            last.add_metric([state.url], state.last_success_at)
    yield failing
    yield last


class ServiceMetrics:
    """The metrics one app exports; handlers call the ``observe_*`` methods."""

    def __init__(self, tracker: AvailabilityTracker, gossip: GossipAgent | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.events_ingested = Counter(
            "tracker_events_ingested", "Events committed, by kind.", ["kind"], registry=registry
        )
        self.requests_rejected = Counter(
            "tracker_requests_rejected",
            "Requests answered with an error, by code.",
            ["code"],
            registry=registry,
        )
        self.selection_seconds = Histogram(
            "tracker_selection_seconds",
            "Latency of best-peer selection (ranking plus leases), by strategy.",
            ["strategy"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.selection_empty = Counter(
            "tracker_selection_empty",
            "Selections that found no peer to hand out (no holder online, or all at their cap).",
            registry=registry,
        )
        self.http_requests = Counter(
            "tracker_http_requests",
            "HTTP requests, by route and status.",
            ["method", "route", "status"],
            registry=registry,
        )
        self.http_seconds = Histogram(
            "tracker_http_request_seconds", "HTTP request latency, by route.", ["route"], registry=registry
        )
        self.peers_online = Gauge(
            "tracker_peers_online", "Peers seen within peer_timeout.", registry=registry
        )
        self.peers_total = Gauge("tracker_peers", "Peers known to the tracker.", registry=registry)
        self.contents_total = Gauge("tracker_contents", "Contents known to the tracker.", registry=registry)
        self.open_leases = Gauge(
            "tracker_open_leases", "Leases handed out and not yet closed.", registry=registry
        )
        self.under_replicated = Gauge(
            "tracker_under_replicated_contents",
            "Contents with fewer online holders than replication_target (alert when it grows).",
            registry=registry,
        )
        self.database_gauges_age = Gauge(
            "tracker_database_gauges_age_seconds",
            "How old the figures read from the database (peers, contents, leases, under-replicated) "
            "are: a scrape waits at most a few seconds for them, then shows the last ones read.",
            registry=registry,
        )
        self.database_gauges_age.set_function(self._gauges_age)
        registry.register(_TrackerStateCollector(tracker, gossip))
        self._tracker = tracker
        #: The one refresh of the database-derived gauges running, which scrapes share.
        self._refresh: asyncio.Task[None] | None = None
        self._refreshed_at: float | None = None

    def observe_stats(self, stats: TrackerStats) -> None:
        """Copy database-derived figures into gauges (called by ``/metrics`` before rendering)."""
        self.peers_online.set(stats.peers_online)
        self.peers_total.set(stats.peers_total)
        self.contents_total.set(stats.contents_total)
        self.open_leases.set(stats.open_leases)

    async def refresh_database_gauges(self, wait_s: float | None = None) -> None:
        """Read the database-derived gauges again, waiting for that at most ``wait_s`` (``REFRESH_WAIT_S``).

        Counted at 1,000,000 peers on SQLite, the under-replicated contents took 28-48 s a scrape:
        past Prometheus's scrape timeout, and every scrape started one more (QA round 20). Scrapes
        now share one refresh, and one that takes longer leaves the last figures in place (their age
        is ``tracker_database_gauges_age_seconds``) and lands for the next scrape."""
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.create_task(self._read_gauges(), name="peer-tracker-metrics-refresh")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.shield(self._refresh), REFRESH_WAIT_S if wait_s is None else wait_s
            )

    async def _read_gauges(self) -> None:
        # A failing database must not hide the rest of the metrics.
        try:
            self.observe_stats(await self._tracker.stats())
            self.under_replicated.set(await self._tracker.under_replicated_count())
        except (SQLAlchemyError, OSError, TrackerError):
            self.requests_rejected.labels(code="metrics_refresh_failed").inc()
        else:
            self._refreshed_at = time.monotonic()

    def _gauges_age(self) -> float:
        return math.nan if self._refreshed_at is None else time.monotonic() - self._refreshed_at

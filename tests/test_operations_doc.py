"""docs/operations.md documents every setting and every metric: a new config field or metric without a
row there fails these tests."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import httpx
import pytest

from tracker import AvailabilityTracker, TrackerConfig
from tracker.gossip.agent import GossipAgent
from tracker.gossip.config import GossipConfig
from tracker.service import ServiceSettings, create_app

DOC = (Path(__file__).parent.parent / "docs" / "operations.md").read_text()
UNDOCUMENTED = {
    "clock",
    "monotonic",
    "boot_id",
    "reputation",
}  # not settable by env (callables, and the boot they count within), or documented per field elsewhere


@pytest.mark.parametrize(
    "name",
    [
        f.name
        for cls in (TrackerConfig, ServiceSettings)
        for f in dataclasses.fields(cls)
        if f.name not in UNDOCUMENTED
    ],
)
def test_every_setting_has_a_row_with_its_environment_variable(name: str) -> None:
    assert f"| `{name}` | `TRACKER_{name.upper()}` |" in DOC


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(GossipConfig)])
def test_every_gossip_setting_has_a_row_with_its_environment_variable(name: str) -> None:
    assert f"| `{name}` | `TRACKER_GOSSIP_{name.upper()}` |" in DOC


async def test_every_metric_the_service_exposes_has_a_row(tmp_path: Path) -> None:
    """Each metric family of ``/metrics``, gossip's included, named in the metrics table (QA round 31:
    ``tracker_database_gauges_age_seconds`` was not); counters by their exposed ``_total`` name."""
    config = TrackerConfig(database_url=f"sqlite+aiosqlite:///{tmp_path / 'metrics.db'}")
    async with AvailabilityTracker(config) as tracker:
        app = create_app(tracker, gossip=GossipAgent(tracker, GossipConfig(keys=("k" * 32,))))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://tracker.test") as client:
            exposition = (await client.get("/metrics")).text
    families = {
        f"{name.removesuffix('_total')}_total" if kind == "counter" else name
        for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", exposition, flags=re.MULTILINE)
    }
    # prometheus-client's own `_created` twin of an unlabelled counter is its start time, not ours.
    ours = {name for name in families if name.startswith("tracker_") and not name.endswith("_created")}
    assert len(ours) > 30, sorted(families)
    table = DOC[DOC.index("## Metrics and what to alert on") :]
    missing = sorted(name for name in ours if not re.search(f"`{name}[`{{]", table))
    assert not missing, missing

"""docs/operations.md documents every setting: a new config field without a row there fails this test."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tracker import TrackerConfig
from tracker.gossip.config import GossipConfig
from tracker.service import ServiceSettings

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

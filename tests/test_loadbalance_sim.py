"""The load-balancing simulation itself: every download completes, transfers are accounted for, and the
leased strategies respect the cap when leases outlive transfers. Keeps benchmarks/loadbalance.py from rotting;
it asserts nothing about which strategy wins (the benchmark does, on a swarm large enough to mean it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.loadbalance import STRATEGIES, Scenario, build_swarm, simulate, table
from tracker import TrackerConfig

TINY = Scenario(peers=30, contents=6, holders=(4, 10), downloads=40, seed=3)


def test_the_swarm_is_a_function_of_the_seed() -> None:
    assert build_swarm(TINY) == build_swarm(TINY)
    assert build_swarm(TINY) != build_swarm(Scenario(**{**TINY.__dict__, "seed": 4}))
    swarm = build_swarm(TINY)
    assert len(swarm.capacity) == len(swarm.failure) == TINY.peers
    assert abs(sum(swarm.popularity) - 1.0) < 1e-9


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_every_download_completes_and_transfers_add_up(strategy: str, tmp_path: Path) -> None:
    figures = await simulate(TINY, strategy, tmp_path / "sim.db")
    assert figures.downloads == TINY.downloads
    # each download needs `parts` successful transfers; failed ones are retried
    assert figures.transfers >= TINY.downloads * TINY.parts
    assert figures.transfers * figures.failure_rate == pytest.approx(
        figures.transfers - TINY.downloads * TINY.parts
    )
    assert 0 < figures.p50_s <= figures.p99_s
    if strategy in ("best", "weighted"):
        assert figures.max_peer_load <= TrackerConfig().max_load_per_peer


async def test_the_table_compares_with_naive_and_random(tmp_path: Path) -> None:
    results = [await simulate(TINY, s, tmp_path / f"{s}.db") for s in STRATEGIES]
    rendered = table(results)
    assert rendered.count("\n") == 1 + len(STRATEGIES)
    naive_row = next(line for line in rendered.splitlines() if line.startswith("| naive "))
    assert "| 1.00 |" in naive_row

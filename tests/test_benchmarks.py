"""The benchmark suite's quick run and each single benchmark's smallest, so the benchmarks never rot.

Nothing here asserts speed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def _engines() -> str:
    return "all" if os.environ.get("TRACKER_REQUIRE_POSTGRES") == "1" else "sqlite"


# The quick run takes about two minutes on this machine kind when it has the cores to itself; the
# suite-wide 120 s limit failed it once when the machine was busy. Its subprocesses keep their own.
@pytest.mark.timeout(720)
def test_the_quick_suite_runs_and_writes_its_results(tmp_path: Path) -> None:
    engines = _engines()
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "run", "--quick", "--engine", engines, "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    names = [e["engine"] for e in results["engines"]]
    assert names == (["sqlite", "postgresql"] if engines == "all" else ["sqlite"])
    for engine in results["engines"]:
        assert engine["ingest_batch"]["events"] == results["swarm"]["peers"] * 16 + results["swarm"][
            "mappings"
        ] + (results["swarm"]["peers"] // 5)
        assert engine["select_one"]["calls"] == 300 and engine["raw_rank_one"]["p50_ms"] > 0
        # The settings that move the figures are recorded with them (shared_buffers moved the 1m run).
        assert engine["server"]["version"]
        assert "shared_buffers" in engine["server"] or engine["engine"] == "sqlite"
        sweep = engine["select_concurrency"]
        assert list(sweep) == ["1", "2", "4", "8", "16", "32"]
        assert all(r["calls"] >= int(c) and r["qps"] > 0 for c, r in sweep.items())
    table = (tmp_path / "results.md").read_text()
    assert "batch / same statements raw" in table and "batch / plain table" in table
    assert "ranking / raw" in table and "single / batch" in table
    assert "against concurrent callers" in table and "\n| 16 | " in table
    assert "Servers: sqlite 3." in table
    assert re.search(r"gossip round of heartbeats: rows, s \| 4,000, [\d.]+ \|", table)
    if engines == "all":  # Postgres's plan says how many pages came from outside its buffers
        assert re.search(r"pages read outside shared_buffers \| - \| [\d,]+ of [\d,]+ \|", table)
    for engine in results["engines"]:
        # The replay ran every statement of the write path, and the single calls sent their whole mix.
        assert engine["ingest_batch"]["replay_seconds_by_statement"]["INSERT peer_stats"] > 0
        assert engine["ingest_single"]["calls"] == 2_000 and engine["ingest_single"]["ratio_to_batch"] > 0
        # Gossip sent the whole swarm (the suite checks the target then held it) and the floor wrote
        # every row of it, samples included; then every online peer's heartbeat travelled.
        first, beat = engine["gossip"]["first_contact"], engine["gossip"]["heartbeat_round"]
        assert first["rows"] == results["swarm"]["peers"] + results["swarm"]["mappings"]
        assert (
            first["raw_rows"]
            == first["rows"] + first["samples"]
            >= first["rows"] + 10 * results["swarm"]["peers"]
        )
        assert first["merge_s"] > 0 and first["merge_over_raw"] > 0
        assert beat["rows"] == results["swarm"]["peers"] * 4 // 5 and beat["samples"] == 0
    for plot in ("ingest", "selection", "selection-cdf", "selection-concurrency"):
        assert (tmp_path / f"{plot}.png").stat().st_size > 1000, plot
    for name in names:
        assert "SEARCH" in (tmp_path / f"plan-{name}.txt").read_text() or name == "postgresql"
    if "postgresql" in names:
        assert "Execution Time" in (tmp_path / "plan-postgresql.txt").read_text()
    scale = subprocess.run(
        [sys.executable, "-m", "benchmarks", "scale", str(tmp_path / "results.json"), "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert scale.returncode == 0, scale.stderr[-3000:]
    assert (tmp_path / "selection-scale.png").stat().st_size > 1000


# The single-purpose benchmarks (docs name their figures) in their smallest runs, so none of them rots
# unseen: each must finish and say what it measured. Load balancing has its own test module.
SMOKE = {
    "gossip": (["--quick", "--engine", "{engines}", "--json", "{json}"], "[convergence] 16 nodes"),
    "http": (["--quick", "--engine", "{engines}"], "| sqlite | batch |"),
    "sweep": (["--peers", "2000", "--engine", "{engines}"], "ratio sweep/baseline time"),
    "soak": (["--minutes", "0.25", "--json", "{json}"], "database size"),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(SMOKE))
def test_each_single_benchmark_runs(name: str, tmp_path: Path) -> None:
    args, expected = SMOKE[name]
    out = tmp_path / "figures.json"
    argv = [a.format(engines=_engines(), json=out) for a in args]
    result = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert expected in result.stdout, result.stdout[-3000:]
    if name == "gossip":
        figures = json.loads(out.read_text())
        for delta in figures["delta"]:
            # 1,000 peers and 10,000 mappings, every one sent, and all of them again over HTTP.
            assert delta["rows"] == delta["http_rows_applied"] == 11_000
            assert delta["raw_insert_s"] > 0 and delta["heartbeat_round_v2"]["samples"] == 0
        assert [c["nodes"] for c in figures["convergence"]] == [8, 16]
        assert all(c["rounds"] >= 1 for c in figures["convergence"])
    if name == "soak":
        figures = json.loads(out.read_text())
        assert figures["samples"] and "db_growth_last_third_mb" in figures["verdict"]

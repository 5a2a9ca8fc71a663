"""The benchmark suite's quick run, so the benchmarks never rot. Nothing here asserts speed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


# The quick run takes about two minutes on this machine kind when it has the cores to itself; the
# suite-wide 120 s limit failed it once when the machine was busy. Its subprocesses keep their own.
@pytest.mark.timeout(720)
def test_the_quick_suite_runs_and_writes_its_results(tmp_path: Path) -> None:
    engines = "all" if os.environ.get("TRACKER_REQUIRE_POSTGRES") == "1" else "sqlite"
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
    if engines == "all":  # Postgres's plan says how many pages came from outside its buffers
        assert re.search(r"pages read outside shared_buffers \| - \| [\d,]+ of [\d,]+ \|", table)
    for engine in results["engines"]:
        # The replay ran every statement of the write path, and the single calls sent their whole mix.
        assert engine["ingest_batch"]["replay_seconds_by_statement"]["INSERT peer_stats"] > 0
        assert engine["ingest_single"]["calls"] == 2_000 and engine["ingest_single"]["ratio_to_batch"] > 0
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

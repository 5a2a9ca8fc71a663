"""The benchmark suite's quick run, so the benchmarks never rot. Nothing here asserts speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


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
    table = (tmp_path / "results.md").read_text()
    assert "batch / raw" in table and "ranking / raw" in table
    assert (tmp_path / "ingest.png").stat().st_size > 1000 and (
        tmp_path / "selection.png"
    ).stat().st_size > 1000

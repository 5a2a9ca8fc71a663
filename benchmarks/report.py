"""The suite's report: the Markdown table and the plots, from ``results.json`` alone.

``python -m benchmarks scale A.json B.json --out DIR`` plots cost against scale from two runs of the
suite at different ``--scale`` (the same machine, one after the other).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _cell(value: float | None, spec: str) -> str:
    """A table cell; a figure the run skipped (``--no-replay``) shows as a dash."""
    return "-" if value is None else format(value, spec)


def _beside_selections(e: dict[str, Any]) -> str:
    b = e.get("beside_ingest")  # results from before this workload have none
    return "-" if b is None else f"{b['select']['qps']:,.0f} ({b['select_ratio']:.2f})"


def _beside_ingest(e: dict[str, Any]) -> str:
    b = e.get("beside_ingest")
    return "-" if b is None else f"{b['ingest_beside_per_s']:,.0f} ({b['ingest_ratio']:.2f})"


def _concurrency(results: dict[str, Any]) -> list[tuple[str, dict[str, dict[str, Any]]]]:
    """Each engine's (and Redis's) selections by number of callers; runs before the sweep have none."""
    series = [(e["engine"], e["select_concurrency"]) for e in results["engines"] if "select_concurrency" in e]
    redis = results.get("redis") or {}
    if "concurrency" in redis:
        series.append(("Redis", redis["concurrency"]))
    return series


def _concurrency_table(results: dict[str, Any]) -> list[str]:
    series = _concurrency(results)
    if not series:
        return []
    levels = list(series[0][1])
    return [
        "",
        "Selections/s (p99 ms) against concurrent callers:",
        "",
        "| callers | " + " | ".join(name for name, _ in series) + " |",
        "|---|" + "---|" * len(series),
        *(
            f"| {level} | "
            + " | ".join(f"{s[level]['qps']:,.0f} ({s[level]['p99_ms']:.1f})" for _, s in series)
            + " |"
            for level in levels
        ),
    ]


def _server_line(engine: dict[str, Any]) -> str:
    server = dict(engine.get("server") or {})  # results written before servers were recorded lack it
    version = server.pop("version", "version not recorded")
    return f"{engine['engine']} {version}" + (
        " (" + ", ".join(f"{k} {v}" for k, v in server.items()) + ")" if server else ""
    )


def _pages_read(engine: dict[str, Any]) -> str:
    """From the top ``Buffers:`` line of Postgres's plan: pages a ranking read from outside the
    server's buffers, of all it touched. At 1m with the default 128 MB it was ~19% (2.2x the 100k
    selection's cost); none at 100k."""
    for line in engine["plan_hottest"]:
        if line.strip().startswith("Buffers:"):
            hit, read = (int(m) if (m := _buffers(line, k)) else 0 for k in ("hit", "read"))
            return f"{read:,} of {hit + read:,}"
    return "-"


def _buffers(line: str, kind: str) -> str | None:
    match = re.search(rf"\bshared\b[^,]*?\b{kind}=(\d+)", line)
    return match.group(1) if match else None


def _gossip_cell(e: dict[str, Any], cell: Callable[[dict[str, Any]], str]) -> str:
    # Runs with --no-gossip, and results written before the suite had gossip, have none.
    return "-" if "gossip" not in e else cell(e["gossip"]["first_contact"])


def _gossip_size(e: dict[str, Any]) -> str:
    return _gossip_cell(e, lambda g: f"{g['rows']:,} ({g['samples']:,}), {g['messages']:,}")


def _gossip_round(e: dict[str, Any]) -> str:
    if "gossip" not in e:
        return "-"
    r = e["gossip"]["heartbeat_round"]
    return f"{r['rows']:,}, {r['total_s']:.1f}"


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"Swarm: {results['swarm']['peers']:,} peers, {results['swarm']['contents']:,} contents, "
        f"{results['swarm']['mappings']:,} mappings (scale {results['scale']}). Machine: {m['cpus']} CPUs, "
        f"Python {m['python']}, {m['date']}.",
        "Servers: " + "; ".join(_server_line(e) for e in results["engines"]) + ".",
        "",
        "| figure | " + " | ".join(e["engine"] for e in results["engines"]) + " |",
        "|---|" + "---|" * len(results["engines"]),
    ]

    def paired_memory_p50(e: dict[str, Any]) -> float:
        # Results written before the paired measurement have only the run's standalone figure.
        return float(e.get("memory_beside", results["memory"])["p50_ms"])

    rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("batch ingest, events/s", lambda e: f"{e['ingest_batch']['events_per_s']:,.0f}"),
        (
            "same statements, bare driver, events/s",
            lambda e: _cell(e["ingest_batch"].get("replay_events_per_s"), ",.0f"),
        ),
        ("batch / same statements raw", lambda e: _cell(e["ingest_batch"].get("ratio_to_replay"), ".2f")),
        ("plain-table rows, bare driver, rows/s", lambda e: f"{e['ingest_batch']['raw_rows_per_s']:,.0f}"),
        ("batch / plain table (target >= 0.5)", lambda e: f"{e['ingest_batch']['ratio_to_raw']:.2f}"),
        ("single calls x100, events/s", lambda e: f"{e['ingest_single']['events_per_s']:,.0f}"),
        ("single / batch (target >= 0.5)", lambda e: f"{e['ingest_single']['ratio_to_batch']:.2f}"),
        (
            "select_best_peers p50 / p99 ms",
            lambda e: f"{e['select_one']['p50_ms']:.2f} / {e['select_one']['p99_ms']:.2f}",
        ),
        ("select_best_peers, 32 callers, /s", lambda e: f"{e['select_many']['qps']:,.0f}"),
        ("32 callers beside an ingest, /s (of alone)", _beside_selections),
        ("heartbeat ingest beside 32 callers, events/s (of alone)", _beside_ingest),
        ("ranking p50 ms", lambda e: f"{e['rank_one']['p50_ms']:.2f}"),
        ("same SQL raw p50 ms", lambda e: f"{e['raw_rank_one']['p50_ms']:.2f}"),
        ("hottest content's plan: pages read outside shared_buffers", _pages_read),
        ("ranking / raw (target <= 2)", lambda e: f"{e['rank_over_raw_p50']:.2f}"),
        ("in-memory heapq p50 ms, paired with the selections", lambda e: f"{paired_memory_p50(e):.2f}"),
        (
            "select_best_peers p50 / in-memory paired (target <= 5)",
            lambda e: f"{e['select_one']['p50_ms'] / paired_memory_p50(e):.1f}",
        ),
        # The paired loop runs with caches the selections just used; alone, with its dicts hot, it is
        # faster. Both are shown: the target is read against each.
        (
            "select_best_peers p50 / in-memory alone",
            lambda e: f"{e['select_one']['p50_ms'] / results['memory']['p50_ms']:.1f}",
        ),
        ("sweep, s", lambda e: f"{e['sweep']['duration_s']:.2f}"),
        ("gossip first contact: peer and mapping rows (samples), messages", _gossip_size),
        (
            "gossip first contact: s (rows/s); merge s",
            lambda e: _gossip_cell(
                e,
                lambda g: f"{g['total_s']:.1f} ({g['rows_per_s']:,.0f}); {g['merge_s']:.1f}",
            ),
        ),
        (
            "gossip merge / bare driver inserting the same rows",
            lambda e: _gossip_cell(e, lambda g: f"{g['merge_over_raw']:.1f}"),
        ),
        ("gossip round of heartbeats: rows, s", _gossip_round),
    ]
    for name, cell in rows:
        lines.append(f"| {name} | " + " | ".join(cell(e) for e in results["engines"]) + " |")
    lines += _concurrency_table(results)
    lines.append("")
    lines.append(f"In-memory dict + heapq: p50 {results['memory']['p50_ms']:.3f} ms.")
    if results["redis"] is not None:
        r = results["redis"]
        lines.append(
            f"Redis sorted sets (ZREVRANGE): p50 {r['one']['p50_ms']:.3f} ms, "
            f"{r['many']['qps']:,.0f} queries/s "
            "from 32 callers."
        )
    return "\n".join(lines) + "\n"


def write_plans(results: dict[str, Any], out: Path) -> None:
    """Each engine's plan for the hottest content's ranking, as ``plan-<engine>.txt``."""
    for e in results["engines"]:
        (out / f"plan-{e['engine']}.txt").write_text("\n".join(e["plan_hottest"]) + "\n")


def plot(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = [e["engine"] for e in results["engines"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    x = range(len(engines))
    ax.bar(
        [i - 0.3 for i in x],
        [e["ingest_batch"]["events_per_s"] for e in results["engines"]],
        0.3,
        label="record_batch",
    )
    ax.bar(
        list(x),
        [e["ingest_single"]["events_per_s"] for e in results["engines"]],
        0.3,
        label="single calls x100",
    )
    ax.bar(
        [i + 0.3 for i in x],
        [e["ingest_batch"]["raw_rows_per_s"] for e in results["engines"]],
        0.3,
        label="raw driver",
    )
    ax.set_xticks(list(x), engines)
    ax.set_ylabel("events (rows) per second")
    ax.set_title("Ingest")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "ingest.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    labels, values = [], []
    for e in results["engines"]:
        for key, name in (
            ("select_one", "select_best_peers"),
            ("rank_one", "ranking"),
            ("raw_rank_one", "raw SQL"),
        ):
            labels.append(f"{e['engine']}\n{name}")
            values.append(e[key]["p50_ms"])
    labels.append("in-memory\nheapq")
    values.append(results["memory"]["p50_ms"])
    if results["redis"] is not None:
        labels.append("Redis\nZREVRANGE")
        values.append(results["redis"]["one"]["p50_ms"])
    ax.bar(labels, values)
    ax.set_ylabel("p50 latency, ms (one caller)")
    ax.set_title("Best peers for a content")
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(out / "selection.png", dpi=100)
    plt.close(fig)

    # Latency CDFs of one caller's selections, beside the baselines.
    fig, ax = plt.subplots(figsize=(7, 4))
    series = [(f"{e['engine']} select_best_peers", e["select_one"]) for e in results["engines"]]
    series += [(f"{e['engine']} raw ranking SQL", e["raw_rank_one"]) for e in results["engines"]]
    series.append(("in-memory heapq", results["memory"]))
    if results["redis"] is not None:
        series.append(("Redis ZREVRANGE", results["redis"]["one"]))
    for name, run in series:
        ax.plot(run["cdf_ms"], [q / 100 for q in range(101)], label=name)
    ax.set_xscale("log")
    ax.set_xlabel("latency, ms (log)")
    ax.set_ylabel("fraction of queries")
    ax.set_title("Best peers for a content: latency CDF, one caller")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "selection-cdf.png", dpi=100)
    plt.close(fig)

    # Throughput against concurrency: the sweep over 1..32 callers (runs before it: 1 and 32 only).
    fig, ax = plt.subplots(figsize=(7, 4))
    curves = [
        (name, [int(c) for c in sweep], [r["qps"] for r in sweep.values()])
        for name, sweep in _concurrency(results)
    ]
    if not curves:
        curves = [
            (e["engine"], [1, 32], [e["select_one"]["qps"], e["select_many"]["qps"]])
            for e in results["engines"]
        ]
        if results["redis"] is not None:
            curves.append(
                ("Redis", [1, 32], [results["redis"]["one"]["qps"], results["redis"]["many"]["qps"]])
            )
    for name, callers, qps in curves:
        ax.plot(callers, qps, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrent callers")
    ax.set_ylabel("selections per second (log)")
    ax.set_title("Best peers for a content: throughput against concurrency")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "selection-concurrency.png", dpi=100)
    plt.close(fig)


def plot_scale(paths: list[Path], out: Path) -> None:
    """Selection p50 (library, raw SQL, in-memory) against swarm size, from several suite runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted((json.loads(p.read_text()) for p in paths), key=lambda r: r["swarm"]["peers"])
    peers = [r["swarm"]["peers"] for r in runs]
    fig, ax = plt.subplots(figsize=(7, 4))
    engines = sorted({e["engine"] for r in runs for e in r["engines"]})
    for engine in engines:
        for key, name in (("select_one", "select_best_peers"), ("raw_rank_one", "raw ranking SQL")):
            points = [
                (r["swarm"]["peers"], e[key]["p50_ms"])
                for r in runs
                for e in r["engines"]
                if e["engine"] == engine
            ]
            ax.plot(*zip(*points, strict=True), marker="o", label=f"{engine} {name}")
    ax.plot(peers, [r["memory"]["p50_ms"] for r in runs], marker="o", label="in-memory heapq")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("peers in the swarm (log)")
    ax.set_ylabel("p50 latency, ms (log)")
    ax.set_title("Best peers for a content: cost against scale")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "selection-scale.png", dpi=100)
    plt.close(fig)

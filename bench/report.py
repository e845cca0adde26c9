"""Turning the runs into ``results.json``, a markdown table and a PNG plot."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.stats import RATIOS, median, ratio, ratios_per_rep
from bench.systems import SYSTEMS


def label(system: str) -> str:
    """How tables name a system: ``inferq ×1``, ``ideal pipeline``, ..."""
    known = SYSTEMS.get(system)
    return known.label if known is not None else system


TARGETS = {
    "inferq-x1 / ideal": "≥ 0.6 (goal 0.75)",
    "inferq-x1 / naive": "≥ 4",
    "inferq-x1 / celery": "≥ 6",
    "inferq-x2 / inferq-x1": "≥ 1.3",
    "inferq-x1 / inferq-x1-nomon": "≥ 0.95",
}
P99_RATE = "500"
P99_TARGET = "≤ 2"
ROLES = ("worker", "broker", "driver")


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per system, and the target ratios per repetition (taken inside one repetition)."""
    drains = [r for r in runs if r["kind"] == "drain"]
    by_rep: dict[int, dict[str, float]] = defaultdict(dict)
    for r in drains:
        by_rep[r["rep"]][r["system"]] = r["throughput_jobs_s"]
    drain_summary: dict[str, Any] = {}
    for system in dict.fromkeys(r["system"] for r in drains):
        mine = [r for r in drains if r["system"] == system]
        drain_summary[system] = {
            "throughput_jobs_s": [r["throughput_jobs_s"] for r in mine],
            "median_jobs_s": round(median(r["throughput_jobs_s"] for r in mine), 1),
            "cpu_us_per_job": {
                role: round(median(r["cpu_us_per_job"].get(role, math.nan) for r in mine), 1) for role in ROLES
            },
            "worker_rss_mb": max(r["worker_rss_mb"] for r in mine),
            "onnxruntime_share_of_worker_cpu": median(r["onnxruntime_share_of_worker_cpu"] or math.nan for r in mine),
        }
    ratios = ratios_per_rep(by_rep)
    latency_summary: dict[str, Any] = defaultdict(dict)
    for r in (r for r in runs if r["kind"] == "latency"):
        entry = latency_summary[r["system"]].setdefault(str(int(r["offered_jobs_s"])), {"runs": []})
        keys = ("rep", "saturated", "p50_ms", "p95_ms", "p99_ms", "max_ms", "samples", "breakdown_ms")
        entry["runs"].append({k: r[k] for k in keys})
    for rates in latency_summary.values():
        for entry in rates.values():
            kept = [run for run in entry["runs"] if not run["saturated"]]
            entry["saturated_runs"] = len(entry["runs"]) - len(kept)
            for key in ("p50_ms", "p95_ms", "p99_ms"):
                entry[key] = round(median(run[key] for run in kept), 3)
    return {
        "drain": drain_summary,
        "ratios": {name: {"runs": values, "median": round(median(values), 3)} for name, values in ratios.items()},
        "latency": dict(latency_summary),
        "p99_ratio": _p99_ratio(runs),
    }


def _p99_ratio(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """p99 at the paced rate of inferq ×1 over the ideal pipeline's, per repetition."""
    p99: dict[int, dict[str, float]] = defaultdict(dict)
    for r in runs:
        if r["kind"] == "latency" and str(int(r["offered_jobs_s"])) == P99_RATE and not r["saturated"]:
            p99[r["rep"]][r["system"]] = r["p99_ms"]
    values = [ratio(by.get("inferq-x1", math.nan), by.get("ideal", math.nan)) for _, by in sorted(p99.items())]
    return {"runs": values, "median": round(median(values), 3)}


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    """The tables the README shows."""
    reps = meta["reps"]
    runs_header = " | ".join(f"run {i + 1}" for i in range(reps))
    lines = [
        f"Drain: {meta['jobs']:,} 1-row jobs ({meta['naive_jobs']:,} for the naive and Celery baselines) queued first, "
        f"first to last result; {reps} interleaved repetitions.",
        "",
        f"| system | {runs_header} | median jobs/s | worker CPU µs/job | broker CPU µs/job | driver CPU µs/job "
        "| worker RSS MB | onnxruntime share of worker CPU |",
        "|---" * (reps + 7) + "|",
    ]
    for system, s in summary["drain"].items():
        runs = " | ".join(_fmt(v) for v in s["throughput_jobs_s"])
        cpu = " | ".join(_fmt(s["cpu_us_per_job"][role]) for role in ROLES)
        share = s["onnxruntime_share_of_worker_cpu"]
        lines.append(
            f"| {label(system)} | {runs} | **{_fmt(s['median_jobs_s'])}** | {cpu} | {_fmt(s['worker_rss_mb'])} "
            f"| {_fmt(share * 100, 1)} % |"
        )
    lines += ["", f"| ratio (same repetition) | {runs_header} | median | target |", "|---" * (reps + 3) + "|"]
    for name in RATIOS:
        if name in summary["ratios"]:
            r = summary["ratios"][name]
            runs = " | ".join(_fmt(v, 2) for v in r["runs"])
            top, bottom = RATIOS[name]
            lines.append(f"| {label(top)} / {label(bottom)} | {runs} | **{_fmt(r['median'], 2)}** | {TARGETS[name]} |")
    p99 = summary.get("p99_ratio")
    if p99 and p99["runs"]:
        each = " | ".join(_fmt(v, 2) for v in p99["runs"]) + " | -" * (reps - len(p99["runs"]))
        lines.append(
            f"| p99 at {P99_RATE} jobs/s, {label('inferq-x1')} / {label('ideal')} | {each} "
            f"| **{_fmt(p99['median'], 2)}** | {P99_TARGET} |"
        )
    lines += [
        "",
        f"Latency, publish → result received (ms), after a {meta['warmup_s']:g} s warm-up, "
        f"{meta['latency_s']:g} s per rate; median of the repetitions that kept up, and every run's p99. "
        "*saturated*: the system fell more than 2 s of jobs behind the offered rate, so the run was stopped "
        "(its latency would only measure a growing queue) and higher rates were skipped.",
        "",
        "| system | offered jobs/s | p50 | p95 | p99 | p99 of each run |",
        "|---|---|---|---|---|---|",
    ]
    for system, rates in summary["latency"].items():
        for rate, e in rates.items():
            each = ", ".join("saturated" if run["saturated"] else _fmt(run["p99_ms"], 2) for run in e["runs"])
            lines.append(
                f"| {label(system)} | {rate} | {_fmt(e['p50_ms'], 2)} | {_fmt(e['p95_ms'], 2)} | "
                f"**{_fmt(e['p99_ms'], 2)}** | {each} |"
            )
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], runs: list[dict[str, Any]], path: Path) -> None:
    """Throughput bars (every repetition as a dot) and latency percentiles per system and rate."""
    import matplotlib  # noqa: PLC0415  (only the report needs it; headless backend before pyplot)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1, 1.5]})
    systems = list(summary["drain"])
    medians = [summary["drain"][s]["median_jobs_s"] for s in systems]
    colors = ["#2b6cb0", "#3182ce", "#718096", "#c05621", "#38a169"]
    bars = left.bar([label(s) for s in systems], medians, color=colors[: len(systems)])
    for x, system in enumerate(systems):
        values = summary["drain"][system]["throughput_jobs_s"]
        left.scatter([x + 0.28] * len(values), values, color="black", s=14, zorder=3)
    left.bar_label(bars, labels=[f"{m:,.0f}" for m in medians], padding=3)
    left.set_ylabel("jobs/s (drain, first to last result)")
    left.set_title("Drain throughput (bar: median; dots: each repetition)")
    left.margins(y=0.15)

    groups = [(s, rate) for s, rates in summary["latency"].items() for rate in rates]
    if not groups:
        right.set_axis_off()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return
    width = 0.27
    for offset, (key, color) in enumerate((("p50_ms", "#68d391"), ("p95_ms", "#f6ad55"), ("p99_ms", "#e53e3e"))):
        values = [summary["latency"][s][rate][key] for s, rate in groups]
        values = [0.0 if math.isnan(v) else v for v in values]  # saturated: no bar
        right.bar([i + (offset - 1) * width for i in range(len(groups))], values, width, label=key[:3], color=color)
    labels = [
        f"{label(s)}\n{rate}/s" + ("\n(saturated)" if math.isnan(summary["latency"][s][rate]["p50_ms"]) else "")
        for s, rate in groups
    ]
    right.set_xticks(range(len(groups)), labels, fontsize=8)
    right.set_yscale("log")
    right.set_ylabel("ms, publish → result received (log scale)")
    right.set_title("Latency at fixed offered rates (median of runs)")
    right.axhline(3.0, color="grey", linestyle="--", linewidth=1, label="3 ms p99 target at 500/s")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

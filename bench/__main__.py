"""``python -m bench`` (``make bench``): inferq, the ideal pipeline, a naive worker and Celery on one workload.

Every measurement is repeated ``--reps`` times, interleaved (all systems once, then all again), because
the machine is shared: the comparison that counts is the ratio inside one repetition.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

from bench.measure import Bench, drain, latency
from bench.report import markdown, plot, summarize
from bench.systems import ROOT, SYSTEMS
from bench.workload import MODELS, Jobs, publish_models

DEFAULT_JOBS = 50_000
DEFAULT_NAIVE_JOBS = 10_000


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--jobs", type=int, default=DEFAULT_JOBS, help="jobs per drain run")
    parser.add_argument(
        "--naive-jobs",
        type=int,
        default=DEFAULT_NAIVE_JOBS,
        help="jobs per drain run of the naive and Celery baselines (the slow ones: at ~1k jobs/s, 50,000 jobs "
        "three times would take most of the time budget on their own)",
    )
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions")
    parser.add_argument("--rates", default="500,2000", help="offered rates for the latency runs, jobs/s")
    parser.add_argument("--latency-s", type=float, default=6.0, help="measured seconds per offered rate")
    parser.add_argument("--warmup-s", type=float, default=1.0, help="seconds at each rate before measuring")
    parser.add_argument("--drain-systems", default=",".join(SYSTEMS), help="systems for the drain runs")
    parser.add_argument("--latency-systems", default="inferq-x1,ideal,naive", help="systems for latency runs")
    parser.add_argument(
        "--result-store",
        default="sqlite",
        help="inferq's result store: sqlite (the default store), file, or a postgresql:// URL",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--work", type=Path, default=ROOT / "var" / "bench", help="models, results and logs")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, result files)")
    parser.add_argument("--replot", action="store_true", help="redraw table and plot from --out's results.json")
    parser.add_argument(
        "--amqp-url", default=os.environ.get("INFERQ_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
    )
    return parser.parse_args()


def _systems(names: str) -> list[Any]:
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in SYSTEMS]
    if unknown:
        raise SystemExit(f"unknown systems {unknown}; choose from {list(SYSTEMS)}")
    return [SYSTEMS[n] for n in chosen]


def _meta(args: argparse.Namespace) -> dict[str, Any]:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], check=False, cwd=ROOT, capture_output=True, text=True
    )
    return {
        "jobs": args.jobs,
        "naive_jobs": args.naive_jobs,
        "result_store": args.result_store,
        "reps": args.reps,
        "rates": [float(r) for r in args.rates.split(",")],
        "latency_s": args.latency_s,
        "warmup_s": args.warmup_s,
        "models": [f"{m.name} ({m.kind}, {m.features} features)" for m in MODELS],
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "commit": commit.stdout.strip(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_report(out: Path, meta: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    """results.json, results.md and results.png under ``out``; returns the markdown."""
    summary = summarize(runs)
    table = markdown(summary, meta)
    (out / "results.json").write_bytes(
        orjson.dumps({"meta": meta, "summary": summary, "runs": runs}, option=orjson.OPT_INDENT_2)
    )
    (out / "results.md").write_text(table)
    plot(summary, runs, out / "results.png")
    return table


def main() -> None:
    args = _args()
    if args.replot:
        saved = orjson.loads((args.out / "results.json").read_bytes())
        print(write_report(args.out, saved["meta"], saved["runs"]))
        return
    drain_systems, latency_systems = _systems(args.drain_systems), _systems(args.latency_systems)
    meta = _meta(args)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print("training and publishing the models …", flush=True)
    publish_models(args.work / "models")
    bench = Bench(args.amqp_url, args.work / "models", args.work, Jobs(), uuid.uuid4().hex[:8], args.result_store)
    runs: list[dict[str, Any]] = []
    try:
        for rep in range(1, args.reps + 1):
            # Every other repetition runs the systems in reverse order, so a machine that gets busier or
            # quieter during the run does not favour whichever system always goes first.
            order = 1 if rep % 2 else -1
            for system in drain_systems[::order]:
                slow = system.kind in ("naive", "celery")
                run = drain(bench, system, rep, args.naive_jobs if slow else args.jobs)
                print(
                    f"rep {rep} drain   {system.name:<9} {run['throughput_jobs_s']:>9,.0f} jobs/s"
                    f"  ({run['jobs']:,} jobs, {run['wall_s']:.0f} s with set-up)",
                    flush=True,
                )
                runs.append(run)
            for system in latency_systems[::order]:
                for run in latency(bench, system, rep, meta["rates"], args.latency_s, args.warmup_s):
                    found = (
                        f"saturated ({run['results']:,} of {run['published']:,} results in time)"
                        if run["saturated"]
                        else f"p50 {run['p50_ms']:.2f}  p95 {run['p95_ms']:.2f}  p99 {run['p99_ms']:.2f} ms"
                    )
                    print(f"rep {rep} latency {system.name:<9} {run['offered_jobs_s']:>6,.0f}/s  {found}", flush=True)
                    runs.append(run)
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    meta["load_average_at_end"] = os.getloadavg()
    meta["wall_s"] = round(time.monotonic() - started, 1)
    table = write_report(args.out, meta, runs)
    print()
    print(table)
    print(f"wrote {args.out}/results.json, results.md and results.png in {meta['wall_s']:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()

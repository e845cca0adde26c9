"""``python -m bench.monitor_cost``: what drift counting costs a draining worker, with and without, one run.

The bench's three models are published with their training rows as reference (or, with ``--tabular``,
a pipeline over two text and five numeric columns, one input per column, with its rows by name).
Each repetition drains the same number of preloaded 1-row jobs twice, in alternating order: once with
``INFERQ_MONITOR=true`` and once with it off, each in an in-process worker (SQLite result store).
Reported per repetition: the throughput ratio (on / off), the worker CPU per job of both, and the share
of the worker's CPU that the counting itself took (thread CPU time inside ``Monitor.observe``). Ratios
only: the machine is shared.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.load import Load, declare, delete
from bench.measure import Bench
from bench.workload import Jobs, TabularJobs, publish_models, publish_tabular
from inferq.monitoring.counting import Monitor
from inferq.shared.config.settings import WorkerSettings
from inferq.worker.worker import build_worker


class _TimedMonitor(Monitor):
    """The real monitor, adding up the thread CPU time each batch's counting takes."""

    spent_s = 0.0

    def observe(self, *args: Any, **kwargs: Any) -> None:
        started = time.thread_time()
        super().observe(*args, **kwargs)
        _TimedMonitor.spent_s += time.thread_time() - started


def _drain(bench: Bench, run: str, jobs: int, monitor: bool) -> dict[str, float]:
    base = bench.settings(run)
    settings = WorkerSettings(
        amqp_url=base.amqp_url,
        jobs_queue=base.jobs_queue,
        results_queue=base.results_queue,
        model_store=base.model_store,
        result_store=f"sqlite:{bench.work_dir / run / 'results.db'}",
        monitor=monitor,
        metrics_port=0,
        drain_poll_ms=50,
    )
    declare(settings)
    load = Load(settings)
    load.preload(itertools.islice(bench.job_stream(run), jobs))
    load.close()
    worker = build_worker(settings, drain=True)
    if worker.processor.monitor is not None:
        timed = _TimedMonitor(worker.processor.monitor.store, settings.monitor_window_s, worker.name)
        worker.processor.monitor = timed
    _TimedMonitor.spent_s = 0.0
    cpu, wall = time.process_time(), time.perf_counter()
    counters = worker.run()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    delete(settings)
    if counters.succeeded != jobs:
        raise SystemExit(f"{run}: {counters.succeeded} of {jobs} jobs succeeded")
    return {"jobs_s": jobs / wall, "cpu_us_per_job": cpu / jobs * 1e6, "observe_share": _TimedMonitor.spent_s / cpu}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.monitor_cost", description=__doc__)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--tabular",
        action="store_true",
        help="Jobs for a pipeline over named columns (two text, five numbers, one input each) instead.",
    )
    parser.add_argument(
        "--amqp-url", default=os.environ.get("INFERQ_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="inferq-monitor-cost-"))
    try:
        (publish_tabular if args.tabular else publish_models)(work / "models")
        jobs = TabularJobs() if args.tabular else Jobs()
        bench = Bench(args.amqp_url, work / "models", work, jobs, uuid.uuid4().hex[:8])
        ratios, shares, cpu_ratios = [], [], []
        for rep in range(1, args.reps + 1):
            order = (True, False) if rep % 2 else (False, True)
            runs = {on: _drain(bench, f"r{rep}-{'on' if on else 'off'}", args.jobs, on) for on in order}
            on, off = runs[True], runs[False]
            ratios.append(on["jobs_s"] / off["jobs_s"])
            cpu_ratios.append(on["cpu_us_per_job"] / off["cpu_us_per_job"])
            shares.append(on["observe_share"])
            print(
                f"rep {rep}: monitor on {on['jobs_s']:,.0f} jobs/s ({on['cpu_us_per_job']:.0f} µs CPU/job), "
                f"off {off['jobs_s']:,.0f} jobs/s ({off['cpu_us_per_job']:.0f} µs CPU/job); "
                f"throughput on/off {ratios[-1]:.3f}, counting {on['observe_share']:.2%} of the worker's CPU",
                flush=True,
            )
        print(
            f"median over {args.reps} reps of {args.jobs:,} jobs: throughput on/off {statistics.median(ratios):.3f}, "
            f"CPU per job on/off {statistics.median(cpu_ratios):.3f}, counting {statistics.median(shares):.2%} of CPU"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

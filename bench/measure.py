"""One measurement each: a drain run (backlog first, first to last result) and a latency run (fixed
offered rates, publish to result received). Both record CPU per job of the broker, the workers and the
driver, the workers' peak RSS and the share of worker CPU spent in onnxruntime."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from bench.load import DepthProbe, Load, Offered, celery_message, declare, delete
from bench.stats import latency_summary, percentile
from bench.systems import Running, System, fresh_result_store, result_store_location, start
from bench.workload import Jobs
from inferq.shared.config.settings import InferqSettings
from inferq.shared.results.stores import open_result_store

POLL_S = 0.02
RSS_EVERY = 10  # polls
GRACE_S = 5.0


def broker_process(port: int = 5672) -> psutil.Process | None:
    """The RabbitMQ node listening on ``port`` (other nodes may run on this machine)."""
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return psutil.Process(conn.pid)
    except psutil.AccessDenied:
        pass
    beams = [p for p in psutil.process_iter(["name"]) if p.info["name"] == "beam.smp"]
    return beams[0] if len(beams) == 1 else None


def _cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


class Monitor:
    """CPU seconds and peak RSS of the workers, the broker and this driver."""

    def __init__(self, worker_pids: list[int], broker: psutil.Process | None) -> None:
        self.workers = [psutil.Process(pid) for pid in worker_pids]
        self.broker = broker
        self.driver = psutil.Process()
        self.rss_peak = dict.fromkeys(worker_pids, 0)
        self._last_cpu = dict.fromkeys(worker_pids, 0.0)
        self._children: dict[int, psutil.Process] = {}

    def _processes(self) -> list[psutil.Process]:
        # A worker's children (Celery's prefork pool) are workers too.
        for proc in self.workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                for child in proc.children(recursive=True):
                    self._children.setdefault(child.pid, child)
        return self.workers + list(self._children.values())

    def cpu(self) -> dict[str, float]:
        """Cumulative CPU seconds per role (``nan`` for the broker when it cannot be found). A worker
        that has exited counts with its last reading: call this often while workers may exit."""
        for proc in self._processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                self._last_cpu[proc.pid] = _cpu_s(proc)
        return {
            "worker": sum(self._last_cpu.values()),
            "broker": _cpu_s(self.broker) if self.broker is not None else float("nan"),
            "driver": _cpu_s(self.driver),
        }

    def sample_rss(self) -> None:
        """Remember each worker's largest resident set size."""
        for proc in self._processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                self.rss_peak[proc.pid] = max(self.rss_peak.get(proc.pid, 0), proc.memory_info().rss)

    def rss_mb(self) -> float:
        """The largest RSS of any worker, MiB."""
        return round(max(self.rss_peak.values(), default=0) / 2**20, 1)


def per_job_us(before: dict[str, float], after: dict[str, float], jobs: int) -> dict[str, float]:
    """CPU microseconds per job of each role between two :meth:`Monitor.cpu` samples."""
    if jobs <= 0:
        return {}
    return {role: round((after[role] - before[role]) / jobs * 1e6, 1) for role in before}


@dataclass(frozen=True, slots=True)
class Bench:
    """What every measurement shares: broker URL, model store, work directory, the job bodies."""

    amqp_url: str
    model_store: Path
    work_dir: Path
    jobs: Jobs
    tag: str
    result_store: str = "sqlite"

    def settings(self, run: str) -> InferqSettings:
        """Settings naming this run's own queues (deleted afterwards)."""
        return InferqSettings(
            amqp_url=self.amqp_url,
            jobs_queue=f"bench.{self.tag}.{run}.jobs",
            results_queue=f"bench.{self.tag}.{run}.results",
            model_store=str(self.model_store),
        )

    def job_stream(self, run: str) -> Iterator[tuple[str, bytes]]:
        """Endless (id, body) pairs for run ``run``."""
        index = 0
        while True:
            job_id = f"{run}-{index:08d}"
            yield job_id, self.jobs.body(index, job_id)
            index += 1


def _take(stream: Iterator[tuple[str, bytes]], count: int) -> Iterator[tuple[str, bytes]]:
    for _ in range(count):
        yield next(stream)


def drain(bench: Bench, system: System, rep: int, jobs: int) -> dict[str, Any]:
    """Queue ``jobs`` first, then start the system and time first to last result."""
    run = f"r{rep}-{system.slug}-drain"
    settings = bench.settings(run)
    run_dir = bench.work_dir / run
    wall_started = time.monotonic()
    celery = system.kind == "celery"
    declare(settings, celery=celery)
    load = Load(settings, celery_message if celery else None)
    cpu_before = time.process_time()
    load.preload(_take(bench.job_stream(run), jobs))
    preload_us = (time.process_time() - cpu_before) / jobs * 1e6
    load.close()
    running = start(system, settings, run_dir, drain=True, result_store=bench.result_store)
    probe = DepthProbe(settings)
    # Celery stores nothing and publishes nothing: its progress is the jobs taken from its queue (late
    # acks and a prefetch of 4 per process: at most 8 of the last jobs are still running at the end).
    done: Callable[[], int] = (
        (lambda: jobs - probe(settings.jobs_queue)[0]) if celery else (lambda: probe(settings.results_queue)[0])
    )
    try:
        window = _watch_drain(running, done, jobs)
    finally:
        running.stop()
        probe.close()
        delete(settings)
    first_s, first_count, last_s, cpu_first, cpu_last, rss_mb = window
    worker_cpu = cpu_last.get("worker", 0.0) - cpu_first.get("worker", 0.0)
    ort_s = running.onnxruntime_s()
    out: dict[str, Any] = {
        "kind": "drain",
        "system": system.name,
        "rep": rep,
        "jobs": jobs,
        "seconds": round(last_s - first_s, 3),
        "throughput_jobs_s": round((jobs - first_count) / (last_s - first_s), 1),
        "cpu_us_per_job": per_job_us(cpu_first, cpu_last, jobs - first_count),
        "preload_driver_cpu_us_per_job": round(preload_us, 1),
        "worker_rss_mb": rss_mb,
        "onnxruntime_s": round(ort_s, 3),
        "onnxruntime_share_of_worker_cpu": round(ort_s / worker_cpu, 4) if worker_cpu > 0 else None,
        "wall_s": round(time.monotonic() - wall_started, 1),
    }
    if system.kind == "inferq":
        out.update(_inferq_checks(running, result_store_location(bench.result_store, run_dir), jobs))
        fresh_result_store(bench.result_store, run_dir, keep=False)
    return out


def _watch_drain(
    running: Running, done: Callable[[], int], jobs: int
) -> tuple[float, int, float, dict[str, float], dict[str, float], float]:
    monitor = Monitor(running.pids, broker_process())
    deadline = time.monotonic() + max(120.0, jobs / 200)
    first: tuple[float, int, dict[str, float]] | None = None
    polls = 0
    while True:
        count = done()
        now = time.perf_counter()
        if first is None and count > 0:
            first = (now, count, monitor.cpu())
        if count >= jobs and first is not None:
            cpu_last = monitor.cpu()
            monitor.sample_rss()
            return first[0], first[1], now, first[2], cpu_last, monitor.rss_mb()
        problem = running.failed()
        if problem or time.monotonic() > deadline:
            raise RuntimeError(problem or f"{running.system.name}: only {count} of {jobs} results before the deadline")
        polls += 1
        if polls % RSS_EVERY == 0:
            monitor.sample_rss()
        if len(running.procs) > 1 or polls % RSS_EVERY == 0:
            monitor.cpu()  # a drain worker may exit before the others finish: keep its last reading
        time.sleep(POLL_S)


def _inferq_checks(running: Running, result_store: str, jobs: int) -> dict[str, Any]:
    """Every job has its stored result; when the workers started taking jobs, relative to each other."""
    store = open_result_store(result_store)
    try:
        stored = store.count()
    finally:
        store.close()
    if stored != jobs:
        raise RuntimeError(f"{running.system.name}: {stored} results stored for {jobs} jobs")
    firsts = [
        float(e["first_job_at"]) for e in running.events() if e.get("event") == "worker_stopped" and e["first_job_at"]
    ]
    return {"results_stored": stored, "worker_start_skew_s": round(max(firsts) - min(firsts), 3) if firsts else None}


def latency(
    bench: Bench, system: System, rep: int, rates: list[float], seconds: float, warmup_s: float
) -> list[dict[str, Any]]:
    """Start the system idle, then offer each rate in turn for ``warmup_s + seconds``; latency is publish
    to result received, of jobs published after the warm-up."""
    run = f"r{rep}-{system.slug}-latency"
    settings = bench.settings(run)
    declare(settings)
    running = start(system, settings, bench.work_dir / run, drain=False, result_store=bench.result_store)
    out = []
    try:
        _wait_consuming(running, settings)
        monitor = Monitor(running.pids, broker_process())
        load = Load(settings)
        stream = bench.job_stream(run)
        saturated = False
        for rate in rates:
            total = int(rate * (warmup_s + seconds))
            if saturated:  # a higher rate would only saturate it more
                out.append(_latency_run(system, rep, rate, warmup_s, Offered(saturated=True), total))
                continue
            cpu_before = monitor.cpu()
            seen = load.offered(stream, total, rate, grace_s=GRACE_S)
            cpu_after = monitor.cpu()
            monitor.sample_rss()
            out.append(_latency_run(system, rep, rate, warmup_s, seen, total))
            out[-1]["cpu_us_per_job"] = per_job_us(cpu_before, cpu_after, len(seen.latencies_s))
            out[-1]["worker_rss_mb"] = monitor.rss_mb()
            saturated = bool(out[-1]["saturated"])
        load.close()
    finally:
        running.stop()
        delete(settings)
        if system.kind == "inferq":
            fresh_result_store(bench.result_store, bench.work_dir / run, keep=False)
    return out


def _latency_run(system: System, rep: int, rate: float, warmup_s: float, seen: Offered, total: int) -> dict[str, Any]:
    complete = not seen.saturated and len(seen.latencies_s) == total
    measured = [job_id for job_id in seen.latencies_s if seen.published[job_id] - seen.started >= warmup_s]
    samples = [seen.latencies_s[job_id] * 1000 for job_id in measured]
    summary = latency_summary(samples if complete else [])
    return {
        "kind": "latency",
        "system": system.name,
        "rep": rep,
        "offered_jobs_s": rate,
        "jobs": total,
        "published": len(seen.published),
        "results": len(seen.latencies_s),
        "saturated": not complete,
        "samples": len(samples),
        **summary,
        "breakdown_ms": breakdown(seen, measured) if complete else {},
    }


def breakdown(seen: Offered, job_ids: list[str]) -> dict[str, dict[str, float]]:
    """Where the latency went, from the ``timings`` each result carries: ``queue`` is publish to the
    worker receiving the job (inferq only; the header has millisecond resolution), ``to_result`` publish
    to the worker finishing the result, ``result_hop`` from there to the driver receiving it."""
    parts: dict[str, list[float]] = {"queue": [], "to_result": [], "result_hop": []}
    for job_id in job_ids:
        timings = seen.worker_timings.get(job_id, {})
        queue_ms, total_ms = timings.get("queue_ms"), timings.get("total_ms")
        if queue_ms is not None:
            parts["queue"].append(queue_ms)
        if total_ms is not None:
            parts["to_result"].append(total_ms)
            parts["result_hop"].append(seen.latencies_s[job_id] * 1000 - total_ms)
    return {
        name: {"p50_ms": round(percentile(values, 50), 3), "p99_ms": round(percentile(values, 99), 3)}
        for name, values in parts.items()
        if values
    }


def _wait_consuming(running: Running, settings: InferqSettings, timeout_s: float = 120.0) -> None:
    probe = DepthProbe(settings)
    deadline = time.monotonic() + timeout_s
    try:
        while probe(settings.jobs_queue)[1] < running.system.processes:
            problem = running.failed()
            if problem or time.monotonic() > deadline:
                raise RuntimeError(problem or f"{running.system.name} did not start consuming")
            time.sleep(0.05)
    finally:
        probe.close()

"""The three systems under test, as processes the driver starts, watches and stops."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psycopg
from psycopg import sql

from inferq.shared.config.settings import InferqSettings

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, slots=True)
class System:
    """One system under test: ``kind`` is ``inferq``, ``ideal``, ``naive`` or ``celery``; ``processes``
    how many worker processes the driver starts (Celery's one main process forks its own pool)."""

    name: str
    kind: str
    processes: int
    label: str
    monitor: bool = True
    """inferq only: count drift (the models are published with a reference); off measures what it costs."""

    @property
    def slug(self) -> str:
        """A queue- and path-safe form of the name."""
        return f"{self.kind}{self.processes}" + ("" if self.monitor else "-nomon")


SYSTEMS = {
    s.name: s
    for s in (
        System("inferq-x1", "inferq", 1, "inferq ×1"),
        System("inferq-x2", "inferq", 2, "inferq ×2"),
        System("inferq-x1-nomon", "inferq", 1, "inferq ×1, no drift counting", monitor=False),
        System("ideal", "ideal", 1, "ideal pipeline"),
        System("naive", "naive", 1, "naive pika worker"),
        System("celery", "celery", 1, "Celery prefork ×2"),
    )
}


@dataclass(slots=True)
class Running:
    """A started system: its processes and where each writes its log and (reference workers) counters."""

    system: System
    procs: list[subprocess.Popen[bytes]]
    logs: list[Path]
    stats: list[Path]

    @property
    def pids(self) -> list[int]:
        """Process ids of the workers."""
        return [p.pid for p in self.procs]

    def failed(self) -> str | None:
        """A description of the first worker that exited with an error, if any."""
        for proc, log in zip(self.procs, self.logs, strict=True):
            code = proc.poll()
            if code not in (None, 0):
                return f"{self.system.name} worker exited with {code}; see {log}"
        return None

    def stop(self, timeout_s: float = 60.0) -> None:
        """inferq in drain mode exits by itself; anything still running gets SIGTERM (a graceful stop)."""
        for proc in self.procs:
            if self.system.kind != "inferq" or proc.poll() is None:
                try:
                    proc.wait(timeout=5 if self.system.kind == "inferq" else 0)
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def onnxruntime_s(self) -> float:
        """Seconds the workers spent in onnxruntime calls: inferq's ``batch_done`` events, or the
        counters the reference workers write when they stop."""
        if self.system.kind == "celery":
            return math.nan  # not instrumented
        if self.system.kind != "inferq":
            return sum(float(orjson.loads(path.read_bytes())["ort_s"]) for path in self.stats if path.exists())
        total_ms = 0.0
        for event in self.events():
            if event.get("event") == "batch_done":
                total_ms += float(event.get("inference_ms", 0.0))
        return total_ms / 1000

    def events(self) -> list[dict[str, Any]]:
        """Every JSON log event the workers wrote."""
        events = []
        for log in self.logs:
            for line in log.read_bytes().splitlines():
                if line.startswith(b"{"):
                    events.append(orjson.loads(line))
        return events


CELERY_CONCURRENCY = 2


def _inferq_env(settings: InferqSettings, result_store: str) -> dict[str, str]:
    # Default settings: drop any INFERQ_* the caller's shell has, set only where things are.
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
    env.update(
        INFERQ_AMQP_URL=settings.amqp_url.get_secret_value(),
        INFERQ_JOBS_QUEUE=settings.jobs_queue,
        INFERQ_RESULTS_QUEUE=settings.results_queue,
        INFERQ_MODEL_STORE=settings.model_store,
        INFERQ_RESULT_STORE=result_store,
        INFERQ_LOG_FORMAT="json",
    )
    return env


def result_store_location(choice: str, run_dir: Path) -> str:
    """Where inferq stores results in a run: ``sqlite`` (the default store), ``file``, or a
    ``postgresql://`` URL, in a schema of the run's own (see :func:`fresh_result_store`), so each run
    counts only its own results."""
    if choice == "sqlite":
        return f"sqlite:{run_dir / 'results.db'}"
    if choice == "file":
        return str(run_dir / "results")
    separator = "&" if "?" in choice else "?"
    return f"{choice}{separator}options=-csearch_path%3D{_schema(run_dir)}"


def _schema(run_dir: Path) -> str:
    return "inferq_bench_" + re.sub(r"[^a-z0-9_]", "_", run_dir.name.lower())


def fresh_result_store(choice: str, run_dir: Path, *, keep: bool = True) -> None:
    """Empty the run's PostgreSQL schema (dropped, and created again if ``keep``); files need nothing."""
    if not choice.startswith("postgresql"):
        return
    schema = sql.Identifier(_schema(run_dir))
    with psycopg.connect(choice, autocommit=True) as connection:
        connection.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(schema))
        if keep:
            connection.execute(sql.SQL("CREATE SCHEMA {}").format(schema))


def _celery(settings: InferqSettings) -> tuple[list[str], dict[str, str]]:
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "bench.celery_worker",
        "worker",
        "--pool",
        "prefork",
        "--concurrency",
        str(CELERY_CONCURRENCY),
        "--without-heartbeat",
        "--without-gossip",
        "--without-mingle",
        "--loglevel",
        "WARNING",
    ]
    env = dict(
        os.environ,
        BENCH_CELERY_BROKER=settings.amqp_url.get_secret_value(),
        BENCH_CELERY_QUEUE=settings.jobs_queue,
        BENCH_CELERY_MODEL_STORE=settings.model_store,
    )
    return command, env


def start(
    system: System, settings: InferqSettings, run_dir: Path, *, drain: bool, result_store: str = "sqlite"
) -> Running:
    """Start ``system``'s worker processes against the run's queues."""
    run_dir.mkdir(parents=True, exist_ok=True)
    procs, logs, stats = [], [], []
    for number in range(system.processes):
        log = run_dir / f"{system.slug}-{number}.log"
        stat = run_dir / f"{system.slug}-{number}.stats.json"
        if system.kind == "inferq":
            command = [sys.executable, "-m", "inferq", "worker", *(["--drain"] if drain else [])]
            if number == 0:
                fresh_result_store(result_store, run_dir)
            env = _inferq_env(settings, result_store_location(result_store, run_dir))
            env["INFERQ_MONITOR"] = "true" if system.monitor else "false"
        elif system.kind == "celery":
            command, env = _celery(settings)
        else:
            command = [
                sys.executable,
                "-m",
                f"bench.{system.kind}",
                "--amqp-url",
                settings.amqp_url.get_secret_value(),
                "--jobs-queue",
                settings.jobs_queue,
                "--results-queue",
                settings.results_queue,
                "--model-store",
                settings.model_store,
                "--stats",
                str(stat),
            ]
            env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT)
        with log.open("wb") as handle:
            procs.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=handle))
        logs.append(log)
        stats.append(stat)
    return Running(system, procs, logs, stats)

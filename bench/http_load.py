"""``python -m bench.http_load`` (``make bench-http``): the HTTP gateway under ``wrk``, against the HTTP stack
alone and against MLServer serving the same model with the same request, in one run.

Four measures, each a ``wrk`` run (2 threads, 32 connections by default) after a short warm-up:
- ``GET /v2/health/live``: the HTTP stack alone, the ceiling of any route of ``inferq serve``;
- asynchronous admission: ``POST /v2/models/forest/infer`` with ``Prefer: respond-async``, no worker
  running, each answered 202 once its job is recorded and confirmed by the broker;
- the synchronous round trip: the same request answered 200 with the result, two ``inferq worker``
  processes running;
- MLServer (``mlserver`` and ``mlserver-sklearn`` in ``.bench-venv``, ``parallel_workers: 0``) serving the
  same random forest (pickled by joblib) with the same request body.
Prints requests/s, p50, p99, the answers by status, the gateway's CPU per request, and the ratios the
targets are set on; the machine's load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import joblib
import numpy as np
import pika
from sklearn.datasets import make_classification
from sklearn.ensemble import RandomForestClassifier

from inferq.model_store.base import publish
from inferq.model_store.convert import INPUT_NAME, estimator_to_onnx
from inferq.model_store.local import LocalModelStore
from inferq.shared.broker.amqp import delete_topology
from inferq.shared.config.settings import InferqSettings

ROOT = Path(__file__).resolve().parent.parent
LUA = Path(__file__).with_name("wrk_post.lua")
BENCH_VENV = ROOT / ".bench-venv"
AMQP_URL = os.environ.get("INFERQ_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
MODEL = "forest"
FEATURES = 20
SEED = 7
START_TIMEOUT_S = 60.0
WARM_UP_S = 2
ADMISSION_TARGET = 0.4
SYNC_TARGET = 4.0


@dataclass(frozen=True, slots=True)
class WrkRun:
    """What one ``wrk`` run measured."""

    name: str
    rate: float
    p50_ms: float
    p99_ms: float
    statuses: dict[int, int]
    errors: int
    cpu_us: float | None = None
    """CPU of the server process per answered request (µs), when it was read."""

    def row(self) -> str:
        """One line of the results table."""
        statuses = ", ".join(f"{count} × {status}" for status, count in sorted(self.statuses.items()))
        cpu = "" if self.cpu_us is None else f"{self.cpu_us:.0f}"
        errors = f" ({self.errors} socket errors)" if self.errors else ""
        return (
            f"| {self.name} | {self.rate:,.0f} | {self.p50_ms:.1f} ms | {self.p99_ms:.1f} ms | {cpu} "
            f"| {statuses}{errors} |"
        )


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS_MS[unit]


def parse_wrk(name: str, output: str) -> WrkRun:
    """The numbers of ``wrk --latency`` output (with the status lines of ``wrk_post.lua``)."""
    percentiles = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)\s*$", output, re.MULTILINE))
    rate = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.MULTILINE)
    if rate is None or "50" not in percentiles or "99" not in percentiles:
        raise SystemExit(f"cannot read wrk's output:\n{output}")
    statuses = {int(s): int(n) for s, n in re.findall(r"^status (\d+) (\d+)$", output, re.MULTILINE)}
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return WrkRun(
        name,
        float(rate.group(1)),
        _ms(percentiles["50"]),
        _ms(percentiles["99"]),
        statuses,
        sum(int(n) for n in errors.groups()) if errors else 0,
    )


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Load:
    """How to run ``wrk``: threads, connections, seconds."""

    threads: int
    connections: int
    duration_s: int

    def run(
        self, name: str, url: str, *, body: Path | None = None, prefer: str = "", server_pid: int | None = None
    ) -> WrkRun:
        """A warm-up, then the measured run; the server's CPU per request when ``server_pid`` is given."""
        self._wrk(url, body, prefer, WARM_UP_S)
        before = None if server_pid is None else cpu_s(server_pid)
        measured = parse_wrk(name, self._wrk(url, body, prefer, self.duration_s))
        if server_pid is None or before is None:
            return measured
        answered = max(1, sum(measured.statuses.values()))
        cpu_us = (cpu_s(server_pid) - before) / answered * 1e6
        return WrkRun(**{**_fields(measured), "cpu_us": cpu_us})

    def _wrk(self, url: str, body: Path | None, prefer: str, duration_s: int) -> str:
        command = ["wrk", f"-t{self.threads}", f"-c{self.connections}", f"-d{duration_s}s", "--latency"]
        command += ["--timeout", "30s", "-s", str(LUA), url]
        env = {**os.environ, "WRK_BODY": str(body or ""), "WRK_PREFER": prefer}
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False, timeout=duration_s + 60)
        if done.returncode != 0:
            raise SystemExit(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
        return done.stdout


def _fields(run: WrkRun) -> dict[str, Any]:
    return {name: getattr(run, name) for name in WrkRun.__slots__}


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_answers(url: str, process: subprocess.Popen[bytes], what: str) -> None:
    """Until ``url`` answers 200; exits when ``process`` died or it took too long."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{what} exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{what} did not answer {url} within {START_TIMEOUT_S:g}s")


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it does not go."""
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# -- the model and the request ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Model:
    """The benchmark's random forest, as ONNX for inferq and as a joblib pickle for MLServer."""

    onnx: bytes
    pickle_path: Path
    body_path: Path


def train(tmp: Path) -> Model:
    """A 100-tree random forest over 20 features (the forest of ``make bench``) and a one-row request."""
    x, y = make_classification(n_samples=4000, n_features=FEATURES, n_informative=2, n_redundant=1, random_state=SEED)
    forest = RandomForestClassifier(n_estimators=100, max_depth=8, random_state=SEED, n_jobs=1).fit(x, y)
    pickle_path = tmp / "mlserver" / MODEL / "model.joblib"
    pickle_path.parent.mkdir(parents=True)
    joblib.dump(forest, pickle_path)
    row = np.round(np.random.default_rng(SEED).normal(size=FEATURES), 4).tolist()
    body = {"inputs": [{"name": INPUT_NAME, "shape": [1, FEATURES], "datatype": "FP32", "data": row}]}
    body_path = tmp / "request.json"
    body_path.write_text(json.dumps(body))
    return Model(estimator_to_onnx(forest, FEATURES), pickle_path, body_path)


# -- inferq ------------------------------------------------------------------------------------------


@dataclass
class Inferq:
    """``inferq serve`` and ``inferq worker`` processes on queues and stores of their own."""

    tmp: Path
    prefix: str = field(default_factory=lambda: f"bench-http.{uuid.uuid4().hex[:8]}")
    port: int = field(default_factory=free_port)
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def environ(self) -> dict[str, str]:
        return {
            **os.environ,
            "INFERQ_AMQP_URL": AMQP_URL,
            "INFERQ_JOBS_QUEUE": f"{self.prefix}.jobs",
            "INFERQ_RESULTS_QUEUE": f"{self.prefix}.results",
            "INFERQ_MODEL_STORE": str(self.tmp / "models"),
            "INFERQ_RESULT_STORE": f"sqlite:{self.tmp / 'results.db'}",
            "INFERQ_HTTP_HOST": "127.0.0.1",
            "INFERQ_HTTP_PORT": str(self.port),
            "INFERQ_LOG_LEVEL": "warning",
        }

    def publish(self, model: Model) -> None:
        publish(LocalModelStore(self.tmp / "models"), MODEL, model.onnx)

    def serve(self) -> subprocess.Popen[bytes]:
        log = (self.tmp / "serve.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "inferq", "serve"], env=self.environ(), stdout=log, stderr=log
        )
        wait_until_answers(f"{self.url}/v2/health/ready", process, "inferq serve")
        return process

    def start_workers(self, count: int) -> None:
        for i in range(count):
            log = (self.tmp / f"worker-{i}.log").open("wb")
            command = [sys.executable, "-m", "inferq", "worker"]
            self.workers.append(subprocess.Popen(command, env=self.environ(), stdout=log, stderr=log))

    def wait_for_consumers(self, count: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while self._consumers() < count:
            if time.monotonic() > deadline or any(w.poll() is not None for w in self.workers):
                raise SystemExit(f"the workers did not start; see {self.tmp}/worker-*.log")
            time.sleep(0.2)

    def _consumers(self) -> int:
        with _channel() as channel:
            return int(channel.queue_declare(f"{self.prefix}.jobs", passive=True).method.consumer_count)

    def purge_jobs(self) -> int:
        """Drop the jobs admitted without a worker (they would hold up the synchronous measure)."""
        with _channel() as channel:
            return int(channel.queue_purge(f"{self.prefix}.jobs").method.message_count)

    def close(self) -> None:
        for worker in self.workers:
            stop(worker)
        settings = InferqSettings(
            amqp_url=AMQP_URL, jobs_queue=f"{self.prefix}.jobs", results_queue=f"{self.prefix}.results"
        )
        with _channel() as channel:
            delete_topology(channel, settings)


@contextmanager
def _channel() -> Iterator[Any]:
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        yield connection.channel()
    finally:
        connection.close()


# -- MLServer ----------------------------------------------------------------------------------------


def mlserver(model: Model, tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    """MLServer from ``.bench-venv`` serving the forest over HTTP on a free port (gRPC and metrics on
    others), one process (``parallel_workers: 0``), and the URL of its infer route."""
    executable = BENCH_VENV / "bin" / "mlserver"
    if not executable.exists():
        raise SystemExit(
            f"{executable} is missing: run `make bench-http` (it installs bench/mlserver-requirements.txt)"
        )
    folder = model.pickle_path.parent.parent
    port = free_port()
    settings = {
        "http_port": port,
        "grpc_port": free_port(),
        "metrics_port": free_port(),
        "parallel_workers": 0,
        "debug": False,
    }
    (folder / "settings.json").write_text(json.dumps(settings))
    model_settings = {
        "name": MODEL,
        "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": str(model.pickle_path)},
    }
    (model.pickle_path.parent / "model-settings.json").write_text(json.dumps(model_settings))
    log = (tmp / "mlserver.log").open("wb")
    process = subprocess.Popen([str(executable), "start", str(folder)], cwd=folder, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}/v2/models/{MODEL}"
    wait_until_answers(f"{url}/ready", process, "mlserver")
    return process, f"{url}/infer"


# -- the run -----------------------------------------------------------------------------------------


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.http_load", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per measure (after a 2 s warm-up)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="inferq worker processes for the synchronous measure")
    parser.add_argument(
        "--sync-prefer",
        default="",
        help="Prefer header of the synchronous measure (empty: the server's default wait, INFERQ_HTTP_WAIT_S)",
    )
    parser.add_argument("--skip-mlserver", action="store_true", help="no MLServer measure (and no ratio against it)")
    return parser.parse_args()


def _inferq_runs(load: Load, model: Model, tmp: Path, args: argparse.Namespace) -> list[WrkRun]:
    world = Inferq(tmp)
    world.publish(model)
    server = world.serve()
    try:
        live = load.run("GET /v2/health/live", f"{world.url}/v2/health/live", server_pid=server.pid)
        url = f"{world.url}/v2/models/{MODEL}/infer"
        admitted = load.run(
            "POST infer, Prefer: respond-async (no worker)",
            url,
            body=model.body_path,
            prefer="respond-async",
            server_pid=server.pid,
        )
        world.purge_jobs()
        world.start_workers(args.workers)
        world.wait_for_consumers(args.workers)
        label = f"POST infer{', Prefer: ' + args.sync_prefer if args.sync_prefer else ''}, {args.workers} workers"
        synchronous = load.run(label, url, body=model.body_path, prefer=args.sync_prefer, server_pid=server.pid)
        return [live, admitted, synchronous]
    finally:
        stop(server)
        world.close()


def _mlserver_run(load: Load, model: Model, tmp: Path) -> WrkRun:
    process, url = mlserver(model, tmp)
    try:
        return load.run(
            "MLServer 1.7, mlserver-sklearn, same request", url, body=model.body_path, server_pid=process.pid
        )
    finally:
        stop(process)


def _report(runs: list[WrkRun], mlserver_run: WrkRun | None, load: Load) -> None:
    print(f"\nwrk -t{load.threads} -c{load.connections} -d{load.duration_s}s, {os.cpu_count()} cores\n")
    print("| what | requests/s | p50 | p99 | server CPU µs/request | answers |")
    print("|---|---|---|---|---|---|")
    for run in [*runs, *([mlserver_run] if mlserver_run else [])]:
        print(run.row())
    live, admitted, synchronous = runs
    print()
    admission = admitted.rate / live.rate
    print(f"admission / health route: {admission:.2f} (target >= {ADMISSION_TARGET})")
    if mlserver_run is not None:
        ratio = synchronous.rate / mlserver_run.rate
        lower = synchronous.p99_ms < mlserver_run.p99_ms
        print(f"synchronous round trip / MLServer: {ratio:.2f} (target >= {SYNC_TARGET:g})")
        print(
            f"p99 synchronous {synchronous.p99_ms:.1f} ms vs MLServer {mlserver_run.p99_ms:.1f} ms: "
            f"{'lower' if lower else 'NOT lower'}"
        )


def main() -> None:
    """Run every measure once and print the table and the ratios."""
    args = _args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: run `make bench-http` (or scripts/ensure-wrk.sh)")
    load = Load(args.threads, args.connections, args.duration)
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    with tempfile.TemporaryDirectory(prefix="inferq-bench-http-") as name:
        tmp = Path(name)
        model = train(tmp)
        runs = _inferq_runs(load, model, tmp, args)
        mlserver_run = None if args.skip_mlserver else _mlserver_run(load, model, tmp)
    _report(runs, mlserver_run, load)
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()

"""Load on the HTTP gateway's 202 path against the direct Python producer, in one run.

Starts ``inferq serve`` on its own queues (the local broker, temporary stores, a small iris model) and,
alternating, measures:
- http: ``POST /v2/models/iris/infer`` from an asyncio load generator with C requests in flight,
  each answered 202 once the broker confirmed its job;
- producer: the same jobs with ``Producer.publish_many`` (a window of confirms), latency per job from
  its hand-over to its confirm;
- http_live: ``GET /v2/health/live`` the same way: the HTTP stack alone, the ceiling of any route here;
- producer, one at a time: ``Producer.publish`` per job (a confirm round trip each), the shape of one
  HTTP request without HTTP.
No worker runs: only admission is measured. Prints requests/s and p50/p99 for each, and the ratios.

    .venv/bin/python scripts/gateway_load.py --requests 3000 --concurrency 32 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pika
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from inferq.model_store.base import publish
from inferq.model_store.convert import estimator_to_onnx
from inferq.model_store.stores import open_model_store
from inferq.producer import Producer
from inferq.shared.broker.amqp import delete_topology
from inferq.shared.config.settings import ProducerSettings
from inferq.shared.contract.messages import Job, Tensor

AMQP_URL = os.environ.get("INFERQ_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def report(name: str, count: int, elapsed_s: float, latencies_s: list[float], cpu_used_s: float) -> dict[str, float]:
    rate = count / elapsed_s
    p50, p99 = percentile(latencies_s, 50) * 1000, percentile(latencies_s, 99) * 1000
    cpu_us = cpu_used_s / count * 1e6
    print(
        f"{name:<22} {count:>6} jobs  {rate:>8.0f} /s   p50 {p50:7.2f} ms   p99 {p99:7.2f} ms   "
        f"{cpu_us:6.0f} µs CPU/job",
        flush=True,
    )
    return {"rate": rate, "p50_ms": p50, "p99_ms": p99, "cpu_us": cpu_us}


async def http_load(url: str, bodies: list[dict] | None, concurrency: int, count: int = 0) -> tuple[float, list[float]]:
    """POST each body to the infer route; or, without bodies, GET the liveness probe ``count`` times
    (the HTTP stack alone: the ceiling of any route on this machine)."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    queue: asyncio.Queue[dict | None] = asyncio.Queue()
    for body in bodies if bodies is not None else [None] * count:
        queue.put_nowait(body)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def loop() -> None:
            while not queue.empty():
                body = queue.get_nowait()
                started = time.perf_counter()
                if body is None:
                    response = await client.get("/v2/health/live")
                else:
                    response = await client.post("/v2/models/iris/infer", json=body)
                latencies.append(time.perf_counter() - started)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    if set(statuses) != ({202} if bodies is not None else {200}):
        raise SystemExit(f"unexpected answers: {statuses}")
    return elapsed, latencies


def producer_window(settings: ProducerSettings, jobs: list[Job]) -> tuple[float, list[float]]:
    handed: dict[str, float] = {}
    latencies: list[float] = []

    def source():  # type: ignore[no-untyped-def]
        for job in jobs:
            handed[job.id] = time.perf_counter()
            yield job

    def confirmed(job_id: str) -> None:
        latencies.append(time.perf_counter() - handed[job_id])

    with Producer(settings) as producer:
        producer.publish_many([])  # connect first, as the gateway's long-lived publisher is
        started = time.perf_counter()
        producer.publish_many(source(), on_confirmed=confirmed)
        return time.perf_counter() - started, latencies


def producer_one_by_one(settings: ProducerSettings, jobs: list[Job]) -> tuple[float, list[float]]:
    latencies: list[float] = []
    with Producer(settings) as producer:
        producer.publish_many([])
        started = time.perf_counter()
        for job in jobs:
            t = time.perf_counter()
            producer.publish(job)
            latencies.append(time.perf_counter() - t)
        return time.perf_counter() - started, latencies


def main() -> None:  # noqa: PLR0915  (a script: set-up, rounds, summary, clean-up in order)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="inferq-gateway-load-"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    prefix = f"load.{uuid.uuid4().hex[:8]}"
    X, y = load_iris(return_X_y=True)
    publish(
        open_model_store(str(tmp / "models")), "iris", estimator_to_onnx(LogisticRegression(max_iter=300).fit(X, y))
    )
    env = {
        **os.environ,
        "INFERQ_AMQP_URL": AMQP_URL,
        "INFERQ_JOBS_QUEUE": f"{prefix}.jobs",
        "INFERQ_RESULTS_QUEUE": f"{prefix}.results",
        "INFERQ_MODEL_STORE": str(tmp / "models"),
        "INFERQ_RESULT_STORE": str(tmp / "results"),
        "INFERQ_HTTP_HOST": "127.0.0.1",
        "INFERQ_HTTP_PORT": str(port),
        "INFERQ_LOG_LEVEL": "warning",
    }
    settings = ProducerSettings(
        amqp_url=AMQP_URL, jobs_queue=f"{prefix}.jobs", results_queue=f"{prefix}.results", model_store=str(tmp)
    )
    server = subprocess.Popen([sys.executable, "-m", "inferq", "serve"], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        rows = X.astype(np.float32)
        results: dict[str, list[dict[str, float]]] = {"http": [], "http_live": [], "producer": [], "producer_one": []}
        print(f"{args.requests} jobs per measure, {args.concurrency} HTTP requests in flight, {os.cpu_count()} cores")
        for round_ in range(args.rounds):
            tag = f"r{round_}-{uuid.uuid4().hex[:6]}"
            bodies = [
                {
                    "id": f"h-{tag}-{i}",
                    "inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": rows[i % 150].tolist()}],
                }
                for i in range(args.requests)
            ]
            jobs = [
                Job(
                    id=f"p-{tag}-{i}",
                    model="iris",
                    version="latest",
                    inputs=[Tensor(name="X", shape=[1, 4], datatype="FP32", data=rows[i % 150].tolist())],
                )
                for i in range(args.requests)
            ]
            one_jobs = [j.model_copy(update={"id": "o" + j.id}) for j in jobs[: max(1, args.requests // 3)]]
            measures = [
                ("http", lambda b=bodies: asyncio.run(http_load(url, b, args.concurrency))),
                ("http_live", lambda: asyncio.run(http_load(url, None, args.concurrency, args.requests))),
                ("producer", lambda j=jobs: producer_window(settings, j)),
                ("producer_one", lambda j=one_jobs: producer_one_by_one(settings, j)),
            ]
            if round_ % 2:
                measures.reverse()
            for name, run in measures:
                # CPU of the publishing side: the gateway process for http, this process for the producer
                # (for http, the load generator's own CPU is left out: it is the client).
                on_server = name.startswith("http")
                before = cpu_s(server.pid) if on_server else time.process_time()
                elapsed, latencies = run()
                used = (cpu_s(server.pid) if on_server else time.process_time()) - before
                results[name].append(report(f"{name} (round {round_ + 1})", len(latencies), elapsed, latencies, used))
        print()
        for name, runs in results.items():
            rate = statistics.median(r["rate"] for r in runs)
            p50 = statistics.median(r["p50_ms"] for r in runs)
            p99 = statistics.median(r["p99_ms"] for r in runs)
            cpu = statistics.median(r["cpu_us"] for r in runs)
            print(f"median {name:<14} {rate:>8.0f} /s   p50 {p50:7.2f} ms   p99 {p99:7.2f} ms   {cpu:6.0f} µs CPU/job")
        http_rates = [r["rate"] for r in results["http"]]
        prod_rates = [r["rate"] for r in results["producer"]]
        one_rates = [r["rate"] for r in results["producer_one"]]
        ratios = [h / p for h, p in zip(http_rates, prod_rates, strict=True)]
        one_ratios = [h / p for h, p in zip(http_rates, one_rates, strict=True)]
        print(f"http / producer (window) per round: {', '.join(f'{r:.3f}' for r in ratios)}")
        print(f"http / producer (one by one) per round: {', '.join(f'{r:.2f}' for r in one_ratios)}")
        live_rates = [r["rate"] for r in results["http_live"]]
        live_ratios = [h / v for h, v in zip(http_rates, live_rates, strict=True)]
        print(f"http infer / http liveness per round: {', '.join(f'{r:.2f}' for r in live_ratios)}")
        print(f"uptime load average during the run: {os.getloadavg()}")
    finally:
        server.terminate()
        server.wait(60)
        connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        channel = connection.channel()
        delete_topology(channel, settings)
        connection.close()


if __name__ == "__main__":
    main()

"""The worker's HTTP port, scraped from a real ``inferq worker`` process working real jobs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
from ops_support import free_port
from prometheus_client.parser import text_string_to_metric_families

from inferq.producer.client import Producer, new_job_id
from inferq.shared.config.settings import ProducerSettings
from inferq.shared.contract.messages import Job, Tensor

pytestmark = pytest.mark.broker


class RunningWorker:
    """``inferq worker`` in a child process, with its metrics port."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        child_env = {**os.environ, **env, "INFERQ_METRICS_PORT": str(self.port), "INFERQ_METRICS_HOST": "127.0.0.1"}
        self.log_path = log_path
        command = [sys.executable, "-m", "inferq", "worker"]
        with log_path.open("w") as log:
            self.process = subprocess.Popen(command, env=child_env, stdout=subprocess.DEVNULL, stderr=log)

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            with exc:  # an error response still holds its socket
                return exc.code, exc.read().decode()

    def wait_until(self, path: str, status: int, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.process.poll() is None, f"worker exited: {self.log_path.read_text()}"
            try:
                if self.get(path)[0] == status:
                    return
            except OSError:
                pass  # not listening yet
            assert time.monotonic() < deadline, f"{path} never answered {status}: {self.log_path.read_text()}"
            time.sleep(0.05)

    def samples(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        status, text = self.get("/metrics")
        assert status == 200
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)


@pytest.fixture
def worker(env: dict[str, str], tmp_path: Path) -> Iterator[RunningWorker]:
    running = RunningWorker(env, tmp_path / "worker.log")
    yield running
    if running.process.poll() is None:
        running.process.kill()
        running.process.wait()


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def job(model: str, rows: int, features: int = 3) -> Job:
    tensor = Tensor(name="X", shape=[rows, features], datatype="FP32", data=[0.5] * rows * features)
    return Job(id=new_job_id(), model=model, version=1, inputs=[tensor])


def wait_for_results(result_dir: Path, count: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while len(list(result_dir.glob("*.json"))) < count:
        assert time.monotonic() < deadline, f"only {len(list(result_dir.glob('*.json')))} of {count} results"
        time.sleep(0.05)


def settled(worker: RunningWorker, jobs_total: float) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Scrape until every job is counted and acked (nothing in flight)."""
    deadline = time.monotonic() + 30
    while True:
        samples = worker.samples()
        counted = sum(v for (name, _), v in samples.items() if name == "inferq_jobs_total")
        if counted >= jobs_total and value(samples, "inferq_jobs_in_flight") == 0:
            return samples
        assert time.monotonic() < deadline, "worker never settled"
        time.sleep(0.05)


def test_worker_metrics_count_jobs_batches_latency_and_model_cache(
    env: dict[str, str], channel: Any, published_model: str, worker: RunningWorker
) -> None:
    # Given a running worker that is ready (connected and consuming)
    worker.wait_until("/readyz", 200)
    assert worker.get("/healthz") == (200, "ok\n")
    assert worker.get("/nowhere")[0] == 404

    # When it gets 4 good jobs of 2 rows, 2 of the wrong width, 1 for a model that does not exist,
    # and one message that is not JSON at all
    with Producer(ProducerSettings()) as producer:
        producer.publish_many([job("tiny", 2) for _ in range(4)] + [job("tiny", 1, features=2) for _ in range(2)])
        producer.publish(job("ghost-model", 1))
    channel.basic_publish("", env["INFERQ_JOBS_QUEUE"], b"\x00not json", pika.BasicProperties(delivery_mode=2))
    wait_for_results(Path(env["INFERQ_RESULT_STORE"]), 7)
    samples = settled(worker, 8)

    # Then every job is counted once, by model, version, status and code; a job of the wrong width is
    # counted on the version it was checked against (its result names it)
    jobs = "inferq_jobs_total"
    assert value(samples, jobs, model="tiny", version="1", status="succeeded", code="") == 4
    assert value(samples, jobs, model="tiny", version="1", status="failed", code="input_mismatch") == 2
    assert value(samples, jobs, model="_other", version="", status="failed", code="unknown_model") == 1
    assert value(samples, jobs, model="_other", version="", status="dead_lettered", code="") == 1
    assert sum(v for (name, _), v in samples.items() if name == jobs) == 8
    assert not any(("model", "ghost-model") in labels for _, labels in samples)  # no label from caller text
    # the micro-batches carried exactly the 8 good rows, and each was timed
    batches = value(samples, "inferq_batch_rows_count", model="tiny")
    assert value(samples, "inferq_batch_rows_sum", model="tiny") == 8
    assert 1 <= batches <= 4
    assert value(samples, "inferq_inference_seconds_count", model="tiny") == batches
    assert value(samples, "inferq_inference_seconds_sum", model="tiny") > 0
    # every result's end-to-end latency is observed
    assert value(samples, "inferq_job_latency_seconds_count", model="tiny") == 6
    assert value(samples, "inferq_job_latency_seconds_count", model="_other") == 1
    # the model was loaded once
    assert value(samples, "inferq_model_cache_misses_total", model="tiny") == 1
    assert value(samples, "inferq_model_load_seconds_count", model="tiny") == 1
    assert value(samples, "inferq_worker_draining") == 0

    # When one more good job arrives, it finds the model loaded: the counters move by exactly one
    hits_before = value(samples, "inferq_model_cache_hits_total", model="tiny")
    with Producer(ProducerSettings()) as producer:
        producer.publish(job("tiny", 3))
    wait_for_results(Path(env["INFERQ_RESULT_STORE"]), 8)
    after = settled(worker, 9)
    assert value(after, jobs, model="tiny", version="1", status="succeeded", code="") == 5
    assert value(after, "inferq_model_cache_hits_total", model="tiny") == hits_before + 1
    assert value(after, "inferq_model_cache_misses_total", model="tiny") == 1
    assert value(after, "inferq_batch_rows_sum", model="tiny") == 11

    # And SIGTERM drains and exits cleanly
    assert worker.stop() == 0


def test_worker_without_broker_is_alive_but_not_ready(env: dict[str, str], tmp_path: Path) -> None:
    nowhere = f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F"
    env = {**env, "INFERQ_AMQP_URL": nowhere, "INFERQ_CONNECT_TIMEOUT_S": "60"}
    running = RunningWorker(env, tmp_path / "worker.log")
    try:
        running.wait_until("/healthz", 200)
        assert running.get("/readyz") == (503, "not ready\n")
        assert value(running.samples(), "inferq_jobs_in_flight") == 0
    finally:
        running.process.kill()
        running.process.wait()

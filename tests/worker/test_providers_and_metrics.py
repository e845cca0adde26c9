"""Execution providers are checked at start; a result sent again from the store is not a second success."""

from __future__ import annotations

import time

import pika
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import Env

from inferq.shared.contract.messages import Result, Status, Timings
from inferq.worker.consumer import Delivery
from inferq.worker.metrics import WorkerMetrics
from inferq.worker.processor import Outcome


@pytest.mark.broker
def test_an_execution_provider_onnxruntime_lacks_stops_the_worker_at_start_in_one_line(env: Env) -> None:
    done = env.inferq("worker", "--drain", INFERQ_ORT_PROVIDERS="NoSuchExecutionProvider,CPUExecutionProvider")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("inferq: error: INFERQ_ORT_PROVIDERS: NoSuchExecutionProvider not available")
    assert "CPUExecutionProvider" in lines[-1] and "Traceback" not in done.stderr


def _outcome(counted: bool) -> Outcome:
    result = Result(
        id="j1",
        model="iris",
        requested_version="latest",
        version=1,
        status=Status.SUCCEEDED,
        outputs=[],
        worker="w:1",
        timings=Timings(total_ms=3.0),
    )
    delivery = Delivery(1, 1, False, "j1", None, None, None, time.time() * 1000, pika.BasicProperties(), b"{}")
    return Outcome(delivery, result, counted=counted)


def _jobs_total(metrics: WorkerMetrics) -> float:
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    return sum(s.value for s in families["inferq_jobs"].samples if s.name == "inferq_jobs_total")


def test_a_result_sent_again_from_the_store_does_not_count_as_a_second_success() -> None:
    metrics = WorkerMetrics()
    metrics.observe_processed([], [_outcome(counted=True)])
    metrics.observe_processed([], [_outcome(counted=False)])  # the job redelivered, its result republished
    assert _jobs_total(metrics) == 1


def test_the_provider_in_use_is_a_metric_label() -> None:
    metrics = WorkerMetrics()
    metrics.set_provider("CPUExecutionProvider")
    assert 'inferq_worker_info{provider="CPUExecutionProvider"} 1.0' in metrics.render().decode()

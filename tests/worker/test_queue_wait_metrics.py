"""The backlog's age, as a worker tells it: how long the jobs it takes had waited in the jobs queue, and
when it last finished one (RabbitMQ does not tell a quorum queue's oldest message)."""

from __future__ import annotations

import time

import pika
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import Env, make_job

from inferq.shared.contract.messages import Result, Status
from inferq.worker.consumer import Delivery
from inferq.worker.metrics import WorkerMetrics
from inferq.worker.processor import Outcome
from inferq.worker.worker import build_worker


def _outcome(
    published_ms: float | None, received_ms: float, *, redelivered: bool = False, suspect: bool = False
) -> Outcome:
    result = Result(
        id="j", model="iris", requested_version="latest", version=1, status=Status.SUCCEEDED, outputs=[], worker="w:1"
    )
    properties = pika.BasicProperties()
    delivery = Delivery(1, 1, redelivered, "j", None, None, published_ms, received_ms, properties, b"{}", suspect)
    return Outcome(delivery, result)


def _gauges(metrics: WorkerMetrics) -> tuple[float, float]:
    """The wait and the delivery time, as Prometheus scrapes them."""
    values = {
        s.name: s.value for family in text_string_to_metric_families(metrics.render().decode()) for s in family.samples
    }
    return values["inferq_job_queue_wait_seconds"], values["inferq_job_received_timestamp_seconds"]


def test_a_worker_that_finished_nothing_reads_as_last_active_when_it_started() -> None:
    before = time.time()
    wait, received = _gauges(WorkerMetrics())
    assert wait == 0.0
    assert before <= received <= time.time()


def test_the_newest_first_delivery_tells_the_wait_and_the_newest_delivery_tells_when() -> None:
    metrics = WorkerMetrics()
    metrics.observe_processed(
        [],
        [
            _outcome(1_000_000.0, 1_004_000.0),  # waited 4 s
            _outcome(1_001_000.0, 1_009_000.0),  # the newest first delivery: waited 8 s
            _outcome(1_000.0, 1_010_000.0, redelivered=True),  # redelivered: its wait says nothing of the queue
            _outcome(2_000.0, 1_011_000.0, suspect=True),  # from the retry queue: neither
            _outcome(None, 1_002_000.0),  # a producer that set no timestamp
        ],
    )
    assert _gauges(metrics) == (8.0, 1_011.0)


def test_a_clock_skewed_producer_never_makes_a_negative_wait() -> None:
    metrics = WorkerMetrics()
    metrics.observe_processed([], [_outcome(2_000_000.0, 1_000_000.0)])
    assert _gauges(metrics) == (0.0, 1_000.0)


@pytest.mark.broker
def test_a_worker_reports_how_long_real_jobs_waited_for_it(iris_store: Env) -> None:
    # Given jobs published, then left waiting with no worker for over a second
    published = time.time()
    iris_store.submit([make_job([[5.1, 3.5, 1.4, 0.2]]) for _ in range(3)])
    time.sleep(1.5)
    # When a worker takes and finishes them
    worker = build_worker(iris_store.worker_settings(), drain=True)
    worker.run()
    # Then it tells that the jobs it took had waited that long, and when it took the last one
    wait, received = _gauges(worker.metrics)
    assert 1.5 <= wait <= time.time() - published
    assert published + 1.5 <= received <= time.time()

"""The real path: producer → RabbitMQ → worker → result store and result queue."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta

import numpy as np
import pika
import pytest
from support import AMQP_URL, BackgroundWorker, Env, Models, dumps, job_dict, make_job, wait_for

from inferq.model_store.base import publish
from inferq.producer.client import Producer
from inferq.shared.broker.topology import REASON_HEADER
from inferq.shared.contract.messages import Status
from inferq.shared.errors import ErrorCode

pytestmark = pytest.mark.broker


def test_outputs_equal_scikit_learns_on_the_same_rows(iris_store: Env, models: Models) -> None:
    rows = models.X[::5]  # 30 rows, split over jobs of 1 to 4 rows
    jobs, start = [], 0
    for size in [1, 2, 3, 4] * 3:
        jobs.append(make_job(rows[start : start + size], version=1))
        start += size
    jobs.append(make_job(rows[:7], version=2))
    iris_store.submit(jobs)

    counters = iris_store.drain()

    stored = iris_store.stored()
    assert counters.succeeded == len(jobs) and len(stored) == len(jobs)
    start = 0
    for job in jobs[:-1]:
        chunk = rows[start : start + job.rows]
        start += job.rows
        result = stored[job.id]
        label, probabilities = (t.to_numpy() for t in result.outputs or [])
        np.testing.assert_array_equal(label, models.forest.predict(chunk))
        np.testing.assert_allclose(probabilities, models.forest.predict_proba(chunk), atol=1e-5)
    logistic = stored[jobs[-1].id].outputs or []
    np.testing.assert_allclose(logistic[1].to_numpy(), models.logistic.predict_proba(rows[:7]), atol=1e-5)


def test_a_batch_mixing_models_and_versions_is_split_correctly(iris_store: Env, models: Models) -> None:
    publish(iris_store.store, "flower", models.logistic_onnx)
    plan = [("iris", 1), ("iris", 2), ("flower", 1)] * 20
    jobs = [make_job(models.X[i : i + 1], model=m, version=v) for i, (m, v) in enumerate(plan)]
    iris_store.submit(jobs)

    iris_store.drain()

    stored = iris_store.stored()
    shas = {key: iris_store.store.read_manifest(*key).sha256 for key in set(plan)}
    for i, (job, (model, version)) in enumerate(zip(jobs, plan, strict=True)):
        result = stored[job.id]
        assert (result.model, result.version, result.model_sha256) == (model, version, shas[(model, version)])
        estimator = models.forest if (model, version) == ("iris", 1) else models.logistic
        probabilities = (result.outputs or [])[1].to_numpy()
        np.testing.assert_allclose(probabilities, estimator.predict_proba(models.X[i : i + 1]), atol=1e-5)


def test_latest_and_aliases_resolve_to_a_concrete_version_in_the_result(iris_store: Env, models: Models) -> None:
    by_ref = {ref: make_job(models.X[:1], version=ref) for ref in ("latest", "champion", 1)}
    iris_store.submit(list(by_ref.values()))

    iris_store.drain()

    stored = iris_store.stored()
    assert {ref: (stored[j.id].requested_version, stored[j.id].version) for ref, j in by_ref.items()} == {
        "latest": ("latest", 2),
        "champion": ("champion", 1),
        1: (1, 1),
    }


@pytest.mark.parametrize(
    ("change", "code", "fragment"),
    [
        ({"model": "nope"}, ErrorCode.UNKNOWN_MODEL, "no model named 'nope'"),
        ({"version": 9}, ErrorCode.UNKNOWN_VERSION, "no version 9"),
        ({"version": "ghost"}, ErrorCode.UNKNOWN_VERSION, "no alias 'ghost'"),
        (
            {"inputs": [{"name": "X", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]},
            ErrorCode.INPUT_MISMATCH,
            "must have shape",
        ),
        (
            {"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP64", "data": [1, 2, 3, 4]}]},
            ErrorCode.INPUT_MISMATCH,
            "must be FP32",
        ),
        (
            {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]},
            ErrorCode.INPUT_MISMATCH,
            "takes inputs ['X']",
        ),
        (
            {"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, "x"]}]},
            ErrorCode.INVALID_PAYLOAD,
            "found a string",
        ),
        ({"deadline": "2020-01-01T00:00:00Z"}, ErrorCode.EXPIRED, "deadline"),
        ({"shape_typo": 1}, ErrorCode.INVALID_PAYLOAD, "shape_typo"),
    ],
)
def test_a_job_that_cannot_run_gets_exactly_one_failed_result(
    iris_store: Env, change: dict, code: ErrorCode, fragment: str
) -> None:
    bad = job_dict(id="bad-job", **change)
    good = job_dict(id="good-job")
    iris_store.publish_raw(dumps(bad), message_id="bad-job")
    iris_store.publish_raw(dumps(good), message_id="good-job")

    counters = iris_store.drain()

    on_queue = iris_store.results_on_queue()
    assert Counter(r.id for r in on_queue) == {"bad-job": 1, "good-job": 1}
    result = iris_store.stored()["bad-job"]
    expected_status = Status.EXPIRED if code is ErrorCode.EXPIRED else Status.FAILED
    assert result.status is expected_status and result.error is not None
    assert result.error.code is code
    assert fragment in result.error.message
    assert iris_store.stored()["good-job"].status is Status.SUCCEEDED
    assert counters.received == 2 and iris_store.depth(iris_store.jobs_queue) == 0


def test_an_undecodable_message_goes_to_the_dlq_with_its_reason_and_the_worker_goes_on(iris_store: Env) -> None:
    iris_store.publish_raw(b"\x00 definitely not json")
    iris_store.publish_raw(dumps(job_dict(id="after-poison")))

    counters = iris_store.drain()

    dead = iris_store.read_queue(f"{iris_store.jobs_queue}.dlq")
    assert len(dead) == 1
    props, body = dead[0]
    assert body == b"\x00 definitely not json"
    assert props.headers[REASON_HEADER].startswith("invalid_payload: no readable job id")
    assert iris_store.stored()["after-poison"].status is Status.SUCCEEDED
    assert counters.dead_lettered == 1 and iris_store.depth(iris_store.jobs_queue) == 0


def test_a_body_without_an_id_uses_the_amqp_message_id(iris_store: Env) -> None:
    iris_store.publish_raw(b"{not json", message_id="from-envelope")

    iris_store.drain()

    result = iris_store.stored()["from-envelope"]
    assert result.error is not None and result.error.code is ErrorCode.INVALID_PAYLOAD


def test_an_oversized_job_gets_a_too_large_result(iris_store: Env) -> None:
    body = dumps(job_dict(id="huge", parameters={"pad": "x" * 5000}))
    iris_store.publish_raw(body, message_id="huge")

    iris_store.drain(max_message_bytes=4096)

    result = iris_store.stored()["huge"]
    assert result.error is not None and result.error.code is ErrorCode.TOO_LARGE


def test_reply_to_gets_the_result_with_the_correlation_id(iris_store: Env, models: Models) -> None:
    with BackgroundWorker(iris_store.worker_settings()), Producer(iris_store.producer_settings()) as producer:
        job = make_job(models.X[:2], version="champion")
        result = producer.request(job, timeout_s=30)
    assert result.id == job.id and result.version == 1 and result.status is Status.SUCCEEDED
    # The result also went to the results queue and the store.
    assert [r.id for r in iris_store.results_on_queue()] == [job.id]
    assert iris_store.stored()[job.id] == result


def test_a_raw_reply_to_queue_receives_the_correlation_id(iris_store: Env, models: Models) -> None:
    reply_queue = f"{iris_store.prefix}.replies"
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    connection.channel().queue_declare(reply_queue)
    connection.close()
    job = make_job(models.X[:1])
    iris_store.submit([job], reply_to=reply_queue, correlation_id="corr-42")
    try:
        iris_store.drain()
        replies = iris_store.read_queue(reply_queue)
    finally:
        connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        connection.channel().queue_delete(reply_queue)
        connection.close()
    assert len(replies) == 1
    props, body = replies[0]
    assert props.correlation_id == "corr-42" and job.id.encode() in body


def test_two_worker_processes_on_one_queue_give_every_job_exactly_one_result(iris_store: Env, models: Models) -> None:
    jobs = [make_job(models.X[i % 150 : i % 150 + 1], version=1 + i % 2) for i in range(1500)]
    # Both consume before any job is queued: the broker then shares the jobs between them (however
    # unevenly their start-up went), instead of the first one up draining the queue alone.
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "inferq", "worker"],
            env=iris_store.environ(INFERQ_PREFETCH="50"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        wait_for(lambda: iris_store.consumers(iris_store.jobs_queue) == 2, timeout_s=60)
        assert len(iris_store.submit(jobs)) == len(jobs)
        wait_for(lambda: len(iris_store.stored()) == len(jobs), timeout_s=120)
        wait_for(lambda: iris_store.depth(iris_store.results_queue) == len(jobs), timeout_s=30)
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
    logs = [w.communicate(timeout=60)[1] for w in workers]

    assert [w.returncode for w in workers] == [0, 0], logs
    on_queue = Counter(r.id for r in iris_store.results_on_queue())
    assert set(on_queue) == {j.id for j in jobs} and set(on_queue.values()) == {1}
    assert set(iris_store.stored()) == {j.id for j in jobs}
    processed_by = Counter(r.worker for r in iris_store.stored().values())
    assert len(processed_by) == 2, f"both workers should have taken jobs: {processed_by}"
    assert iris_store.depth(iris_store.jobs_queue) == 0


def test_a_job_with_a_future_deadline_runs(iris_store: Env, models: Models) -> None:
    job = make_job(models.X[:1], deadline=datetime.now(UTC) + timedelta(minutes=5))
    iris_store.submit([job])
    iris_store.drain()
    assert iris_store.stored()[job.id].status is Status.SUCCEEDED

"""Test support: the real broker with unique queue names per test, temp stores, tiny ONNX models."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pika
import pytest
from onnx import TensorProto, helper
from sklearn.datasets import load_iris
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression

from inferq.model_store.base import ModelStore, publish
from inferq.model_store.convert import estimator_to_onnx
from inferq.model_store.stores import open_model_store
from inferq.producer.client import Producer
from inferq.shared.broker.amqp import declare_topology, delete_topology
from inferq.shared.config.settings import ProducerSettings, WorkerSettings
from inferq.shared.contract.messages import Job, Result, Tensor, job_digest
from inferq.shared.results.s3 import S3ResultStore
from inferq.shared.results.stores import open_result_store
from inferq.shared.s3.location import S3Location
from inferq.worker.batcher import Batch
from inferq.worker.consumer import Delivery
from inferq.worker.processor import Pending
from inferq.worker.worker import Counters, Worker, build_worker

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from seaweedfs import SeaweedFS

AMQP_URL = os.environ.get("INFERQ_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
"""The shared broker: the one place the suite reads it (``INFERQ_TEST_AMQP_URL``)."""
READ_WINDOW = 1000
"""Deliveries in flight while a test reads a queue out."""


def require_marker(request: pytest.FixtureRequest, marker: str, server: str) -> None:
    """Fail the requesting test unless it is marked ``marker``: a test that reaches ``server`` without
    saying so would be selected by ``-m "not {marker}"`` and fail there, where the server is missing."""
    if request.node.get_closest_marker(marker) is None:
        pytest.fail(
            f"{request.node.nodeid} needs {server} (fixture {request.fixturename!r}) "
            f"but is not marked: add @pytest.mark.{marker} (or {marker} in the module's pytestmark)",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def broker_answers() -> None:
    """The shared broker answers, checked once per session: fail loudly (never skip) when it does not."""
    try:
        pika.BlockingConnection(pika.URLParameters(AMQP_URL)).close()
        return
    except pika.exceptions.AMQPError as exc:
        reason = repr(exc)
    pytest.fail(f"RabbitMQ is not reachable at {AMQP_URL} ({reason}); run scripts/ensure-rabbitmq.sh", pytrace=False)


@pytest.fixture
def broker_is_up(request: pytest.FixtureRequest) -> None:
    """The shared broker at ``AMQP_URL``, for a test marked ``broker``; every fixture that reaches it
    asks for this one."""
    require_marker(request, "broker", f"RabbitMQ at {AMQP_URL}")
    request.getfixturevalue("broker_answers")


@dataclass(frozen=True)
class Models:
    """Estimators trained once per session and their ONNX bytes."""

    X: np.ndarray
    forest: RandomForestClassifier
    logistic: LogisticRegression
    forest_onnx: bytes
    logistic_onnx: bytes


@pytest.fixture(scope="session")
def models() -> Models:
    X, y = load_iris(return_X_y=True)
    forest = RandomForestClassifier(n_estimators=10, max_depth=4, random_state=0).fit(X, y)
    logistic = LogisticRegression(max_iter=500).fit(X, y)
    return Models(X.astype(np.float32), forest, logistic, estimator_to_onnx(forest), estimator_to_onnx(logistic))


@dataclass
class Env:
    """One test's isolated world: its queues and stores, and ways to use them."""

    tmp: Path
    prefix: str
    amqp_url: str = AMQP_URL
    model_location: str | None = None  # an s3:// model store instead of the directory
    result_location: str | None = None  # an s3:// result store instead of the directory

    @property
    def model_dir(self) -> Path:
        return self.tmp / "models"

    @property
    def result_dir(self) -> Path:
        return self.tmp / "results"

    @property
    def model_store_at(self) -> str:
        return self.model_location or str(self.model_dir)

    @property
    def result_store_at(self) -> str:
        return self.result_location or str(self.result_dir)

    @property
    def jobs_queue(self) -> str:
        return f"{self.prefix}.jobs"

    @property
    def results_queue(self) -> str:
        return f"{self.prefix}.results"

    @property
    def store(self) -> ModelStore:
        return open_model_store(self.model_store_at)

    def environ(self, **extra: str) -> dict[str, str]:
        """Environment variables for a subprocess ``inferq`` pointed at this world."""
        return {
            **os.environ,
            "INFERQ_AMQP_URL": self.amqp_url,
            "INFERQ_JOBS_QUEUE": self.jobs_queue,
            "INFERQ_RESULTS_QUEUE": self.results_queue,
            "INFERQ_MODEL_STORE": self.model_store_at,
            "INFERQ_RESULT_STORE": self.result_store_at,
            "INFERQ_LOG_FORMAT": "json",
            "INFERQ_CONNECT_TIMEOUT_S": "10",
            **extra,
        }

    def _settings(self, **overrides: Any) -> dict[str, Any]:
        return {
            "amqp_url": self.amqp_url,
            "jobs_queue": self.jobs_queue,
            "results_queue": self.results_queue,
            "model_store": self.model_store_at,
            "result_store": self.result_store_at,
            "connect_timeout_s": 10,
            **overrides,
        }

    def worker_settings(self, **overrides: Any) -> WorkerSettings:
        return WorkerSettings(**self._settings(**{"drain_poll_ms": 50, **overrides}))

    def producer_settings(self, **overrides: Any) -> ProducerSettings:
        values = self._settings(**overrides)
        return ProducerSettings(**values)

    def submit(self, jobs: list[Job], **props: Any) -> list[str]:
        confirmed: list[str] = []
        with Producer(self.producer_settings()) as producer:
            if props:
                for job in jobs:
                    producer.publish(job, **props)
                    confirmed.append(job.id)
            else:
                producer.publish_many(jobs, on_confirmed=confirmed.append)
        return confirmed

    def drain(self, **overrides: Any) -> Counters:
        """Run one in-process worker in drain mode until the jobs queue is empty."""
        return build_worker(self.worker_settings(**overrides), drain=True).run()

    def publish_raw(self, body: bytes, queue: str | None = None, **props: Any) -> None:
        """Publish bytes as they are (for malformed messages), after declaring the topology."""
        connection = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
        channel = connection.channel()
        declare_topology(channel, self.worker_settings())
        channel.confirm_delivery()
        channel.basic_publish(
            "", queue or self.jobs_queue, body, pika.BasicProperties(delivery_mode=2, **props), mandatory=True
        )
        connection.close()

    def read_queue(self, queue: str) -> list[tuple[pika.BasicProperties, bytes]]:
        """Take every message now in ``queue``.

        Consumed, not fetched with one ``basic.get`` round trip each (thousands of those on a quorum
        queue of a cluster take half a minute); what arrives after the count stays on the queue."""
        connection = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
        try:
            channel = connection.channel()
            count = channel.queue_declare(queue, passive=True).method.message_count
            messages: list[tuple[pika.BasicProperties, bytes]] = []
            if count == 0:
                return messages
            channel.basic_qos(prefetch_count=READ_WINDOW)
            unacked = None
            for method, props, body in channel.consume(queue, inactivity_timeout=3):
                if method is None:
                    break  # fewer than counted: another consumer took some
                messages.append((props, body))
                unacked = method.delivery_tag
                if len(messages) % (READ_WINDOW // 2) == 0:
                    channel.basic_ack(unacked, multiple=True)
                    unacked = None
                if len(messages) == count:
                    break
            if unacked is not None:
                channel.basic_ack(unacked, multiple=True)
            channel.cancel()  # deliveries past the count go back to the queue
            return messages
        finally:
            connection.close()

    def results_on_queue(self) -> list[Result]:
        return [Result.model_validate_json(body) for _, body in self.read_queue(self.results_queue)]

    def depth(self, queue: str) -> int:
        """Ready messages in ``queue``; a queue never declared holds none."""
        connection = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
        try:
            return int(connection.channel().queue_declare(queue, passive=True).method.message_count)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                return 0
            raise
        finally:
            connection.close()

    def consumers(self, queue: str) -> int:
        """Consumers on ``queue`` now (0 when it does not exist yet)."""
        connection = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
        try:
            return int(connection.channel().queue_declare(queue, passive=True).method.consumer_count)
        except pika.exceptions.ChannelClosedByBroker:
            return 0
        finally:
            connection.close()

    def delete_queues(self) -> None:
        connection = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
        channel = connection.channel()
        delete_topology(channel, self.worker_settings())
        connection.close()

    def stored(self) -> dict[str, Result]:
        if self.result_location is not None and self.result_location.startswith("s3://"):
            return _stored_in_s3(self.result_location)
        if self.result_location is not None:
            store = open_result_store(self.result_location)
            try:
                return {result.id: result for result in store.scan()}
            finally:
                store.close()
        if not self.result_dir.is_dir():
            return {}
        return {p.stem: Result.model_validate_json(p.read_bytes()) for p in self.result_dir.glob("*.json")}

    def inferq(self, *args: str, stdin: str | None = None, **extra_env: str) -> subprocess.CompletedProcess[str]:
        """Run the real ``inferq`` command."""
        return subprocess.run(
            [sys.executable, "-m", "inferq", *args],
            env=self.environ(**extra_env),
            input=stdin,
            text=True,
            capture_output=True,
            timeout=180,
            check=False,
        )


@pytest.fixture
def env(tmp_path: Path, broker_is_up: None) -> Iterator[Env]:
    """A world of unique queues on the shared broker (deleted afterwards): tests using it are marked ``broker``."""
    world = Env(tmp_path, f"test.{uuid.uuid4().hex[:12]}")
    yield world
    world.delete_queues()


S3_BUCKET = "inferq-test"


@pytest.fixture(scope="session")
def seaweedfs_server() -> Iterator[SeaweedFS]:
    """One real SeaweedFS S3 server for the session, on free loopback ports, started when the first
    test marked ``s3`` asks for it; the standard AWS_* variables point this process (and every
    ``inferq`` it starts) at it."""
    with SeaweedFS() as server:
        server.create_bucket(S3_BUCKET)
        saved = {key: os.environ.get(key) for key in server.environ}
        os.environ.update(server.environ)
        try:
            yield server
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@pytest.fixture
def seaweedfs(request: pytest.FixtureRequest) -> SeaweedFS:
    """The session's SeaweedFS, for a test marked ``s3``."""
    require_marker(request, "s3", "a SeaweedFS S3 server")
    server: SeaweedFS = request.getfixturevalue("seaweedfs_server")
    return server


@pytest.fixture
def s3_env(env: Env, seaweedfs: SeaweedFS) -> Env:
    """``env`` with both stores under a fresh prefix of the test bucket."""
    env.model_location = f"s3://{S3_BUCKET}/{env.prefix}/models"
    env.result_location = f"s3://{S3_BUCKET}/{env.prefix}/results"
    return env


@pytest.fixture
def iris_store(env: Env, models: Models) -> Env:
    """``iris`` v1 (random forest, alias ``champion``) and v2 (logistic regression) in the model store."""
    publish(env.store, "iris", models.forest_onnx, alias="champion")
    publish(env.store, "iris", models.logistic_onnx)
    return env


def _stored_in_s3(location: str) -> dict[str, Result]:
    where = S3Location.parse(location)
    store = S3ResultStore(where)
    keys = [
        item["Key"]
        for page in store._client.get_paginator("list_objects_v2").paginate(Bucket=where.bucket, Prefix=where.prefix)
        for item in page.get("Contents", [])
    ]
    ids = [key[len(where.prefix) : -len(".json")] for key in keys if key.endswith(".json")]
    return {job_id: store.get(job_id) for job_id in ids}


def failing_model() -> bytes:
    """Takes X [N, 4] like iris, and fails at run time, whatever the rows (column 10 does not exist)."""
    graph = helper.make_graph(
        [helper.make_node("Gather", ["X", "column"], ["probabilities"], axis=1)],
        "fails",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 1])],
        [helper.make_tensor("column", TensorProto.INT64, [1], [10])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def make_job(
    rows: np.ndarray | list[list[float]], model: str = "iris", version: int | str = "latest", **kw: Any
) -> Job:
    array = np.asarray(rows, dtype=np.float32)
    tensor = Tensor(name="X", shape=list(array.shape), datatype="FP32", data=array.reshape(-1).tolist())
    return Job(id=kw.pop("id", uuid.uuid4().hex), model=model, version=version, inputs=[tensor], **kw)


def job_dict(**overrides: Any) -> dict[str, Any]:
    """A valid job as a plain dict, to break on purpose."""
    job: dict[str, Any] = {
        "id": uuid.uuid4().hex,
        "model": "iris",
        "version": "latest",
        "inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}],
    }
    job.update(overrides)
    return job


def dumps(value: Any) -> bytes:
    return orjson.dumps(value)


class BackgroundWorker:
    """A worker running in a thread of the test process, stopped gracefully on exit."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.worker: Worker = build_worker(settings, drain=False)
        self.counters: Counters | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.counters = self.worker.run()

    def __enter__(self) -> BackgroundWorker:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.worker.consumer.call_threadsafe(self.worker.request_stop)
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "worker did not stop"


def hear_ctrl_c() -> None:
    """In a child before it starts (``preexec_fn``): Ctrl-C as in a terminal, whatever this test process does
    with SIGINT (an ignored signal is inherited: a suite started in the background of a non-interactive
    shell, or one whose earlier test left SIGINT ignored, would give the child a Ctrl-C it never sees)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for(predicate: Callable[[], bool], timeout_s: float = 20.0) -> None:
    """Poll ``predicate`` until it holds (for conditions with no event to wait on)."""
    import time  # noqa: PLC0415

    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


_delivery_tags = iter(range(1, 1_000_000_000))


def delivery(*, redelivered: bool = False) -> Delivery:
    """A job delivery as the consumer makes one (a fresh tag each), for processor tests without a broker."""
    return Delivery(
        tag=next(_delivery_tags),
        epoch=1,
        redelivered=redelivered,
        message_id=None,
        reply_to=None,
        correlation_id=None,
        published_ms=time.time() * 1000,
        received_ms=time.time() * 1000,
        properties=pika.BasicProperties(),
        body=b"{}",
    )


def pending_batch(*jobs: Job, redelivered: bool = False) -> Batch[tuple[str, int | str], Pending]:
    """``jobs`` (of one model and version reference) as the batcher hands them to the processor."""
    items = [Pending(delivery(redelivered=redelivered), job) for job in jobs]
    return Batch((jobs[0].model, jobs[0].version), items, sum(j.rows for j in jobs))


@dataclass
class Audit:
    """What a fault test checks, and the counts its closing line prints."""

    confirmed: int
    stored: int
    dead_lettered: int
    on_result_queue: int
    duplicates_on_queue: int
    dead_letters: list[tuple[pika.BasicProperties, bytes]]

    def __str__(self) -> str:
        return (
            f"audit: {self.confirmed} confirmed, {self.stored} stored, {self.dead_lettered} dead-lettered, "
            f"{self.on_result_queue} results on the queue ({self.duplicates_on_queue} identical repeats)"
        )


def audit(env: Env, confirmed: set[str] | Mapping[str, Job], *, dead: frozenset[str] = frozenset()) -> Audit:
    """The invariant every fault test ends in: each confirmed job has exactly one stored result or one dead
    letter, nothing else is dead-lettered, no id has two different results, nothing is left queued, and
    (given the jobs themselves) every stored or published result answers its own job (its job digest)."""
    stored = env.stored()
    dlq = env.read_queue(f"{env.jobs_queue}.dlq")
    dlq_ids = Counter(props.message_id for props, _ in dlq)
    on_queue: dict[str, set[bytes]] = defaultdict(set)
    total_on_queue = 0
    for _, body in env.read_queue(env.results_queue):
        result = Result.model_validate_json(body)
        on_queue[result.id].add(result.model_dump_json().encode())
        total_on_queue += 1
    for job_id in confirmed:
        in_store, in_dlq = job_id in stored, dlq_ids.get(job_id, 0)
        assert (in_store, in_dlq) in {(True, 0), (False, 1)}, f"{job_id}: stored={in_store} dlq={in_dlq}"
    assert set(dlq_ids) == set(dead), f"unexpected dead letters: {set(dlq_ids) ^ set(dead)}"
    assert all(len(results) == 1 for results in on_queue.values()), "two different results for one id"
    assert set(on_queue) == {i for i in confirmed if i in stored}
    if isinstance(confirmed, Mapping):
        for job_id, job in confirmed.items():
            digest = job_digest(job)
            if job_id in stored:
                assert stored[job_id].job_sha256 == digest, f"{job_id}: the stored result answers another job"
            for body in on_queue.get(job_id, ()):
                assert Result.model_validate_json(body).job_sha256 == digest, f"{job_id}: a foreign result"
    assert env.depth(env.jobs_queue) == 0 and env.depth(f"{env.jobs_queue}.retry") == 0
    duplicates = total_on_queue - len(on_queue)
    report = Audit(len(confirmed), len(stored), sum(dlq_ids.values()), total_on_queue, duplicates, dlq)
    print(report)
    return report

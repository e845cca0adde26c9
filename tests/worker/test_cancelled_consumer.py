"""A consumer the broker cancels (its queue deleted, and perhaps re-created, under a running worker) is
noticed: the worker reports not ready, declares its queues again and consumes again; a refused declaration
ends it with one line; a drain still ends, and a stop still ends promptly."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator

import numpy as np
import pika
import pytest
from private_broker import free_port
from support import Env, Models, audit, make_job, wait_for

from inferq.model_store.base import publish
from inferq.shared.broker.amqp import declare_topology
from inferq.shared.contract.messages import Job, Tensor
from inferq.shared.errors import BrokerRefused
from inferq.worker.worker import Worker, build_worker

pytestmark = pytest.mark.broker

SHUTDOWN_GRACE_S = 60
"""Long, so that a stop that had to wait out the grace period cannot pass for one that ended by itself."""


class WorkerProcess:
    """A real ``inferq worker`` process with its probes on a port of its own, its log in a file."""

    def __init__(self, env: Env, *args: str) -> None:
        self.port = free_port()
        self.log_path = env.tmp / f"worker-{uuid.uuid4().hex[:6]}.log"
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "inferq", "worker", *args],
                env=env.environ(INFERQ_METRICS_PORT=str(self.port), INFERQ_SHUTDOWN_GRACE_S=str(SHUTDOWN_GRACE_S)),
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as answer:
                return bool(answer.status == 200)
        except (urllib.error.URLError, OSError):
            return False


@pytest.fixture
def start_worker() -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(env: Env, *args: str) -> WorkerProcess:
        started.append(WorkerProcess(env, *args))
        return started[-1]

    yield start
    for worker in started:  # a failing test must not leave workers running against the shared broker
        if worker.proc.poll() is None:
            worker.proc.kill()
            worker.proc.wait()


RECREATE_AFTER_S = 0.5
"""NOTE: RabbitMQ 3.10 sends no ``basic.cancel`` for a quorum queue re-declared within milliseconds of its
deletion: the consumer then lingers, attached to the new queue by its name, taking messages it never
delivers, until the broker's consumer timeout closes its channel. An operator is never that fast."""


def delete_and_recreate(env: Env, queue: str) -> None:
    """What an operator does to a queue with the wrong arguments: delete it, and declare it again."""
    connection = pika.BlockingConnection(pika.URLParameters(env.amqp_url))
    try:
        channel = connection.channel()
        channel.queue_delete(queue)
        connection.sleep(RECREATE_AFTER_S)
        declare_topology(channel, env.worker_settings())
    finally:
        connection.close()


def backlog(env: Env, models: Models, count: int) -> dict[str, Job]:
    jobs = [make_job(models.X[i % 150 : i % 150 + 1], version=1 + i % 2) for i in range(count)]
    assert len(env.submit(jobs)) == count
    return {job.id: job for job in jobs}


def all_stored(env: Env, jobs: dict[str, Job]) -> Callable[[], bool]:
    return lambda: set(jobs) <= set(env.stored())


@pytest.mark.parametrize("deleted", ["jobs", "retry"])
def test_a_worker_whose_queue_is_deleted_and_recreated_under_it_consumes_the_new_one(
    iris_store: Env, models: Models, start_worker: Callable[..., WorkerProcess], deleted: str
) -> None:
    # Given a running worker that processed a first backlog
    worker = start_worker(iris_store)
    wait_for(worker.ready, timeout_s=60)
    jobs = backlog(iris_store, models, 200)
    wait_for(all_stored(iris_store, jobs), timeout_s=60)

    # When its jobs (or retry) queue is deleted and re-created under it
    queue = iris_store.jobs_queue if deleted == "jobs" else f"{iris_store.jobs_queue}.retry"
    delete_and_recreate(iris_store, queue)

    # Then it hears of the cancel, consumes the new queue and is ready again
    wait_for(lambda: '"consuming_again"' in worker.log, timeout_s=30)
    assert '"consumer_cancelled_by_broker"' in worker.log and f'"queue": "{queue}"' in worker.log
    wait_for(worker.ready)
    # And new jobs are processed, a suspect taken from the retry queue too
    more = backlog(iris_store, models, 300)
    suspect = make_job(models.X[:1], id=f"suspect-{uuid.uuid4().hex[:8]}")
    iris_store.publish_raw(
        suspect.model_dump_json().encode(), queue=f"{iris_store.jobs_queue}.retry", message_id=suspect.id
    )
    jobs |= more | {suspect.id: suspect}
    wait_for(all_stored(iris_store, jobs), timeout_s=60)
    # And a stop ends by itself, well within the grace period
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(timeout=SHUTDOWN_GRACE_S / 2) == 0, worker.log
    assert "worker_shutdown_grace_expired" not in worker.log
    report = audit(iris_store, jobs)
    assert report.stored == len(jobs) and report.dead_lettered == 0


def hold_redeclarations(worker: Worker) -> list[Callable[[], None]]:
    """Keep the worker's declarations after a cancel waiting until the test runs them (on the I/O
    thread), so that the moment between the cancel and the new consumer can be looked at."""
    link = worker.consumer._link
    redeclare = link.redeclare
    held: list[Callable[[], None]] = []
    link.redeclare = lambda on_done: held.append(lambda: redeclare(on_done))  # type: ignore[method-assign]
    return held


def run_in_thread(worker: Worker) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            worker.run()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


def test_readiness_is_false_until_the_queues_are_declared_again_and_a_stop_meanwhile_ends_promptly(
    iris_store: Env, models: Models
) -> None:
    # Given a running worker, ready
    worker = build_worker(iris_store.worker_settings(metrics_port=0, shutdown_grace_s=SHUTDOWN_GRACE_S), drain=False)
    held = hold_redeclarations(worker)
    thread, errors = run_in_thread(worker)
    wait_for(lambda: worker.ready)

    # When its jobs queue is deleted, it is not ready until it declared its queues again and consumes
    delete_and_recreate(iris_store, iris_store.jobs_queue)
    wait_for(lambda: bool(held))
    assert not worker.ready
    worker.consumer.call_threadsafe(held.pop())
    wait_for(lambda: worker.ready)
    jobs = backlog(iris_store, models, 100)
    wait_for(all_stored(iris_store, jobs), timeout_s=60)

    # And a stop that comes while it is declaring them again ends at once, not after the grace period
    delete_and_recreate(iris_store, iris_store.jobs_queue)
    wait_for(lambda: bool(held))
    worker.consumer.call_threadsafe(worker.request_stop)
    thread.join(timeout=SHUTDOWN_GRACE_S / 2)
    assert not thread.is_alive(), "the stop waited for the grace period"
    assert not errors and not worker.counters.forced
    report = audit(iris_store, jobs)
    assert report.stored == len(jobs)


def test_a_refused_declaration_after_a_cancel_ends_the_worker_with_a_one_line_error(iris_store: Env) -> None:
    # Given a running worker
    worker = build_worker(iris_store.worker_settings(metrics_port=0), drain=False)
    held = hold_redeclarations(worker)
    thread, errors = run_in_thread(worker)
    wait_for(lambda: worker.ready)

    # When its jobs queue is deleted and re-created with other arguments (a classic queue)
    connection = pika.BlockingConnection(pika.URLParameters(iris_store.amqp_url))
    connection.channel().queue_delete(iris_store.jobs_queue)
    wait_for(lambda: bool(held))
    connection.channel().queue_declare(iris_store.jobs_queue, durable=True)
    connection.close()
    worker.consumer.call_threadsafe(held.pop())

    # Then the worker ends with the refusal, one line naming the queue and what differs
    thread.join(timeout=30)
    assert not thread.is_alive()
    [error] = errors
    assert isinstance(error, BrokerRefused) and "\n" not in str(error)
    assert f"queue '{iris_store.jobs_queue}' exists with another" in str(error)


SLOW_TRIPS = 2_000_000.0
"""Loop trips that keep a job of :func:`slow_model` running for seconds."""


def slow_model() -> bytes:
    from test_watchdog import slow_when_large_model  # noqa: PLC0415

    return slow_when_large_model()


def slow_job(trips: float) -> Job:
    tensor = Tensor(name="x", shape=[1, 1], datatype="FP32", data=[trips])
    return Job(id=uuid.uuid4().hex, model="slow", inputs=[tensor])


def test_a_drain_whose_queue_is_deleted_and_recreated_while_a_job_runs_still_ends(env: Env) -> None:
    # Given a draining worker running a slow job, the last one of its queue
    publish(env.store, "slow", slow_model())
    jobs = [slow_job(SLOW_TRIPS)]
    env.submit(jobs)
    worker = build_worker(env.worker_settings(metrics_port=0, job_timeout_s=120), drain=True)
    thread, errors = run_in_thread(worker)
    wait_for(lambda: worker.in_flight == 1 and env.depth(env.jobs_queue) == 0, timeout_s=60)

    # When its queue is deleted and re-created under it
    delete_and_recreate(env, env.jobs_queue)

    # Then the slow job still gets its result, and the drain ends by itself
    thread.join(timeout=60)
    assert not thread.is_alive(), "the drain did not end"
    assert not errors and not worker.counters.forced
    report = audit(env, {job.id: job for job in jobs})
    assert report.stored == len(jobs)
    assert np.isclose(env.stored()[jobs[-1].id].outputs[0].data[0], SLOW_TRIPS)  # type: ignore[index]

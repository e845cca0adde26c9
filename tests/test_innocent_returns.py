"""Innocent jobs stay innocent: jobs held through an outage longer than the broker's consumer timeout, or
returned by lost connections, never move to the retry queue or toward the dead-letter queue; only a job in
flight at two crashes is suspected. Each test runs against a private RabbitMQ node whose
``consumer_timeout`` is shorter than the outage, and ends in the audit.

The node looks for deliveries unacked too long every second (its default: every minute), so the outage
test holds 2,000 jobs through five consumer timeouts in 40 s; the others take well under a minute each."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pika
import pytest
from private_broker import PrivateBroker
from support import BackgroundWorker, Env, Models, audit, make_job, wait_for

from inferq.model_store.base import publish
from inferq.shared.contract.messages import Job
from inferq.worker.worker import VERDICT_WAIT_S, Worker, build_worker

pytestmark = pytest.mark.broker

CONSUMER_TIMEOUT_S = 8
"""The private broker's ``consumer_timeout``: it closes the channel of a delivery unacked this long."""
CHECK_MS = 1000
"""How often the private broker looks for such deliveries (``channel_tick_interval``)."""
OUTAGE_S = 5 * CONSUMER_TIMEOUT_S
JOBS = 2_000


@pytest.fixture(scope="module")
def broker() -> Iterator[PrivateBroker]:
    node = PrivateBroker(
        f"consumer_timeout = {CONSUMER_TIMEOUT_S * 1000}\n",
        advanced=f"[{{rabbit, [{{channel_tick_interval, {CHECK_MS}}}]}}]",
    )
    node.start()
    yield node
    node.stop()


@pytest.fixture
def world(tmp_path: Path, models: Models, broker: PrivateBroker) -> Iterator[Env]:
    env = Env(tmp_path, f"innocent.{uuid.uuid4().hex[:8]}", amqp_url=broker.url)
    publish(env.store, "iris", models.forest_onnx)
    publish(env.store, "iris", models.logistic_onnx)
    yield env
    env.delete_queues()


def jobs_for(models: Models, count: int) -> list[Job]:
    return [make_job(models.X[i % 150 : i % 150 + 1], version=1 + i % 2) for i in range(count)]


class Running:
    """An in-process worker on a thread; stopped gracefully at the end."""

    def __init__(self, env: Env, **overrides: object) -> None:
        settings = env.worker_settings(
            broker_consumer_timeout_s=CONSUMER_TIMEOUT_S, job_timeout_s=4, store_retry_max_s=1, **overrides
        )
        self.worker: Worker = build_worker(settings, drain=False)
        self.thread = threading.Thread(target=self.worker.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.worker.consumer.call_threadsafe(self.worker.request_stop)
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "the worker did not stop"


def result_store_down(env: Env) -> None:
    env.result_dir.write_text("a plain file where the result directory should be")


def result_store_up(env: Env) -> None:
    env.result_dir.unlink()


def test_jobs_held_through_a_store_outage_longer_than_the_consumer_timeout_are_neither_retried_nor_dead_lettered(
    world: Env, models: Models
) -> None:
    # Given 2,000 jobs taken by a worker whose result store is down
    jobs = jobs_for(models, JOBS)
    result_store_down(world)
    confirmed = set(world.submit(jobs))
    running = Running(world)
    try:
        wait_for(lambda: world.depth(world.jobs_queue) == 0, timeout_s=60)
        # When the outage lasts far longer than the broker lets a delivery go unacked
        deadline = time.monotonic() + OUTAGE_S
        while time.monotonic() < deadline:
            # Then no job ever moves to the retry queue or the dead-letter queue
            assert world.depth(f"{world.jobs_queue}.retry") == 0
            assert world.depth(f"{world.jobs_queue}.dlq") == 0
            time.sleep(2)
        counters = running.worker.counters
        assert counters.quarantined == 0, f"{counters.quarantined} innocent jobs were quarantined"
        # And once the store is back, every job gets its one result
        result_store_up(world)
        wait_for(lambda: len(world.stored()) == JOBS, timeout_s=120)
        wait_for(lambda: running.worker.in_flight == 0 and world.depth(world.jobs_queue) == 0, timeout_s=60)
    finally:
        running.stop()
    assert running.worker.counters.quarantined == 0
    report = audit(world, {j.id: j for j in jobs if j.id in confirmed})
    assert report.stored == JOBS and report.dead_lettered == 0
    counters = running.worker.counters
    print(f"outage: {counters.received} deliveries, {counters.handed_back} handed back as copies, ", end="")
    print(f"{running.worker.consumer.epoch} session(s)")
    assert counters.handed_back >= JOBS, "the jobs should have been handed back before the consumer timeout"


def test_jobs_returned_by_two_lost_connections_are_not_quarantined(
    world: Env, models: Models, broker: PrivateBroker
) -> None:
    # Given two workers holding jobs unacked (their result store is down)
    jobs = jobs_for(models, 200)
    result_store_down(world)
    confirmed = set(world.submit(jobs))
    fleet = [Running(world), Running(world)]
    try:
        wait_for(lambda: sum(r.worker.counters.received for r in fleet) >= len(jobs), timeout_s=60)
        # When their connections are closed twice, each time after both reconnected and took the jobs again
        for sessions in (2, 3):
            broker.ctl("close_all_connections", "test: a lost connection")
            wait_for(lambda: all(r.worker.consumer.epoch == sessions for r in fleet), timeout_s=60)  # noqa: B023
            redelivered = len(jobs) * sessions
            wait_for(lambda: sum(r.worker.counters.received for r in fleet) >= redelivered, timeout_s=60)  # noqa: B023
            time.sleep(1.0)
        # Then none of the jobs is suspected (once their returns' announcements arrived): they stay in
        # ordinary batches, and run there once the store is back
        time.sleep(VERDICT_WAIT_S)
        quarantined = [r.worker.counters.quarantined for r in fleet]
        assert quarantined == [0, 0], f"{sum(quarantined)} jobs quarantined"
        assert world.depth(f"{world.jobs_queue}.retry") == 0
        result_store_up(world)
        wait_for(lambda: len(world.stored()) == len(jobs), timeout_s=60)
        wait_for(lambda: all(r.worker.in_flight == 0 for r in fleet), timeout_s=60)
    finally:
        for running in fleet:
            running.stop()
    assert [r.worker.counters.quarantined for r in fleet] == [0, 0]
    report = audit(world, {j.id: j for j in jobs if j.id in confirmed})
    assert report.stored == len(jobs) and report.dead_lettered == 0


def worker_process(env: Env, **extra: str) -> subprocess.Popen[bytes]:
    with (env.tmp / f"worker-{uuid.uuid4().hex[:6]}.log").open("w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "inferq", "worker"],
            env=env.environ(INFERQ_METRICS_PORT="0", INFERQ_STORE_RETRY_MAX_S="1", **extra),
            stdout=subprocess.DEVNULL,
            stderr=log,
        )


def test_jobs_in_flight_at_two_crashes_are_still_quarantined(world: Env, models: Models) -> None:
    # Given jobs a worker holds unacked (its result store is down)
    jobs = jobs_for(models, 50)
    result_store_down(world)
    confirmed = set(world.submit(jobs))
    # When two workers in turn are killed (-9) while holding them
    for _crash in range(2):
        process = worker_process(world)
        try:
            wait_for(lambda: world.depth(world.jobs_queue) == 0, timeout_s=60)
            time.sleep(0.5)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
        wait_for(lambda: world.depth(world.jobs_queue) == len(jobs), timeout_s=30)
    # Then the next worker quarantines each of them (it may be poison) and runs it alone
    result_store_up(world)
    log_path = world.tmp / "drain.log"
    with log_path.open("w") as log:
        done = subprocess.run(
            [sys.executable, "-m", "inferq", "worker", "--drain"],
            env=world.environ(INFERQ_METRICS_PORT="0"),
            stdout=subprocess.DEVNULL,
            stderr=log,
            timeout=180,
            check=False,
        )
    text = log_path.read_text()
    assert done.returncode == 0, text
    stopped = next(e for e in map(orjson.loads, text.splitlines()) if e.get("event") == "worker_stopped")
    assert stopped["quarantined"] == len(jobs), stopped
    report = audit(world, {j.id: j for j in jobs if j.id in confirmed})
    assert report.stored == len(jobs) and report.dead_lettered == 0


def announce(env: Env, returns: list[tuple[str, int, int]]) -> None:
    """Announce lost deliveries (message id, copy, delivery count then) as the worker that lost them would
    (on ``<jobs>.returns``)."""
    connection = pika.BlockingConnection(pika.URLParameters(env.amqp_url))
    try:
        channel = connection.channel()
        exchange = f"{env.jobs_queue}.returns"
        channel.exchange_declare(exchange, exchange_type="fanout", durable=True)
        body = orjson.dumps({"worker": "test", "cause": "connection lost", "returns": returns})
        channel.basic_publish(exchange, "", body)
    finally:
        connection.close()


def test_only_announced_returns_are_forgiven_and_a_job_near_the_delivery_limit_is_refreshed(
    iris_store: Env, models: Models
) -> None:
    # Given two jobs each returned four times (one short of the delivery limit): one was lost by a
    # worker's connection at each of its four deliveries, the other only at its first
    innocent, suspect = make_job(models.X[:1], version=1), make_job(models.X[1:2], version=1)
    with BackgroundWorker(iris_store.worker_settings()) as background:
        wait_for(lambda: iris_store.consumers(iris_store.jobs_queue) == 1)
        announce(iris_store, [(innocent.id, 0, n) for n in (0, 1, 2, 3)] + [(suspect.id, 0, 0)])
        time.sleep(0.5)  # heard
        for job in (innocent, suspect):
            body = job.model_dump_json(exclude_none=True).encode()
            iris_store.publish_raw(body, message_id=job.id, headers={"x-delivery-count": 4})
        # When the worker takes them, then the suspect (two returns unexplained: in flight at two crashes) is
        # quarantined, and the innocent one goes back as a fresh copy instead of risking its last attempt
        wait_for(lambda: len(iris_store.stored()) == 2, timeout_s=30)
        counters = background.worker.counters
        wait_for(lambda: background.worker.in_flight == 0)
    assert counters.quarantined == 1
    assert counters.received == 4  # each once more: the suspect from the retry queue, the innocent as a copy
    report = audit(iris_store, {j.id: j for j in (innocent, suspect)})
    assert report.stored == 2 and report.dead_lettered == 0

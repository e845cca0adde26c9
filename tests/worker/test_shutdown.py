"""Stopping a worker: a forced stop is prompt whatever a run is doing, a stop requested while the broker
connection is down (or a connection lost during a stop) ends the stop at once, and the whole stop, closing
included, ends within the grace time even when the broker no longer answers."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
from crashing_worker import SLOW, SLOW_S, STUCK, crashing_loader
from private_broker import BlackHole, PrivateBroker
from support import Env, Models, make_job, wait_for

from inferq.model_store.base import publish
from inferq.model_store.registry import Registry
from inferq.model_store.stores import open_model_store
from inferq.shared.results.stores import open_result_store
from inferq.worker.runner import LoadedModel
from inferq.worker.worker import Worker

pytestmark = pytest.mark.broker

TESTS = Path(__file__).resolve().parent.parent


def test_a_forced_stop_exits_promptly_even_with_a_run_stuck_in_the_processing_thread(
    iris_store: Env, models: Models
) -> None:
    # Given a worker whose processing thread is stuck in a run that never returns
    log = iris_store.tmp / "worker.log"
    with log.open("w") as stderr:
        worker = subprocess.Popen(
            [sys.executable, str(TESTS / "crashing_worker.py"), "--serve"],
            env=iris_store.environ(INFERQ_SHUTDOWN_GRACE_S="1", INFERQ_METRICS_PORT="0"),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        wait_for(lambda: iris_store.consumers(iris_store.jobs_queue) == 1)
        stuck = make_job([[STUCK, 1.0, 1.0, 1.0]])
        iris_store.submit([stuck])
        wait_for(lambda: iris_store.depth(iris_store.jobs_queue) == 0)  # taken: running now
        time.sleep(0.5)
        # When it is stopped and the grace time (1 s) runs out
        worker.terminate()
        # Then the process exits right after the grace time instead of waiting on the stuck thread
        # (the interpreter used to join it at exit: up to the job time limit, 300 s by default)
        code = worker.wait(timeout=10)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert code == 1, log.read_text()
    assert iris_store.depth(iris_store.jobs_queue) == 1  # the stuck job went back to the queue


@pytest.fixture(scope="module")
def private_broker() -> Iterator[PrivateBroker]:
    broker = PrivateBroker()
    broker.start()
    yield broker
    broker.stop()


def test_a_stop_requested_while_reconnecting_does_not_subscribe_again(
    tmp_path: Path, models: Models, private_broker: PrivateBroker
) -> None:
    env = Env(tmp_path, f"stop.{uuid.uuid4().hex[:8]}", amqp_url=private_broker.url)
    publish(env.store, "iris", models.forest_onnx)
    settings = env.worker_settings(heartbeat_s=2, shutdown_grace_s=30, prefetch=1)
    registry: Registry[LoadedModel] = Registry(open_model_store(env.model_store_at), partial(crashing_loader))
    worker = Worker(settings, registry, open_result_store(env.result_store_at), drain=False)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: env.consumers(env.jobs_queue) == 1)
        # Given a slow job in flight (prefetch 1) and more jobs waiting in the queue
        env.submit([make_job([[SLOW, 1.0, 1.0, 1.0]])])
        wait_for(lambda: env.depth(env.jobs_queue) == 0)
        later = [make_job(models.X[i : i + 1]) for i in range(20)]
        env.submit(later)
        # When the broker goes away, a stop is requested meanwhile, and the broker comes back while
        # the slow job still runs
        private_broker.ctl("stop_app")
        worker.consumer.call_threadsafe(worker.request_stop)
        private_broker.ctl("start_app")
        private_broker.wait_ready()
        thread.join(timeout=SLOW_S + 30)
        # Then the worker finished and left without taking any of the later jobs
        assert not thread.is_alive(), "worker did not stop"
        assert worker.counters.received == 1
        assert env.depth(env.jobs_queue) >= len(later)
    finally:
        if thread.is_alive():
            worker.consumer.call_threadsafe(worker.consumer.stop)
            thread.join(timeout=10)
        # NOTE: the queues stay (the node goes with the module): deleting a quorum queue that dead-letters at
        # least once just after its node's app restarted wedged RabbitMQ 3.10.8 for a minute.


def test_a_connection_lost_during_a_stop_ends_the_stop_at_once(
    tmp_path: Path, models: Models, private_broker: PrivateBroker
) -> None:
    env = Env(tmp_path, f"stop.{uuid.uuid4().hex[:8]}", amqp_url=private_broker.url)
    publish(env.store, "iris", models.forest_onnx)
    settings = env.worker_settings(shutdown_grace_s=30, prefetch=1)
    registry: Registry[LoadedModel] = Registry(open_model_store(env.model_store_at), partial(crashing_loader))
    worker = Worker(settings, registry, open_result_store(env.result_store_at), drain=False)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        # Given a stop that waits for a job stuck in its run
        wait_for(lambda: env.consumers(env.jobs_queue) == 1, timeout_s=60)
        stuck = make_job([[STUCK, 1.0, 1.0, 1.0]])
        env.submit([stuck])
        wait_for(lambda: worker.in_flight == 1)
        worker.consumer.call_threadsafe(worker.request_stop)
        wait_for(lambda: worker.stopping)
        # When the connection drops
        private_broker.ctl("close_all_connections", "test: lost during a stop")
        # Then the stop ends at once (the stuck job is back in the queue by itself), not at the grace time
        thread.join(timeout=10)
        assert not thread.is_alive(), "the stop waited on after its connection was lost"
        wait_for(lambda: env.depth(env.jobs_queue) == 1)
    finally:
        if thread.is_alive():
            worker.consumer.call_threadsafe(worker.consumer.stop)
            thread.join(timeout=10)
        env.delete_queues()


GRACE_S = 3.0


def test_the_whole_stop_ends_within_the_grace_time_when_the_broker_stops_answering(
    tmp_path: Path, private_broker: PrivateBroker
) -> None:
    # Given a worker whose broker, reached through a proxy, stops answering without closing anything
    hole = BlackHole(private_broker.port)
    env = Env(tmp_path, f"stop.{uuid.uuid4().hex[:8]}", amqp_url=hole.url)
    log = tmp_path / "worker.log"
    try:
        with log.open("w") as stderr:
            worker = subprocess.Popen(
                [sys.executable, "-m", "inferq", "worker"],
                env=env.environ(INFERQ_SHUTDOWN_GRACE_S=str(GRACE_S), INFERQ_METRICS_PORT="0"),
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        wait_for(lambda: env.consumers(env.jobs_queue) == 1, timeout_s=60)
        hole.dropping.set()
        # When it is stopped: neither its cancel nor its close is ever answered
        stopped_at = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(timeout=120)
        took_s = time.monotonic() - stopped_at
        # Then the process is gone within the grace time (it used to wait for the silence to be noticed)
        assert took_s < GRACE_S + 1.0, f"the stop took {took_s:.1f}s, grace {GRACE_S:g}s:\n{log.read_text()}"
        assert code != 0, log.read_text()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        hole.close()
        Env(tmp_path, env.prefix, amqp_url=private_broker.url).delete_queues()

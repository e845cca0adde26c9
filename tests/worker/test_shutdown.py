"""Stopping a worker: a forced stop is prompt whatever a run is doing, and a stop requested while the
broker connection is down is not undone by the reconnect."""

from __future__ import annotations

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
from private_broker import PrivateBroker
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
        env.delete_queues()

"""Real faults against real servers, each followed by an audit: every confirmed job ends in exactly one
stored result or one dead-letter entry with a reason, and no job id has two different results on the
result queue."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest
from private_broker import PrivateBroker
from support import BackgroundWorker, Env, Models, audit, make_job, wait_for

from inferq.model_store.base import publish
from inferq.model_store.registry import Registry
from inferq.producer.client import Producer
from inferq.shared.contract.messages import Job, Status
from inferq.shared.errors import PublishError
from inferq.shared.results.stores import open_result_store
from inferq.worker.runner import load_model
from inferq.worker.worker import Worker

pytestmark = pytest.mark.broker

TESTS = Path(__file__).parent


class WorkerProcess:
    """A real ``inferq worker`` process, its log in a file (a pipe nobody reads would fill and block it)."""

    def __init__(self, env: Env, *args: str, **extra_env: str) -> None:
        self.log_path = env.tmp / f"worker-{uuid.uuid4().hex[:6]}.log"
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "inferq", "worker", *args],
                env=env.environ(**extra_env),
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout_s: float = 120) -> int:
        return self.proc.wait(timeout=timeout_s)

    @property
    def log(self) -> str:
        return self.log_path.read_text()


_started: list[WorkerProcess] = []


def start_worker(env: Env, *args: str, **extra_env: str) -> WorkerProcess:
    worker = WorkerProcess(env, *args, **extra_env)
    _started.append(worker)
    return worker


@pytest.fixture(autouse=True)
def no_worker_outlives_its_test() -> Iterator[None]:
    """A failing test must not leave workers running against the shared broker."""
    yield
    while _started:
        worker = _started.pop()
        if worker.proc.poll() is None:
            worker.proc.kill()
            worker.proc.wait()


def backlog(env: Env, models: Models, count: int) -> list[Job]:
    jobs = [make_job(models.X[i % 150 : i % 150 + 1], version=1 + i % 2) for i in range(count)]
    assert len(env.submit(jobs)) == count
    return jobs


@pytest.fixture(scope="module")
def private_broker() -> Iterator[PrivateBroker]:
    broker = PrivateBroker()
    broker.start()
    yield broker
    broker.stop()


def test_kill_9_mid_batch_then_another_worker_finishes_in_ordinary_batches_with_nothing_lost(
    iris_store: Env, models: Models
) -> None:
    # NOTE: a worker on a quiet machine drains 3,000 jobs in a few tenths of a second, faster than the poll
    # below can see 300 results and kill it; 20,000 leave it seconds of work when the kill comes.
    jobs = backlog(iris_store, models, 20_000)
    first = start_worker(iris_store)
    wait_for(lambda: len(list(iris_store.result_dir.glob("*.json"))) >= 300, timeout_s=60)
    first.signal(signal.SIGKILL)
    first.wait()
    stored_at_kill = len(iris_store.stored())
    assert stored_at_kill < len(jobs), "the worker finished before it could be killed"

    second = start_worker(iris_store, "--drain")

    assert second.wait() == 0, second.log
    # Delivered once before (one crash): most likely innocent, so they run in ordinary batches at full
    # speed instead of one at a time from the retry queue.
    stopped = next(e for e in map(orjson.loads, second.log.splitlines()) if e.get("event") == "worker_stopped")
    assert stopped["quarantined"] == 0
    assert stopped["batches"] < (len(jobs) - stored_at_kill) / 20, stopped
    report = audit(iris_store, {j.id: j for j in jobs})
    assert report.stored == len(jobs) and report.dead_lettered == 0


def test_broker_restart_while_producing_and_consuming_loses_nothing(
    tmp_path: Path, models: Models, private_broker: PrivateBroker, capfd: pytest.CaptureFixture[str]
) -> None:
    env = Env(tmp_path, f"fault.{uuid.uuid4().hex[:8]}", amqp_url=private_broker.url)
    publish(env.store, "iris", models.forest_onnx)
    publish(env.store, "iris", models.logistic_onnx)
    jobs = [make_job(models.X[i % 150 : i % 150 + 1], version=1 + i % 2) for i in range(6000)]
    confirmed: list[str] = []
    failure: list[BaseException] = []

    def steady() -> Iterator[Job]:  # an upstream service, not a burst: the restart lands mid-stream
        for i, job in enumerate(jobs):
            if i % 20 == 0:
                time.sleep(0.01)
            yield job

    def produce() -> None:
        try:
            with Producer(env.producer_settings(confirm_window=200, connect_timeout_s=60)) as producer:
                producer.publish_many(steady(), on_confirmed=confirmed.append)
        except BaseException as exc:
            failure.append(exc)

    env.delete_queues()
    workers = [start_worker(env, INFERQ_CONNECT_TIMEOUT_S="60") for _ in range(2)]
    wait_for(lambda: env.consumers(env.jobs_queue) == 2, timeout_s=60)
    producer = threading.Thread(target=produce)
    producer.start()
    wait_for(lambda: len(confirmed) >= 1500, timeout_s=60)
    private_broker.restart_app(down_s=1.0)
    producer.join(timeout=120)
    assert not failure, failure
    assert len(confirmed) == len(jobs) and len(set(confirmed)) == len(jobs)
    assert "broker_connection_lost" in "".join(capfd.readouterr()), "the producer should have reconnected"
    wait_for(lambda: len(list(env.result_dir.glob("*.json"))) >= len(jobs), timeout_s=120)
    for worker in workers:
        worker.signal(signal.SIGTERM)

    assert [w.wait() for w in workers] == [0, 0], [w.log for w in workers]
    assert all("broker_connection_lost" in w.log for w in workers), "both workers should have reconnected"
    # Jobs redelivered by the restart whose results were already stored may still wait in the retry
    # queue to have them republished: a last worker drains that, as the fleet would.
    assert start_worker(env, "--drain").wait() == 0
    report = audit(env, set(confirmed))
    assert report.stored == len(jobs)
    env.delete_queues()


def test_result_store_unavailable_holds_jobs_unacked_until_it_returns(iris_store: Env, models: Models) -> None:
    iris_store.result_dir.write_text("a plain file where the result directory should be")
    jobs = backlog(iris_store, models, 50)
    with BackgroundWorker(iris_store.worker_settings(store_retry_max_s=0.5)) as background:
        time.sleep(2.0)
        assert iris_store.results_on_queue() == [], "nothing may be published before it is stored"
        assert iris_store.depth(iris_store.jobs_queue) == 0, "the worker holds the jobs, unacked"
        assert background.worker.consumer.ready, "the worker stays up and connected"
        iris_store.result_dir.unlink()  # the store comes back
        wait_for(lambda: len(iris_store.stored()) == len(jobs), timeout_s=30)
        wait_for(lambda: background.worker.counters.last_ack_at is not None)
    report = audit(iris_store, {j.id: j for j in jobs})
    assert report.on_result_queue == len(jobs)


def test_a_poison_job_that_crashes_its_worker_is_dead_lettered_and_others_finish(
    iris_store: Env, models: Models
) -> None:
    good = backlog(iris_store, models, 200)
    poison = make_job(np.array([[666.0, 1.0, 1.0, 1.0]]), version=1, id="poison-1")
    iris_store.submit([poison])
    runs = []
    log = iris_store.tmp / "crashing-worker.log"
    for _ in range(15):  # a supervisor restarting the crashed worker
        with log.open("a") as stderr:
            done = subprocess.run(
                [sys.executable, str(TESTS / "crashing_worker.py")],
                env=iris_store.environ(PYTHONPATH=str(TESTS.parent)),
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                timeout=120,
                check=False,
            )
        runs.append(done.returncode)
        if done.returncode == 0:
            break
    assert runs[-1] == 0 and set(runs[:-1]) == {70}, runs
    report = audit(iris_store, {j.id for j in good} | {"poison-1"}, dead=frozenset({"poison-1"}))
    assert report.stored == len(good) and report.dead_lettered == 1
    ((props, body),) = report.dead_letters
    assert props.headers["x-death"][0]["reason"] == "delivery_limit"
    assert body == poison.model_dump_json(exclude_none=True).encode(), "dead-lettered unchanged"
    print(f"poison job: {len(runs) - 1} worker crashes before it was dead-lettered")


def test_sigterm_under_load_finishes_in_flight_work_within_the_grace_time(iris_store: Env, models: Models) -> None:
    jobs = backlog(iris_store, models, 20_000)  # seconds of work left when the signal comes (see above)
    worker = start_worker(iris_store, INFERQ_SHUTDOWN_GRACE_S="10")
    wait_for(lambda: len(list(iris_store.result_dir.glob("*.json"))) >= 200, timeout_s=60)
    stopped_at = time.monotonic()
    worker.signal(signal.SIGTERM)
    code = worker.wait(30)
    took_s = time.monotonic() - stopped_at
    assert code == 0, worker.log
    assert took_s < 10, f"took {took_s:.1f}s"
    assert "worker_stopping" in worker.log and "worker_stopped" in worker.log
    remaining = iris_store.depth(iris_store.jobs_queue)
    assert 0 < remaining < len(jobs), "the worker should have stopped part-way"

    assert start_worker(iris_store, "--drain").wait() == 0

    report = audit(iris_store, {j.id: j for j in jobs})
    assert report.duplicates_on_queue == 0, "a graceful stop acks everything it published"
    assert report.on_result_queue == len(jobs)
    print(f"SIGTERM: stopped in {took_s:.2f}s with {remaining} jobs left for the next worker")


def test_a_second_signal_exits_at_once_and_nothing_is_lost(iris_store: Env, models: Models) -> None:
    # NOTE: a backlog of 20,000 keeps the I/O thread busy when the signals come (the forced exit used to
    # wait for the main thread to run Python code, sometimes for more than 30 s).
    jobs = backlog(iris_store, models, 20_000)
    worker = start_worker(iris_store, INFERQ_STORE_RETRY_MAX_S="0.5")
    wait_for(lambda: len(list(iris_store.result_dir.glob("*.json"))) >= 100, timeout_s=60)
    # The result store goes away, so the graceful stop cannot finish: only the second signal ends it.
    aside = iris_store.tmp / "results-aside"
    iris_store.result_dir.rename(aside)
    iris_store.result_dir.write_text("not a directory")
    wait_for(lambda: "result_store_unavailable" in worker.log, timeout_s=30)
    worker.signal(signal.SIGTERM)
    wait_for(lambda: "worker_stopping" in worker.log)
    stopped_at = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 128 + signal.SIGTERM
    assert time.monotonic() - stopped_at < 5
    assert "worker_forced_exit" in worker.log

    iris_store.result_dir.unlink()
    aside.rename(iris_store.result_dir)
    assert start_worker(iris_store, "--drain").wait() == 0

    audit(iris_store, {j.id: j for j in jobs})


def test_a_full_queue_pushes_back_on_the_producer_and_drops_nothing(iris_store: Env, models: Models) -> None:
    settings = iris_store.producer_settings(max_queue_length=20, publish_retry_s=1.0, confirm_window=50)
    # A quorum queue applies its bound lazily (a few hundred more may land): offer far more than that.
    jobs = [make_job(models.X[:1]) for _ in range(3000)]
    confirmed: list[str] = []
    with Producer(settings) as producer, pytest.raises(PublishError, match="kept refusing"):
        producer.publish_many(jobs, on_confirmed=confirmed.append)
    assert 20 <= len(confirmed) < len(jobs)
    wait_for(lambda: iris_store.depth(iris_store.jobs_queue) == len(confirmed))  # every confirmed job is queued

    # With a worker draining the queue, the producer's backoff gets everything through.
    patient = iris_store.producer_settings(max_queue_length=20, publish_retry_s=60.0, confirm_window=50)
    more = [make_job(models.X[:1]) for _ in range(300)]
    with BackgroundWorker(iris_store.worker_settings(max_queue_length=20)), Producer(patient) as producer:
        producer.publish_many(more, on_confirmed=confirmed.append)
        wait_for(lambda: len(iris_store.stored()) == len(confirmed), timeout_s=60)
    report = audit(iris_store, set(confirmed))
    assert report.stored == len(confirmed) == len(set(confirmed))


def test_heartbeats_flow_while_a_slow_model_loads(iris_store: Env, models: Models) -> None:
    def slow_loader(manifest, data):  # type: ignore[no-untyped-def]
        time.sleep(4)  # longer than two heartbeat intervals
        return load_model(manifest, data)

    settings = iris_store.worker_settings(heartbeat_s=1)
    job = make_job(models.X[:1])
    iris_store.submit([job])
    worker = Worker(
        settings, Registry(iris_store.store, slow_loader), open_result_store(settings.result_store), drain=True
    )
    counters = worker.run()
    assert counters.succeeded == 1
    assert worker.consumer.epoch == 1, "the connection must not have been dropped and reopened"
    assert iris_store.stored()[job.id].status is Status.SUCCEEDED


def test_a_job_time_limit_above_the_consumer_timeout_is_refused_at_start(env: Env) -> None:
    done = env.inferq("worker", INFERQ_JOB_TIMEOUT_S="3600", INFERQ_BROKER_CONSUMER_TIMEOUT_S="1800")
    assert done.returncode == 2
    assert "job_timeout_s (3600) must be below broker_consumer_timeout_s (1800)" in done.stderr
    assert os.linesep not in done.stderr.rstrip()

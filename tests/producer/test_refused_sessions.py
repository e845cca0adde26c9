"""A session whose publishes the broker keeps refusing is replaced, and the producer neither reports a
refused job as confirmed nor gives up while it may still get through."""

from __future__ import annotations

import threading

import pytest
from support import BackgroundWorker, Env, Models, make_job, wait_for

from inferq.producer.client import Producer
from inferq.shared.broker import connection

pytestmark = pytest.mark.broker


def test_a_long_run_of_nacks_opens_a_new_session_and_every_job_is_confirmed_once(
    iris_store: Env, models: Models, capfd: pytest.CaptureFixture[str]
) -> None:
    # Given a jobs queue bounded at 10 that refuses publishes, and a producer patient for 60 s
    settings = iris_store.producer_settings(max_queue_length=10, publish_retry_s=60.0, confirm_window=100)
    jobs = [make_job(models.X[:1]) for _ in range(1500)]
    confirmed: list[str] = []
    producer_done = threading.Event()

    def produce() -> None:
        with Producer(settings) as producer:
            producer.publish_many(jobs, on_confirmed=confirmed.append)
        producer_done.set()

    thread = threading.Thread(target=produce)
    thread.start()
    # When the broker refuses publishes long enough for a run of nacks, then a worker makes room
    wait_for(lambda: "broker_refusing_publishes" in "".join(capfd.readouterr()), timeout_s=60)
    with BackgroundWorker(iris_store.worker_settings(max_queue_length=10)):
        thread.join(timeout=120)
        assert producer_done.is_set(), "the producer gave up or hung"
        wait_for(lambda: len(iris_store.stored()) == len(jobs), timeout_s=60)
    # Then every job was confirmed exactly once and got exactly one result
    assert sorted(confirmed) == sorted(j.id for j in jobs)
    assert set(iris_store.stored()) == {j.id for j in jobs}


def test_one_job_refused_for_a_while_opens_a_new_session_though_the_count_is_never_reached(
    iris_store: Env, models: Models, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a full jobs queue (bounded at 1, a quorum queue takes one more) and a producer retrying one
    # more job, patient for 60 s
    monkeypatch.setattr(connection, "NACK_STREAK_S", 2.0)
    settings = iris_store.producer_settings(max_queue_length=1, publish_retry_s=60.0)
    early = [make_job(models.X[i : i + 1]) for i in range(2)]
    late = make_job(models.X[2:3])
    with Producer(settings) as producer:
        for job in early:
            producer.publish(job)
    done = threading.Event()

    def produce() -> None:
        with Producer(settings) as producer:
            producer.publish(late)
        done.set()

    thread = threading.Thread(target=produce)
    thread.start()
    # When its refusals go on for longer than the streak time (a handful of nacks, far below the count)
    wait_for(lambda: "broker_refusing_publishes" in "".join(capfd.readouterr()), timeout_s=30)
    # Then a new session was opened, and once a worker makes room the job is confirmed and runs once
    assert not done.is_set()
    with BackgroundWorker(iris_store.worker_settings(max_queue_length=1)):
        thread.join(timeout=90)
        assert done.is_set(), "the producer gave up or hung"
        wait_for(lambda: len(iris_store.stored()) == 3, timeout_s=60)
    assert set(iris_store.stored()) == {job.id for job in [*early, late]}

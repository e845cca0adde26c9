"""A session whose publishes the broker keeps refusing is replaced, and the producer neither reports a
refused job as confirmed nor gives up while it may still get through."""

from __future__ import annotations

import threading

import pytest
from support import BackgroundWorker, Env, Models, make_job, wait_for

from producer.client import Producer


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

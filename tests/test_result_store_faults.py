"""A result store that goes down holds jobs unacked, and loses nothing when it comes back: a PostgreSQL
server stopped (a private cluster: the shared one is never stopped). A SQLite file made read-only refuses
the store: the worker stops, and its jobs wait in the queue. The S3 server killed is in test_s3.py, the
file store gone in test_faults.py, other refusals in worker/test_result_store_refusals.py."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from postgres_support import PrivatePostgres
from support import BackgroundWorker, Env, Models, audit, make_job, wait_for

from inferq.shared.contract.messages import Job
from inferq.shared.results.postgres import POOL_TIMEOUT_S
from inferq.shared.results.stores import open_result_store

pytestmark = pytest.mark.broker


def _jobs(models: Models, count: int) -> list[Job]:
    return [make_job(models.X[i % 150 : i % 150 + 1], version=1 + i % 2) for i in range(count)]


def _outage_holds_jobs_and_loses_none(
    env: Env, models: Models, down: Callable[[], None], up: Callable[[], None], hold_s: float = 2.0
) -> None:
    before, during = _jobs(models, 300), _jobs(models, 300)
    with BackgroundWorker(env.worker_settings(store_retry_max_s=0.5)) as background:
        # Given a worker that has stored results already
        env.submit(before)
        wait_for(lambda: len(env.stored()) == len(before), timeout_s=60)
        wait_for(lambda: env.depth(env.results_queue) == len(before), timeout_s=30)  # stored, then published
        published = len(before)
        # When the store goes down and more jobs arrive
        down()
        env.submit(during)
        wait_for(lambda: env.depth(env.jobs_queue) == 0, timeout_s=30)
        time.sleep(hold_s)
        # Then the worker holds them unacked, publishes nothing, and stays connected
        assert env.depth(env.results_queue) == published, "nothing may be published before it is stored"
        assert background.worker.consumer.ready
        # And once the store is back, every job gets its one result
        up()
        wait_for(lambda: len(env.stored()) == len(before) + len(during), timeout_s=60)
    report = audit(env, {j.id for j in before + during})
    assert report.stored == len(before) + len(during)


def _chattr(flag: str, *paths: Path) -> None:
    subprocess.run(["chattr", flag, *(str(p) for p in paths if p.exists())], check=True)


def test_a_sqlite_file_made_read_only_stops_the_worker_and_its_jobs_wait_in_the_queue(
    iris_store: Env, models: Models
) -> None:
    db = iris_store.tmp / "results.db"
    iris_store.result_location = f"sqlite:{db}"
    files = [db, db.with_name("results.db-wal")]
    before, during = _jobs(models, 300), _jobs(models, 300)
    # NOTE: the tests run as root, whom file modes do not stop: the immutable attribute does.
    try:
        background = BackgroundWorker(iris_store.worker_settings(store_retry_max_s=0.5))
        with background:
            # Given a worker that has stored results already
            iris_store.submit(before)
            wait_for(lambda: len(iris_store.stored()) == len(before), timeout_s=60)
            wait_for(lambda: iris_store.depth(iris_store.results_queue) == len(before), timeout_s=30)
            # When its file is made read-only (no retry makes it writable) and more jobs arrive
            _chattr("+i", *files)
            iris_store.submit(during)
            # Then the worker stops by itself, not ready, with the store's refusal kept for its exit
            wait_for(lambda: not background._thread.is_alive(), timeout_s=60)
            assert not background.worker.ready
            refused = background.worker.processor.refused
            assert refused is not None and str(db) in str(refused)
        # And it acked none of them: every one is back in the queue, nothing published or dead-lettered
        wait_for(lambda: iris_store.depth(iris_store.jobs_queue) == len(during), timeout_s=30)
        assert iris_store.depth(iris_store.results_queue) == len(before)
    finally:
        _chattr("-i", *files)
    # And once the file is writable, a worker gives every job its one result
    iris_store.drain()
    report = audit(iris_store, {j.id: j for j in before + during})
    assert report.stored == len(before) + len(during)


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    cluster = PrivatePostgres()
    cluster.start()
    yield cluster
    cluster.remove()


@pytest.mark.postgres
def test_a_stopped_postgresql_holds_jobs_until_it_is_back(
    iris_store: Env, models: Models, private_postgres: PrivatePostgres
) -> None:
    iris_store.result_location = private_postgres.url
    # Longer than the pool's wait for a connection, so the worker sees the store fail and retries.
    _outage_holds_jobs_and_loses_none(
        iris_store, models, down=private_postgres.stop, up=private_postgres.start, hold_s=POOL_TIMEOUT_S + 2
    )
    store = open_result_store(private_postgres.url)
    try:
        assert store.count() == 600
    finally:
        store.close()

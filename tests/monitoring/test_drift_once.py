"""Drift counts a job once: when this delivery stored its result. A unit whose results could not be
stored, and a job whose id already had a stored result, add nothing (real model and result stores)."""

from __future__ import annotations

import threading
import time
from functools import partial
from pathlib import Path

import pytest
from support import Env, Models, make_job, pending_batch

from inferq.model_store.base import publish
from inferq.model_store.local import LocalModelStore
from inferq.model_store.registry import Registry
from inferq.model_store.stores import open_model_store
from inferq.monitoring.counting import Monitor
from inferq.monitoring.store import FileMonitorStore
from inferq.shared.contract.messages import Job, Result
from inferq.shared.results.base import ResultStore
from inferq.shared.results.stores import open_result_store
from inferq.worker.batcher import Batch
from inferq.worker.fetcher import ModelFetcher
from inferq.worker.processor import Pending, Processed, Processor, StoreUnavailable
from inferq.worker.runner import Limits, LoadedModel, load_model


class FailsOnce:
    """The real result store, whose first batch write fails as a store that is down for a moment does."""

    def __init__(self, store: ResultStore) -> None:
        self.store = store
        self.failures = 1

    def put_many(self, results: list[Result]) -> list[Result]:
        if self.failures:
            self.failures -= 1
            raise OSError("connection reset by peer")
        return self.store.put_many(results)

    def __getattr__(self, name: str) -> object:
        return getattr(self.store, name)


def batch(jobs: list[Job], *, redelivered: bool = False) -> Batch[tuple[str, int | str], Pending]:
    return pending_batch(*jobs, redelivered=redelivered)


@pytest.fixture
def monitored(tmp_path: Path, models: Models) -> tuple[Processor, Monitor, FailsOnce, threading.Event]:
    """A processor of ``iris`` (published with its training rows as reference), counting drift into an
    hour-long window, over a SQLite result store whose first write fails."""
    publish(LocalModelStore(tmp_path / "models"), "iris", models.forest_onnx, reference=(models.X, list("abcd")))
    registry: Registry[LoadedModel] = Registry(
        open_model_store(str(tmp_path / "models")), partial(load_model), load_retry_s=0
    )
    store = FailsOnce(open_result_store(f"sqlite:{tmp_path / 'results.db'}"))
    monitor = Monitor(FileMonitorStore(tmp_path / "monitor"), 3600, "test:1")
    stopping = threading.Event()
    processor = Processor(
        ModelFetcher(registry),
        store,  # type: ignore[arg-type]
        Limits(65536, 4_000_000),
        "test:1",
        stopping,
        0.01,
        monitor=monitor,
    )
    return processor, monitor, store, stopping


def process(processor: Processor, unit: Batch[tuple[str, int | str], Pending]) -> Processed:
    """Process like the worker does: jobs held while the model is fetched are tried again, and drift is
    counted once the unit's results are stored."""
    for _ in range(100):
        done = processor.process([unit], [])
        processor.observe(done)
        if not done.held:
            return done
        time.sleep(0.05)
    raise AssertionError("the model was never fetched")


def counted_rows(monitor: Monitor, tmp_path: Path) -> int:
    assert monitor.flush()
    return FileMonitorStore(tmp_path / "monitor").totals("iris", 1).rows


def test_a_unit_whose_store_write_failed_is_counted_once_when_its_redelivery_is_stored(
    monitored: tuple[Processor, Monitor, FailsOnce, threading.Event], models: Models, tmp_path: Path
) -> None:
    processor, monitor, store, stopping = monitored
    jobs = [make_job(models.X[i : i + 2]) for i in range(0, 20, 2)]  # 10 jobs of 2 rows
    process(processor, batch(jobs[:1]))  # the model is fetched; its first write fails, and is retried
    assert store.failures == 0 and counted_rows(monitor, tmp_path) == 2

    # Given a worker told to stop while the store fails: the unit is not completed, its jobs go back
    store.failures = 1
    stopping.set()
    with pytest.raises(StoreUnavailable):
        processor.process([batch(jobs[1:])], [])
    stopping.clear()

    # When the broker redelivers them and their results are stored
    done = process(processor, batch(jobs[1:], redelivered=True))

    # Then each job's rows are counted once
    assert all(o.counted for o in done.outcomes) and len(done.outcomes) == 9
    assert counted_rows(monitor, tmp_path) == 20


def test_jobs_whose_ids_already_have_results_are_not_counted_again(
    monitored: tuple[Processor, Monitor, FailsOnce, threading.Event], models: Models, tmp_path: Path
) -> None:
    processor, monitor, store, _ = monitored
    store.failures = 0
    jobs = [make_job(models.X[i : i + 1]) for i in range(12)]
    process(processor, batch(jobs))

    # Given the same jobs again: sent twice by their producer (not flagged), then redelivered by the broker
    again = process(processor, batch(jobs))
    redelivered = process(processor, batch(jobs, redelivered=True))

    # Then their stored results go out again and the counts stay those of the twelve jobs
    assert not any(o.counted for o in again.outcomes + redelivered.outcomes)
    assert counted_rows(monitor, tmp_path) == 12


@pytest.mark.broker
def test_a_failure_in_drift_counting_is_logged_and_the_worker_goes_on(
    env: Env, models: Models, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    # Given a monitored model whose drift counting fails on every batch
    publish(env.store, "iris", models.forest_onnx, reference=(models.X, list("abcd")))

    def broken(*_args: object) -> None:
        raise ValueError("a bug in counting")

    monkeypatch.setattr(Monitor, "observe", broken)
    jobs = [make_job(models.X[i : i + 1]) for i in range(300)]
    env.submit(jobs)

    # When a worker drains the queue, a few jobs at a time (many units, many failed counts)
    counters = env.drain(prefetch=20)

    # Then every job got its result, and the failure was said
    assert counters.succeeded == len(jobs) and set(env.stored()) == {j.id for j in jobs}
    assert "drift_counting_failed" in "".join(capfd.readouterr())

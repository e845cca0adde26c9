"""Stores that fail for a moment: only the jobs concerned wait and are tried again, in the same drain;
the other jobs get their results meanwhile, and nothing goes back to the broker or to the retry queue.

- the result store, while the worker looks for a result stored before (a job that may have run);
- the model store, while a version is loaded: neither the processing thread nor its compute lock
  waits on the store (models are fetched on a thread of their own, and the worker's registry does not
  sleep between attempts: the held jobs are tried again instead).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from functools import partial

import numpy as np
import pytest
from support import Env, Models, audit, make_job, wait_for

from inferq.model_store.local import LocalModelStore
from inferq.model_store.manifest import Manifest
from inferq.model_store.registry import Registry
from inferq.model_store.stores import open_model_store
from inferq.shared.broker.topology import RESENT_HEADER
from inferq.shared.contract.messages import Result
from inferq.shared.errors import StoreUnreachable
from inferq.shared.results.files import FileResultStore
from inferq.worker.runner import LoadedModel, load_model
from inferq.worker.worker import Worker, build_worker

pytestmark = pytest.mark.broker


class FlakyReads(FileResultStore):
    """A file result store whose reads fail once (a dropped connection) for any batch naming ``flaky``."""

    def __init__(self, root: str, flaky: str) -> None:
        super().__init__(root)
        self.flaky = flaky
        self.failed = 0
        self.reads: list[list[str]] = []

    def get_many(self, job_ids: Sequence[str]) -> dict[str, Result]:
        self.reads.append(list(job_ids))
        if self.flaky in job_ids and not self.failed:
            self.failed += 1
            raise ConnectionResetError("connection reset by peer")
        return super().get_many(job_ids)

    def get(self, job_id: str) -> Result:
        if job_id == self.flaky and not self.failed:
            self.failed += 1
            raise ConnectionResetError("connection reset by peer")
        return super().get(job_id)

    def exists(self, job_id: str) -> bool:
        if job_id == self.flaky and not self.failed:
            self.failed += 1
            raise ConnectionResetError("connection reset by peer")
        return super().exists(job_id)


def test_a_transient_store_error_on_one_jobs_lookup_holds_only_that_job_and_the_drain_finishes_it(
    iris_store: Env, models: Models
) -> None:
    # Given fresh jobs for two model versions, and one job its producer resent (so the worker first
    # looks for a result stored for it), whose lookup fails once
    fresh = [make_job(models.X[i : i + 1], version=1 + i % 2) for i in range(40)]
    resent = make_job(np.array([[5.1, 3.5, 1.4, 0.2]]), version=1)
    iris_store.submit(fresh[:20])
    iris_store.publish_raw(
        resent.model_dump_json(exclude_none=True).encode(),
        message_id=resent.id,
        content_type="application/json",
        headers={RESENT_HEADER: True},
    )
    iris_store.submit(fresh[20:])
    store = FlakyReads(str(iris_store.result_dir), flaky=resent.id)
    settings = iris_store.worker_settings()
    registry: Registry[LoadedModel] = Registry(
        open_model_store(settings.model_store), partial(load_model), load_retry_s=0
    )
    # When one worker drains the queue
    counters = Worker(settings, registry, store, drain=True).run()
    # Then the lookup failed once and was tried again, for the resent job alone
    assert store.failed == 1
    assert sum(resent.id in ids for ids in store.reads) == 2
    assert all(ids == [resent.id] for ids in store.reads)
    # And every job was delivered once: nothing was handed back to the broker or quarantined
    assert counters.received == len(fresh) + 1
    assert counters.quarantined == 0 and counters.dead_lettered == 0
    assert counters.succeeded == len(fresh) + 1
    # And every job has its one result, stored and published, with no queue left holding any
    report = audit(iris_store, {j.id for j in [*fresh, resent]})
    assert report.stored == report.on_result_queue == len(fresh) + 1


class UnreachableVersion(LocalModelStore):
    """A local model store whose manifest of one version cannot be read until :attr:`back` is set."""

    def __init__(self, root: str, version: int) -> None:
        super().__init__(root)
        self.version = version
        self.back = threading.Event()
        self.refused = 0

    def read_manifest(self, name: str, version: int) -> Manifest:
        if version == self.version and not self.back.is_set():
            self.refused += 1
            raise StoreUnreachable("read timed out")
        return super().read_manifest(name, version)


def test_a_model_version_that_cannot_be_read_holds_only_its_jobs(
    iris_store: Env, models: Models, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given jobs for two versions of a model, one of which cannot be read from the model store for now,
    # queued first
    ready = [make_job(models.X[i : i + 1], version=1) for i in range(30)]
    waiting = [make_job(models.X[i : i + 1], version=2) for i in range(5)]
    iris_store.submit(waiting[:2] + ready[:15] + waiting[2:] + ready[15:])
    model_store = UnreachableVersion(str(iris_store.model_dir), version=2)
    monkeypatch.setattr("inferq.worker.worker.open_model_store", lambda _location: model_store)
    worker = build_worker(iris_store.worker_settings(), drain=True)  # wired as `inferq worker --drain`
    drained = threading.Thread(target=worker.run, daemon=True)
    # When one worker drains the queue
    drained.start()
    # Then the other version's jobs all get their results while that version is still unreadable
    wait_for(lambda: all(j.id in iris_store.stored() for j in ready), timeout_s=30)
    assert model_store.refused >= 1
    assert not any(j.id in iris_store.stored() for j in waiting)
    # And once the version can be read, its jobs run in the same drain
    model_store.back.set()
    drained.join(timeout=60)
    assert not drained.is_alive(), "the drain did not finish"
    assert worker.counters.received == len(ready) + len(waiting), "no job went back to the broker"
    report = audit(iris_store, {j.id for j in ready + waiting})
    assert report.stored == len(ready) + len(waiting)

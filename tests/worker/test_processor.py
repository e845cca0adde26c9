"""The processor: one unit of work from decoded jobs to stored results, on real stores (a local model
store, the SQLite result store), without a broker."""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, cast

import pytest
from support import Models, make_job, pending_batch

from inferq.model_store.base import publish
from inferq.model_store.local import LocalModelStore
from inferq.model_store.registry import Registry
from inferq.model_store.stores import open_model_store
from inferq.shared.contract.messages import Datatype, ErrorInfo, Job, Result, Status, Tensor, job_digest
from inferq.shared.errors import ErrorCode, StoreRefused, ValueRefused
from inferq.shared.results.base import ResultStore
from inferq.shared.results.stores import open_result_store
from inferq.worker.batcher import Batch
from inferq.worker.fetcher import ModelFetcher
from inferq.worker.processor import ID_CONFLICT, STORED_RESULT_UNREADABLE, Pending, Processed, Processor
from inferq.worker.runner import Limits, LoadedModel, load_model


def batch(*jobs: Job, redelivered: bool = False) -> Batch[tuple[str, int | str], Pending]:
    return pending_batch(*jobs, redelivered=redelivered)


@pytest.fixture
def store(tmp_path: Path) -> ResultStore:
    return open_result_store(f"sqlite:{tmp_path / 'results.db'}")


def processor(model_store_at: str, store: ResultStore) -> Processor:
    """A processor whose models are fetched already (the background fetch is waited for)."""
    registry: Registry[LoadedModel] = Registry(open_model_store(model_store_at), partial(load_model), load_retry_s=0)
    models = ModelFetcher(registry)
    return Processor(models, store, Limits(65536, 4_000_000), "test:1", threading.Event(), 1.0)


def process(proc: Processor, *batches: Batch[tuple[str, int | str], Pending]) -> Processed:
    """Process like the worker does: held jobs are tried again once their model was fetched."""
    total = Processed()
    todo = list(batches)
    for _ in range(100):
        done = proc.process(todo, [])
        total.outcomes += done.outcomes
        total.rejections += done.rejections
        total.runs += done.runs
        if not done.held:
            return total
        time.sleep(0.05)
        todo = [Batch(b.key, [p for p in b.items if p in done.held], 1) for b in todo]
        todo = [b for b in todo if b.items]
    raise AssertionError("the model was never fetched")


@pytest.fixture
def iris_models(tmp_path: Path, models: Models) -> str:
    publish(LocalModelStore(tmp_path / "models"), "iris", models.forest_onnx)
    return str(tmp_path / "models")


def test_every_job_gets_a_stored_result_carrying_the_digest_of_its_job(
    iris_models: str, store: ResultStore, models: Models
) -> None:
    jobs = [make_job(models.X[i : i + 1]) for i in range(5)]
    done = process(processor(iris_models, store), batch(*jobs))
    assert [o.result.id for o in done.outcomes] == [j.id for j in jobs]
    assert all(o.counted and o.result.status is Status.SUCCEEDED for o in done.outcomes)
    assert done.runs and done.runs[0].rows == 5
    for job in jobs:
        stored = store.get(job.id)
        assert stored.job_sha256 == job_digest(job)
        assert stored == Result.model_validate_json(
            next(o.result for o in done.outcomes if o.result.id == job.id).to_json()
        )
    for outcome in done.outcomes:  # built without validation: its fields and its wire form agree
        assert Result.model_validate_json(outcome.result.to_json()) == outcome.result
        assert outcome.result.model_dump_json().encode() == outcome.result.to_json()


def test_a_redelivered_job_gets_its_stored_result_again_and_it_is_not_counted_twice(
    iris_models: str, store: ResultStore, models: Models
) -> None:
    job = make_job(models.X[:1])
    first = process(processor(iris_models, store), batch(job)).outcomes[0]
    again = process(processor(iris_models, store), batch(job, redelivered=True))
    assert again.runs == []  # not run a second time
    assert again.outcomes[0].result.to_json() == first.result.to_json()
    assert again.outcomes[0].counted is False


def test_the_same_job_sent_twice_publishes_the_first_result_and_counts_once(
    iris_models: str, store: ResultStore, models: Models
) -> None:
    job = make_job(models.X[:1])
    process(processor(iris_models, store), batch(job))
    duplicate = process(processor(iris_models, store), batch(job))  # not flagged as redelivered
    assert duplicate.outcomes[0].counted is False and not duplicate.rejections


@pytest.mark.parametrize("redelivered", [False, True], ids=["new-delivery", "redelivered"])
def test_an_id_reused_for_another_job_is_dead_lettered_as_an_id_conflict(
    iris_models: str, store: ResultStore, models: Models, redelivered: bool
) -> None:
    original = make_job(models.X[:1], id="order-17")
    impostor = make_job(models.X[5:6], id="order-17")
    process(processor(iris_models, store), batch(original))
    done = process(processor(iris_models, store), batch(impostor, redelivered=redelivered))
    assert done.outcomes == []
    assert [r.reason for r in done.rejections] == [ID_CONFLICT]
    assert store.get("order-17").job_sha256 == job_digest(original)  # the first result stays


def test_an_unreadable_stored_result_dead_letters_that_job_and_the_others_go_on(
    iris_models: str, store: ResultStore, models: Models, tmp_path: Path
) -> None:
    broken, fine = make_job(models.X[:1]), make_job(models.X[1:2])
    process(processor(iris_models, store), batch(broken))
    with sqlite3.connect(tmp_path / "results.db") as db:
        db.execute("UPDATE results SET result = '{\"id\": 1}' WHERE id = ?", (broken.id,))
    done = process(processor(iris_models, store), batch(broken, fine, redelivered=True))
    assert [r.reason for r in done.rejections] == [STORED_RESULT_UNREADABLE]
    assert [o.result.id for o in done.outcomes] == [fine.id]
    assert store.get(fine.id).status is Status.SUCCEEDED


def test_jobs_of_a_model_whose_store_is_unreachable_are_held_and_other_models_run(
    iris_models: str, store: ResultStore, models: Models, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a model store nobody answers on (a closed port)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    unreachable = processor(f"s3://nowhere-{uuid.uuid4().hex[:6]}/models", store)
    job = make_job(models.X[:1])
    done = unreachable.process([batch(job)], [])  # does not wait for the store
    # Then the job is held (to be tried again), neither failed nor run
    assert [p.job.id for p in done.held] == [job.id]
    assert done.outcomes == [] and done.rejections == []


def test_the_job_digest_is_the_one_results_were_stored_with() -> None:
    # Stored results carry this digest: if it changed, every redelivery of a job stored before the change
    # would be dead-lettered as an id conflict. These values were computed when the format was set.
    with_parameters = Job(
        id="job-1",
        model="iris",
        version=2,
        inputs=[Tensor(name="x", shape=[1, 3], datatype=Datatype.FP32, data=[0.5, 1, 2.25])],
        parameters={"b": 1, "a": [1, 2]},
    )
    plain = Job(id="job-2", model="iris", inputs=[Tensor(name="x", shape=[2], datatype=Datatype.INT64, data=[1, 2])])
    assert job_digest(with_parameters) == "48ba23decce2463b2cc65f9f173e5d4184c5ba7e92e20fcb01b18efe851315cc"
    assert job_digest(plain) == "8d6fec7b05838111cd83ade55bf459b3ec58a4beea97252c4279aac63f72fea5"


class RefusingStore:
    """A SQLite result store that refuses (as PostgreSQL refuses a NUL in ``jsonb``) any write holding a
    result of the ``refused`` ids, without saying which, and whose reads may refuse the whole store."""

    def __init__(self, inner: ResultStore, refused: set[str], reads_refused: bool = False) -> None:
        self.inner = inner
        self.refused = refused
        self.reads_refused = reads_refused
        self.puts = 0

    def put_many(self, results: Sequence[Result]) -> list[Result]:
        self.puts += 1
        if any(r.id in self.refused and r.error is None for r in results):
            raise ValueRefused("write to test failed: UntranslatableCharacter: unsupported Unicode escape sequence")
        return self.inner.put_many(results)

    def get_many(self, job_ids: Sequence[str]) -> dict[str, Result]:
        if self.reads_refused:
            raise StoreRefused("read from test failed: InsufficientPrivilege: permission denied")
        return self.inner.get_many(job_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_results_the_store_refuses_fail_alone_and_the_rest_of_the_batch_is_stored(
    iris_models: str, store: ResultStore, models: Models
) -> None:
    # Given a batch of jobs two of whose results the store refuses (and does not say which)
    jobs = [make_job(models.X[i : i + 1]) for i in range(16)]
    refusing = RefusingStore(store, {jobs[3].id, jobs[11].id})
    # When it is processed
    done = process(processor(iris_models, cast(ResultStore, refusing)), batch(*jobs))
    # Then those two jobs get one failed result each, saying so, and the others their results
    by_id = {o.result.id: o for o in done.outcomes}
    assert sorted(by_id) == sorted(j.id for j in jobs) and all(o.counted for o in done.outcomes)
    for job in jobs:
        stored = store.get(job.id)
        assert stored == by_id[job.id].result and stored.job_sha256 == job_digest(job)
        if job.id in refusing.refused:
            assert stored.status is Status.FAILED and stored.error is not None
            assert stored.error.code is ErrorCode.RESULT_REFUSED and "UntranslatableCharacter" in stored.error.message
        else:
            assert stored.status is Status.SUCCEEDED
    assert refusing.puts <= 2 * 2 * 4 + 2 + 1  # bisected: about 2·log2(16) puts per refused result


def test_a_store_refusing_us_on_read_stops_the_processor_for_good(
    iris_models: str, store: ResultStore, models: Models
) -> None:
    refusing = RefusingStore(store, set(), reads_refused=True)
    proc = processor(iris_models, cast(ResultStore, refusing))
    with pytest.raises(StoreRefused):
        process(proc, batch(make_job(models.X[:1]), redelivered=True))
    assert proc.refused is not None
    with pytest.raises(StoreRefused):  # and no later unit touches the store
        proc.process([batch(make_job(models.X[:1]))], [])


def test_a_corrected_job_reusing_the_id_of_a_rejected_message_runs_and_replaces_the_rejection(
    iris_models: str, store: ResultStore, models: Models
) -> None:
    # Given the stored rejection of an undecodable message (its digest: of its raw bytes)
    error = ErrorInfo(code=ErrorCode.INVALID_PAYLOAD, message="field 'inputs' required")
    rejected = Result(
        id="order-9", model="iris", requested_version="latest", job_sha256="r" * 64, status=Status.FAILED,
        error=error, worker="host:1",
    )  # fmt: skip
    store.put_many([rejected])
    # When a corrected job with that id arrives (redelivered, so the store is looked at first)
    corrected = make_job(models.X[:1], id="order-9")
    done = process(processor(iris_models, store), batch(corrected, redelivered=True))
    # Then it runs and its own result replaces the rejection: no id conflict
    assert done.rejections == [] and len(done.runs) == 1
    assert store.get("order-9").status is Status.SUCCEEDED
    assert store.get("order-9").job_sha256 == job_digest(corrected)

"""A job rejected at decode gets a failed result that carries a digest of the message it rejects, so a
corrected job sent later under the same id is another job: it is never answered with the old rejection."""

from __future__ import annotations

import threading
from functools import partial
from pathlib import Path

import pytest
from support import Env, audit, delivery, dumps, job_dict, make_job

from inferq.model_store.registry import Registry
from inferq.model_store.stores import open_model_store
from inferq.shared.contract.codec import Rejected, decode_job, rejected_digest
from inferq.shared.contract.messages import Status, job_digest
from inferq.shared.errors import ErrorCode
from inferq.shared.results.stores import open_result_store
from inferq.worker.fetcher import ModelFetcher
from inferq.worker.processor import Processor
from inferq.worker.runner import Limits, LoadedModel, load_model

JOB_ID = "corrected-1"
BROKEN = job_dict(id=JOB_ID, inputs=[{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4]}])
ROWS = [[5.1, 3.5, 1.4, 0.2]]


def test_a_rejected_job_carries_a_digest_of_its_message_never_that_of_a_valid_job(tmp_path: Path) -> None:
    body = dumps(BROKEN)
    decoded = decode_job(body, JOB_ID, 1 << 20)
    assert isinstance(decoded, Rejected) and decoded.error.code is ErrorCode.INVALID_PAYLOAD
    assert decoded.body_sha256 == rejected_digest(body)
    registry: Registry[LoadedModel] = Registry(open_model_store(str(tmp_path)), partial(load_model), load_retry_s=0)
    store = open_result_store(f"sqlite:{tmp_path / 'results.db'}")
    processor = Processor(ModelFetcher(registry), store, Limits(65536, 4_000_000), "test:1", threading.Event(), 1.0)

    result = processor.failed(delivery(), decoded, decoded.error).result

    assert result.job_sha256 == rejected_digest(body)
    assert result.job_sha256 != job_digest(make_job(ROWS, id=JOB_ID))
    # The same broken message again is the same rejected job; another broken one is another
    again = decode_job(body, JOB_ID, 1 << 20)
    assert isinstance(again, Rejected) and again.body_sha256 == decoded.body_sha256
    other = decode_job(dumps({**BROKEN, "model": "other"}), JOB_ID, 1 << 20)
    assert isinstance(other, Rejected) and other.body_sha256 != decoded.body_sha256


@pytest.mark.broker
def test_a_corrected_job_under_the_id_of_a_rejected_one_is_not_answered_with_the_rejection(iris_store: Env) -> None:
    # Given a job rejected at decode, answered with a failed result
    iris_store.publish_raw(dumps(BROKEN), message_id=JOB_ID)
    iris_store.drain()
    [rejection] = iris_store.results_on_queue()  # (read off the results queue)
    assert rejection.status is Status.FAILED and rejection.error is not None
    assert rejection.error.code is ErrorCode.INVALID_PAYLOAD and rejection.job_sha256 == rejected_digest(dumps(BROKEN))

    # When the sender corrects it and sends it again under the same id
    corrected = make_job(ROWS, id=JOB_ID)
    assert iris_store.submit([corrected]) == [JOB_ID]
    iris_store.drain()

    # Then it is not answered with the old rejection: it gets its own result, stored and published (the
    # audit checks that every result of the id, in the store and on the results queue, answers this job)
    report = audit(iris_store, {JOB_ID: corrected})
    assert report.stored == 1 and report.on_result_queue == 1 and report.dead_lettered == 0
    assert iris_store.stored()[JOB_ID].status is Status.SUCCEEDED

"""``Producer.request`` never returns a result that answers another job stored under the same id: from
the reply, or from the result store it falls back to, it raises :class:`IdConflict` instead."""

from __future__ import annotations

import pytest
from id_conflicts import audit_id_conflict
from support import BackgroundWorker, Env, make_job

from inferq.producer.client import Producer
from inferq.shared.contract.messages import Result, Status, job_digest
from inferq.shared.errors import IdConflict
from inferq.shared.results.stores import open_result_store

pytestmark = pytest.mark.broker


def test_a_request_under_an_id_taken_by_another_job_raises_id_conflict(iris_store: Env) -> None:
    env = iris_store
    # Given a job that finished under an id, and jobs of their own
    theirs = make_job([[6.3, 3.3, 6.0, 2.5]], id="taken")
    others = [make_job([[5.0 + i / 10, 3.0, 1.5, 0.2]]) for i in range(20)]
    env.submit([theirs, *others])
    assert env.drain().succeeded == 21
    ours = make_job([[5.1, 3.5, 1.4, 0.2]], version=2, id="taken")

    # When another job is requested under that id, with a worker running
    with BackgroundWorker(env.worker_settings()), Producer(env.producer_settings()) as producer:
        with pytest.raises(IdConflict) as raised:
            producer.request(ours, timeout_s=5)
        # And a job with an id of its own still gets its own result
        mine = make_job([[5.7, 2.8, 4.1, 1.3]])
        assert producer.request(mine, timeout_s=30).job_sha256 == job_digest(mine)

    # Then the error says so in one line, and the other job's result is untouched
    assert "taken" in str(raised.value) and "\n" not in str(raised.value)
    audit_id_conflict(env, theirs, ours, {j.id: j for j in [*others, mine]})


def test_a_reply_that_cannot_be_shown_to_answer_the_job_raises_id_conflict(iris_store: Env) -> None:
    env = iris_store
    # Given a result stored under an id by an earlier release (no job digest), for other work
    legacy = Result(
        id="legacy",
        model="iris",
        requested_version="latest",
        status=Status.SUCCEEDED,
        outputs=[],
        worker="old-release",
    )
    store = open_result_store(env.result_store_at)
    try:
        store.put_many([legacy])
    finally:
        close = getattr(store, "close", None)
        if callable(close):
            close()
    # When a job is requested under that id: the worker answers with the stored result
    with (
        BackgroundWorker(env.worker_settings()),
        Producer(env.producer_settings()) as producer,
        pytest.raises(IdConflict),
    ):
        producer.request(make_job([[5.1, 3.5, 1.4, 0.2]], id="legacy"), timeout_s=30)
    # Then nothing was stored over it, and nothing is left queued
    assert env.stored()["legacy"] == legacy
    assert env.depth(env.jobs_queue) == 0 and env.depth(f"{env.jobs_queue}.retry") == 0

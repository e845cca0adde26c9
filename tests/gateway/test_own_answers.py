"""An operation answers only for the job the API admitted under its id: never with a result stored under
that id for another job (sent with ``inferq submit`` or the producer), and never "queued" for a job that
was dead-lettered. Each test runs its own ``inferq serve`` on its own queues, and a real worker."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pika
import pytest
from gateway_support import ASYNC, GatewayProcess, oip_request
from id_conflicts import audit_id_conflict
from support import Env, audit, make_job, wait_for

from inferq.shared.contract.messages import Job

pytestmark = pytest.mark.broker

OUTSIDE_JOBS = 1800
CLI_JOBS = 200
POOL = 16


def _jsonl(path: Path, jobs: list[Job]) -> Path:
    path.write_text("".join(job.model_dump_json(exclude_none=True) + "\n" for job in jobs))
    return path


def test_ids_first_used_outside_the_api_are_never_its_operations(iris_store: Env) -> None:
    env = iris_store
    rng = np.random.default_rng(7)
    # Given 2,000 jobs sent without the API: by the producer and by `inferq submit`, all finished
    jobs = [make_job(rng.uniform(0, 8, (1, 4)), id=f"outside-{i}") for i in range(OUTSIDE_JOBS + CLI_JOBS)]
    assert len(env.submit(jobs[:OUTSIDE_JOBS])) == OUTSIDE_JOBS
    submitted = env.inferq("submit", str(_jsonl(env.tmp / "jobs.jsonl", jobs[OUTSIDE_JOBS:])))
    assert submitted.returncode == 0, submitted.stderr
    assert env.drain().succeeded == len(jobs)

    with GatewayProcess(env, env.tmp) as gateway, gateway.client() as http:

        def ask(index: int) -> tuple[int, str, int, str]:
            job_id = jobs[index].id
            looked = http.get(f"/v2/operations/{job_id}")
            headers = {"Prefer": "wait=5"} if index % 10 == 0 else {}
            body = oip_request([[7.0, 3.0, 6.0, 2.0]], id=job_id)  # another body under that id
            sent = http.post("/v2/models/iris/versions/2/infer", json=body, headers=headers)
            return looked.status_code, looked.json().get("code", ""), sent.status_code, sent.json().get("code", "")

        # When the API is asked for each id, and given another body under each
        with ThreadPoolExecutor(POOL) as pool:
            answers = list(pool.map(ask, range(len(jobs))))

    # Then it never accepted those ids (404) and refuses to take them over (409 id_conflict)
    wrong = [(jobs[i].id, a) for i, a in enumerate(answers) if a != (404, "not_found", 409, "id_conflict")]
    assert not wrong, f"{len(wrong)} of {len(jobs)} answered wrongly, e.g. {wrong[:3]}"
    env.drain()
    audit(env, {job.id: job for job in jobs})


def test_an_admitted_job_whose_id_got_another_jobs_result_is_a_conflict_never_its_outputs(iris_store: Env) -> None:
    env = iris_store
    # Given a job sent with `inferq submit` under an id, not yet run
    theirs = make_job([[6.3, 3.3, 6.0, 2.5]], version="champion", id=f"shared-{uuid.uuid4().hex}")
    assert env.inferq("submit", str(_jsonl(env.tmp / "theirs.jsonl", [theirs]))).returncode == 0
    with GatewayProcess(env, env.tmp) as gateway, gateway.client() as http:
        # And the API admitting another job under the same id (no result is stored yet), and jobs of its own
        body = oip_request([[5.1, 3.5, 1.4, 0.2]], id=theirs.id)
        assert http.post("/v2/models/iris/versions/2/infer", json=body, headers=ASYNC).status_code == 202
        own = {f"own-{i}": oip_request([[5.0 + i / 10, 3.0, 1.5, 0.2]], id=f"own-{i}") for i in range(20)}
        for request in own.values():
            assert http.post("/v2/models/iris/infer", json=request, headers=ASYNC).status_code == 202

        # When a worker runs them in order: the first job's result is stored under the id, the API's job is
        # refused
        env.drain(max_batch_rows=1)

        # Then the API answers its operation as a conflict, without the other job's outputs
        looked = http.get(f"/v2/operations/{theirs.id}")
        assert looked.status_code == 200, looked.text
        operation = looked.json()
        assert operation["status"] == "failed" and operation["error"]["code"] == "id_conflict", operation
        assert "result" not in operation and operation["model_version"] == "2"
        for headers in ({}, {"Prefer": "wait=5"}):
            again = http.post("/v2/models/iris/versions/2/infer", json=body, headers=headers)
            assert again.status_code == 409 and again.json()["code"] == "id_conflict", again.text
        # And its own jobs are answered with their own results
        for job_id in own:
            assert http.get(f"/v2/operations/{job_id}").json()["status"] == "succeeded"

    ours = _as_job(body, "iris", 2)
    audit_id_conflict(env, theirs, ours, {i: _as_job(r, "iris", "latest") for i, r in own.items()})


def _as_job(request: dict, model: str, version: int | str) -> Job:
    """The job the API publishes for ``request``."""
    return Job(id=request["id"], model=model, version=version, inputs=request["inputs"])


def _return_until_dead_lettered(env: Env, job_id: str, timeout_s: float = 30) -> None:
    """Act as a worker that crashes on the job: take it and hand it back until the broker dead-letters it
    (its delivery limit)."""
    connection = pika.BlockingConnection(pika.URLParameters(env.amqp_url))
    try:
        channel = connection.channel()

        def dead() -> bool:
            method, props, _body = channel.basic_get(env.jobs_queue)
            if method is not None:
                assert props.message_id == job_id
                channel.basic_nack(method.delivery_tag, requeue=True)
            return channel.queue_declare(f"{env.jobs_queue}.dlq", passive=True).method.message_count == 1

        wait_for(dead, timeout_s)
    finally:
        connection.close()


def test_a_job_dead_lettered_by_the_broker_is_reported_failed_by_every_replica_and_to_a_waiting_caller(
    iris_store: Env,
) -> None:
    env = iris_store
    limit = {"INFERQ_MAX_DELIVERIES": "2"}
    with (
        GatewayProcess(env, env.tmp, **limit) as first,
        GatewayProcess(env, env.tmp, **limit) as second,
        first.client() as a,
        second.client() as b,
    ):
        # Given a job admitted by one replica, its caller waiting for the result
        poison = oip_request([[5.9, 3.0, 5.1, 1.8]], id=f"poison-{uuid.uuid4().hex}")
        waited: dict[str, httpx.Response] = {}
        caller = threading.Thread(
            target=lambda: waited.update(r=a.post("/v2/models/iris/infer", json=poison, headers={"Prefer": "wait=40"}))
        )
        caller.start()
        wait_for(lambda: env.depth(env.jobs_queue) == 1)

        # When every worker that takes it dies on it, until the broker dead-letters it
        _return_until_dead_lettered(env, poison["id"])
        caller.join(timeout=60)

        # Then the waiting caller is answered the job's error (500: the server's fault, not the caller's)
        assert waited["r"].status_code == 500, waited["r"].text
        assert waited["r"].json()["code"] == "dead_lettered" and "delivery_limit" in waited["r"].json()["error"]
        # And both replicas answer its operation: failed, dead_lettered, with the reason
        for response in (a.get(f"/v2/operations/{poison['id']}"), b.get(f"/v2/operations/{poison['id']}")):
            assert response.status_code == 200, response.text
            operation = response.json()
            assert operation["status"] == "failed" and operation["error"]["code"] == "dead_lettered", operation
            assert "delivery_limit" in operation["error"]["message"]
        # And jobs admitted after it run as usual
        own = {f"after-{i}": oip_request([[5.0 + i / 10, 3.0, 1.5, 0.2]], id=f"after-{i}") for i in range(20)}
        for request in own.values():
            assert b.post("/v2/models/iris/infer", json=request, headers=ASYNC).status_code == 202
        env.drain(max_deliveries=2)
        assert all(a.get(f"/v2/operations/{i}").json()["status"] == "succeeded" for i in own)

    jobs = {i: _as_job(r, "iris", "latest") for i, r in {**own, poison["id"]: poison}.items()}
    audit(env, jobs, dead=frozenset({poison["id"]}))

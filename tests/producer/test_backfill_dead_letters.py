"""``backfill --out`` never waits forever, through the real command, broker and worker: a job the worker
dead-letters, one the broker dead-letters after its delivery limit and one that vanished from the queue are
written with an error code saying so, the command says how many and where to look, and exits 1; a rerun
finds the dead letters in the dead-letter queue and publishes them not again."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pika
import pytest
from support import Env, Models, audit, wait_for

from inferq.model_store.base import read_table
from inferq.shared.contract.messages import ErrorInfo, Job, Result, Status, job_digest
from inferq.shared.errors import ErrorCode
from inferq.shared.results.stores import open_result_store

pytestmark = pytest.mark.broker

ROWS = 200
CONFLICT, POISON, VANISHED = "row-0000", "row-0001", "row-0002"


@pytest.fixture
def sqlite_env(iris_store: Env) -> Env:
    iris_store.result_location = f"sqlite:{iris_store.tmp / 'results.db'}"
    return iris_store


def _rows(path: Path, models: Models) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["key", "a", "b", "c", "d"])
        writer.writerows([f"row-{i:04d}", *map(float, models.X[i % 150])] for i in range(ROWS))
    return path


def _jobs(env: Env, models: Models) -> dict[str, Job]:
    """Each row's job as the backfill derives it (documented: ``<model>:<version>:<row id>:<16 hex of its
    job digest>``), by row id."""
    jobs = {}
    for i in range(ROWS):
        values = [float(v) for v in models.X[i % 150]]
        inputs = read_table(env.store, "iris", 2).tensors([tuple(values)])
        unnamed = Job.model_construct(id="", model="iris", version=2, inputs=inputs, parameters={})
        key = f"row-{i:04d}"
        jobs[key] = Job(id=f"iris:2:{key}:{job_digest(unnamed)[:16]}", model="iris", version=2, inputs=inputs)
    return jobs


def _store_a_foreign_result(env: Env, job_id: str) -> None:
    """A result of another job under ``job_id``: the worker dead-letters the backfill's job as an id conflict."""
    store = open_result_store(env.result_store_at)
    try:
        foreign = Result(
            id=job_id,
            model="iris",
            requested_version=2,
            job_sha256="0" * 64,
            status=Status.FAILED,
            error=ErrorInfo(code=ErrorCode.INFERENCE_ERROR, message="another job"),
            worker="elsewhere",
        )
        store.put_many([foreign])
    finally:
        store.close()


def _poison_and_vanish(env: Env) -> None:
    """Reject the POISON row's job until the broker dead-letters it (its delivery limit), and take the
    VANISHED row's job off the queue for good; every other job goes back untouched."""
    connection = pika.BlockingConnection(pika.URLParameters(env.amqp_url))
    try:
        channel = connection.channel()
        vanished = False
        for _ in range(ROWS + 50):
            method, props, _body = channel.basic_get(env.jobs_queue, auto_ack=False)
            assert method is not None, "the poison job never reached its delivery limit"
            row = (props.message_id or "").split(":")[2]
            if row == POISON:
                channel.basic_reject(method.delivery_tag, requeue=True)
            elif row == VANISHED:
                channel.basic_ack(method.delivery_tag)
                vanished = True
            if vanished and env.depth(f"{env.jobs_queue}.dlq") == 1:
                return
    finally:
        connection.close()  # the jobs held unacked go back


def _backfill(env: Env, data: Path, out: Path) -> subprocess.Popen[str]:
    command = [
        sys.executable,
        "-m",
        "inferq",
        "backfill",
        str(data),
        "--model",
        "iris",
        "--id-column",
        "key",
        "--batch-rows",
        "1",
    ]
    # The workers here stop within 2 s: a job counts as vanished once the queues were quiet for 2 + 5 s
    environ = env.environ(INFERQ_SHUTDOWN_GRACE_S="2")
    return subprocess.Popen(
        [*command, "--out", str(out)], env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(process: subprocess.Popen[str]) -> tuple[str, str]:
    try:
        return process.communicate(timeout=150)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def _table(out: Path) -> dict[str, dict[str, str]]:
    with out.open() as handle:
        return {row["key"]: row for row in csv.DictReader(handle)}


def test_jobs_dead_lettered_or_vanished_end_the_wait_with_their_rows_marked_and_exit_1(
    sqlite_env: Env, models: Models
) -> None:
    # Given 200 rows, one whose job id already holds another job's result
    data, out = _rows(sqlite_env.tmp / "rows.csv", models), sqlite_env.tmp / "out.csv"
    jobs = _jobs(sqlite_env, models)
    _store_a_foreign_result(sqlite_env, jobs[CONFLICT].id)
    running = _backfill(sqlite_env, data, out)
    wait_for(lambda: sqlite_env.depth(sqlite_env.jobs_queue) == ROWS, timeout_s=60)
    # When one job reaches its delivery limit, one vanishes from the queue, and a worker runs the rest
    _poison_and_vanish(sqlite_env)
    counters = sqlite_env.drain()
    stdout, stderr = _finish(running)

    # Then the wait ends: every row is written, the three without a result saying why, and it exits 1
    assert running.returncode == 1, stderr
    assert counters.dead_lettered == 1 and counters.succeeded == ROWS - 3
    assert f"wrote {ROWS} rows to {out}" in stdout
    assert stderr.strip().splitlines()[-1] == (
        f"inferq: 3 of {ROWS} rows have no result (2 dead-lettered, 1 vanished): see their error_code in {out}, "
        "and inferq dlq list"
    )
    table = _table(out)
    assert list(table) == [f"row-{i:04d}" for i in range(ROWS)]
    assert (table[CONFLICT]["error_code"], table[CONFLICT]["error_detail"]) == ("dead_lettered", "id_conflict")
    assert (table[POISON]["error_code"], table[POISON]["error_detail"]) == ("dead_lettered", "delivery_limit")
    assert table[VANISHED]["error_code"] == "no_result" and table[VANISHED]["label"] == ""
    assert all(row["error_code"] == "" and row["label"] != "" for key, row in table.items() if key.endswith("9"))

    # When it runs again: the dead letters are found in the dead-letter queue and not published again;
    # the vanished job is, and a worker scores it
    again = _backfill(sqlite_env, data, out)
    wait_for(lambda: sqlite_env.depth(sqlite_env.jobs_queue) == 1 or again.poll() is not None, timeout_s=60)
    assert sqlite_env.drain().received == 1
    stdout, stderr = _finish(again)
    assert again.returncode == 1, stderr
    assert f"published 1 jobs (1 rows) on iris version 2, skipped {ROWS - 3} already finished and 2 dead-lettered" in (
        stdout
    )
    assert "inferq: 2 of 200 rows have no result (2 dead-lettered, 0 vanished)" in stderr
    table = _table(out)
    assert (table[POISON]["error_code"], table[POISON]["error_detail"]) == ("dead_lettered", "delivery_limit")
    assert table[VANISHED]["error_code"] == "" and table[VANISHED]["label"] != ""
    # And each job has one result of its own or one dead letter (the conflicting id keeps the foreign result)
    dead = frozenset({jobs[CONFLICT].id, jobs[POISON].id})
    audit(sqlite_env, {job.id: job for key, job in jobs.items() if key != CONFLICT}, dead=dead)

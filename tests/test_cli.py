"""The ``inferq`` command as a user runs it: output, exit codes, one-line errors, nothing lost."""

from __future__ import annotations

import csv
import uuid

import orjson
import pytest
from support import BackgroundWorker, Env, Models, dumps, job_dict

from inferq.shared.contract.messages import Status

pytestmark = pytest.mark.broker


def test_results_get_prints_a_stored_result(iris_store: Env) -> None:
    iris_store.publish_raw(dumps(job_dict(id="shown")))
    iris_store.drain()
    done = iris_store.inferq("results", "get", "shown")
    assert done.returncode == 0
    assert orjson.loads(done.stdout)["status"] == "succeeded"


def test_results_get_of_an_unknown_id_exits_1_with_one_line(env: Env) -> None:
    done = env.inferq("results", "get", "never-submitted")
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith("inferq: error: no result for job 'never-submitted'")
    assert done.stderr.count("\n") == 1


def test_results_get_of_a_corrupt_stored_result_is_one_line_not_a_traceback(env: Env) -> None:
    env.result_dir.mkdir(parents=True)
    (env.result_dir / "mangled.json").write_bytes(b'{"id": "mangled", "status": "succ')
    done = env.inferq("results", "get", "mangled")
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith("inferq: error: the stored result of job 'mangled' is unreadable: ")
    assert done.stderr.count("\n") == 1


def test_submit_prints_each_id_once_the_broker_confirmed_it(iris_store: Env) -> None:
    lines = [dumps(job_dict(id=f"sub-{i}")).decode() for i in range(5)]
    lines.append(dumps({k: v for k, v in job_dict().items() if k != "id"}).decode())  # the id is generated
    done = iris_store.inferq("submit", "-", stdin="\n".join(lines) + "\n")
    assert done.returncode == 0, done.stderr
    ids = done.stdout.split()
    assert ids[:5] == [f"sub-{i}" for i in range(5)] and len(ids) == 6
    uuid.UUID(ids[5])
    assert iris_store.depth(iris_store.jobs_queue) == 6


def test_submit_stops_at_a_bad_line_having_printed_exactly_the_safe_ids(iris_store: Env) -> None:
    lines = [dumps(job_dict(id="ok-1")).decode(), dumps(job_dict(id="ok-2")).decode(), '{"id": "broken"']
    done = iris_store.inferq("submit", "-", stdin="\n".join(lines))
    assert done.returncode == 1
    assert done.stdout.split() == ["ok-1", "ok-2"]
    assert done.stderr.startswith("inferq: error: <stdin>:3: not JSON")
    assert iris_store.depth(iris_store.jobs_queue) == 2


def test_submit_wait_prints_the_result(iris_store: Env) -> None:
    with BackgroundWorker(iris_store.worker_settings()):
        done = iris_store.inferq(
            "submit", "--model", "iris", "--version", "champion", "--input", "[[5.1, 3.5, 1.4, 0.2]]", "--wait"
        )
    assert done.returncode == 0, done.stderr
    result = orjson.loads(done.stdout)
    assert result["status"] == "succeeded" and result["version"] == 1


def test_submit_to_an_unreachable_broker_fails_in_one_line_without_the_password(env: Env) -> None:
    done = env.inferq(
        "submit",
        "-",
        stdin=dumps(job_dict()).decode(),
        INFERQ_AMQP_URL="amqp://guest:s3cret-pw@127.0.0.1:1/%2F",
        INFERQ_CONNECT_TIMEOUT_S="1",
    )
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1].startswith("inferq: error: cannot reach the broker at amqp://guest:***@")
    assert "s3cret-pw" not in done.stderr + done.stdout


def test_a_worker_with_bad_configuration_fails_at_start_in_one_line(env: Env) -> None:
    done = env.inferq("worker", "--drain", INFERQ_MAX_BATCH_ROWS="0", INFERQ_AMQP_URL="http://x")
    assert done.returncode == 2
    assert done.stderr.startswith("inferq: error: bad configuration: ")
    assert "INFERQ_AMQP_URL" in done.stderr and "INFERQ_MAX_BATCH_ROWS" in done.stderr
    assert done.stderr.count("\n") == 1


def test_backfill_publishes_every_row_and_a_rerun_publishes_nothing_new(iris_store: Env, models: Models) -> None:
    data = iris_store.tmp / "rows.csv"
    with data.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["a", "b", "c", "d"])
        writer.writerows(models.X[:45].tolist())

    first = iris_store.inferq("backfill", str(data), "--model", "iris", "--batch-rows", "2")
    assert first.returncode == 0, first.stderr
    assert "published 23 jobs (45 rows) on iris version 2, skipped 0" in first.stdout
    assert iris_store.depth(iris_store.jobs_queue) == 23
    iris_store.drain()
    assert len(iris_store.stored()) == 23

    again = iris_store.inferq("backfill", str(data), "--model", "iris", "--batch-rows", "2")
    assert again.returncode == 0, again.stderr
    assert "published 0 jobs (0 rows) on iris version 2, skipped 23" in again.stdout
    assert iris_store.depth(iris_store.jobs_queue) == 0


def test_backfill_with_an_id_column_uses_those_ids(iris_store: Env, models: Models) -> None:
    data = iris_store.tmp / "rows.jsonl"
    lines = [dumps({"key": f"row-{i}", "f": row}).decode() for i, row in enumerate(models.X[:3].tolist())]
    data.write_text("\n".join(lines))
    flattened = iris_store.tmp / "flat.jsonl"
    flattened.write_text(
        "\n".join(
            dumps({"key": f"row-{i}", **{f"x{j}": v for j, v in enumerate(row)}}).decode()
            for i, row in enumerate(models.X[:3].tolist())
        )
    )
    nested = iris_store.inferq("backfill", str(data), "--model", "iris", "--id-column", "key")
    assert nested.returncode == 1 and f"{data}:1: 1 value, model 'iris' version 2 takes 4" in nested.stderr
    done = iris_store.inferq("backfill", str(flattened), "--model", "iris", "--id-column", "key", "--batch-rows", "1")
    assert done.returncode == 0, done.stderr
    iris_store.drain()
    assert {k.rsplit(":", 1)[0]: r.status for k, r in iris_store.stored().items()} == {
        f"iris:2:row-{i}": Status.SUCCEEDED for i in range(3)
    }  # <model>:<version>:<row id>:<job digest, 16 hex>


def test_backfill_names_the_line_of_a_bad_row(iris_store: Env) -> None:
    data = iris_store.tmp / "bad.csv"
    data.write_text("a,b,c,d\n1,2,3,4\n1,2,three,4\n")
    done = iris_store.inferq("backfill", str(data), "--model", "iris")
    assert done.returncode == 1
    assert f"{data}:3: column 3: 'three' is not a number" in done.stderr
    assert iris_store.depth(iris_store.jobs_queue) == 0


def test_backfill_of_rows_of_the_wrong_width_is_refused(iris_store: Env) -> None:
    data = iris_store.tmp / "narrow.csv"
    data.write_text("a,b,c\n1,2,3\n")
    done = iris_store.inferq("backfill", str(data), "--model", "iris")
    assert done.returncode == 1 and f"{data}:2: 3 values, model 'iris' version 2 takes 4" in done.stderr


def test_worker_logs_never_show_the_amqp_password(iris_store: Env) -> None:
    iris_store.publish_raw(dumps(job_dict(id="logged")))
    done = iris_store.inferq(
        "worker", "--drain", INFERQ_AMQP_URL="amqp://guest:guest@127.0.0.1:5672/%2F", INFERQ_LOG_LEVEL="debug"
    )
    assert done.returncode == 0, done.stderr
    events = [orjson.loads(line) for line in done.stderr.splitlines()]
    assert any(e.get("url") == "amqp://guest:***@127.0.0.1:5672/%2F" for e in events)
    assert ":guest@" not in done.stderr


def test_queues_declared_with_other_arguments_stop_the_worker_with_one_line(iris_store: Env) -> None:
    iris_store.publish_raw(dumps(job_dict()))  # declares the queues with the default delivery limit (5)
    done = iris_store.inferq("worker", "--drain", INFERQ_MAX_DELIVERIES="3", INFERQ_LOG_LEVEL="debug")
    assert done.returncode == 2
    last = done.stderr.splitlines()[-1]
    assert last.startswith(f"inferq: error: queue '{iris_store.jobs_queue}' exists with another x-delivery-limit")
    assert "INFERQ_MAX_DELIVERIES" in last
    assert done.stderr.count("broker_connecting") == 1, "a configuration error is not retried"
    assert iris_store.depth(iris_store.jobs_queue) == 1


def test_queues_declared_with_other_arguments_fail_the_producer_with_one_line(iris_store: Env) -> None:
    iris_store.publish_raw(dumps(job_dict()))
    done = iris_store.inferq("submit", "-", stdin=dumps(job_dict()).decode(), INFERQ_MAX_QUEUE_LENGTH="10")
    assert done.returncode == 2
    last = done.stderr.splitlines()[-1]
    assert last.startswith(f"inferq: error: queue '{iris_store.jobs_queue}' exists with another x-max-length")
    assert done.stdout == ""

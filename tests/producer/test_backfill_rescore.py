"""Scoring a file again with the same ids and new values, through the real command, broker and worker: every
changed row is scored again, every unchanged one skipped, and ``--out`` holds the new file's predictions."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from support import Env, Models, audit, wait_for

from inferq.model_store.base import read_table
from inferq.shared.contract.messages import Job

pytestmark = pytest.mark.broker

ROWS = 3000


@pytest.fixture
def sqlite_env(iris_store: Env) -> Env:
    iris_store.result_location = f"sqlite:{iris_store.tmp / 'results.db'}"
    return iris_store


def _month(models: Models, changed: bool) -> np.ndarray:
    """ROWS rows of iris measurements; ``changed``: every even row measured again (its first value + 0.5)."""
    values = np.array([models.X[i % 150] for i in range(ROWS)], dtype=np.float32)
    if changed:
        values[::2, 0] += np.float32(0.5)
    return values


def _write(path: Path, values: np.ndarray) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["customer_id", "a", "b", "c", "d"])
        writer.writerows([f"C-{i:05d}", *map(float, row)] for i, row in enumerate(values))
    return path


def _backfill(env: Env, data: Path, out: Path, publishes: int) -> tuple[subprocess.CompletedProcess[str], int]:
    """``backfill --out`` in the background; once ``publishes`` jobs are queued (or it ended), a draining
    worker. Returns its outcome and the jobs the worker received."""
    args = [
        sys.executable,
        "-m",
        "inferq",
        "backfill",
        str(data),
        "--model",
        "iris",
        "--id-column",
        "customer_id",
        "--batch-rows",
        "1",
    ]
    process = subprocess.Popen(
        [*args, "--out", str(out)], env=env.environ(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for(lambda: process.poll() is not None or env.depth(env.jobs_queue) >= publishes, timeout_s=120)
        received = env.drain().received if publishes else 0
        stdout, stderr = process.communicate(timeout=120)
        return subprocess.CompletedProcess(args, process.returncode, stdout, stderr), received
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def _predictions(models: Models, values: np.ndarray) -> list[int]:
    """Labels computed directly by onnxruntime on ``values`` (the latest iris version: the logistic model)."""
    session = ort.InferenceSession(models.logistic_onnx, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return [int(label) for label in session.run(None, {name: values})[0]]


def _jobs(env: Env, data: Path) -> dict[str, Job]:
    """The jobs a backfill of ``data`` publishes, derived the way the command derives them."""
    from inferq.producer.backfill import planned_jobs  # noqa: PLC0415
    from inferq.shared.tables.columnar import read_blocks  # noqa: PLC0415

    table = read_table(env.store, "iris", 2)
    jobs = [Job.model_validate_json(p.body) for p in planned_jobs(read_blocks(data, table, "customer_id"), table, 1)]
    return {job.id: job for job in jobs}


def test_rescoring_with_the_same_ids_scores_the_changed_rows_again_and_writes_the_new_predictions(
    sqlite_env: Env, models: Models
) -> None:
    # Given January scored, 3,000 customers
    jan_values, feb_values = _month(models, changed=False), _month(models, changed=True)
    jan, feb = _write(sqlite_env.tmp / "jan.csv", jan_values), _write(sqlite_env.tmp / "feb.csv", feb_values)
    jan_out, feb_out = sqlite_env.tmp / "jan_out.csv", sqlite_env.tmp / "feb_out.csv"
    first, received = _backfill(sqlite_env, jan, jan_out, ROWS)
    assert first.returncode == 0 and received == ROWS, first.stderr
    assert "published 3000 jobs (3000 rows)" in first.stdout

    # When February comes, the same customers, half of them measured again
    second, received = _backfill(sqlite_env, feb, feb_out, ROWS // 2)

    # Then the 1,500 changed rows are published and scored (once each), the 1,500 unchanged ones skipped
    assert second.returncode == 0, second.stderr
    assert "published 1500 jobs (1500 rows) on iris version 2, skipped 1500 already finished" in second.stdout
    assert received == ROWS // 2
    # And the file holds February's predictions, under the id column as given
    with feb_out.open() as handle:
        table = list(csv.DictReader(handle))
    assert next(iter(table[0])) == "customer_id"
    assert [row["customer_id"] for row in table] == [f"C-{i:05d}" for i in range(ROWS)]
    assert [int(row["label"]) for row in table] == _predictions(models, feb_values)
    assert [int(row["label"]) for row in table] != _predictions(models, jan_values), "a change that changes nothing"
    # And a rerun of February publishes nothing and writes the same file
    feb_out.rename(sqlite_env.tmp / "feb_out_first.csv")
    third, received = _backfill(sqlite_env, feb, feb_out, 0)
    assert third.returncode == 0 and received == 0, third.stderr
    assert "published 0 jobs (0 rows) on iris version 2, skipped 3000 already finished" in third.stdout
    assert feb_out.read_bytes() == (sqlite_env.tmp / "feb_out_first.csv").read_bytes()
    # And every job of both months has exactly one result, its own
    jobs = {**_jobs(sqlite_env, jan), **_jobs(sqlite_env, feb)}
    assert len(jobs) == ROWS + ROWS // 2
    report = audit(sqlite_env, jobs)
    assert report.stored == len(jobs) and report.on_result_queue == len(jobs), "a job scored twice"

"""What a backfill rerun skips, and files refused before anything is published, through the real command."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from support import Env, Models, dumps, job_dict

from inferq.model_store.base import publish
from inferq.shared.contract.messages import Status

pytestmark = pytest.mark.broker


def _rows_csv(path: Path, models: Models, *, ids: bool = True) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "a", "b", "c", "d"] if ids else ["a", "b", "c", "d"])
        writer.writerows([f"r{i}", *row] if ids else row for i, row in enumerate(models.X[:6].tolist()))
    return path


def test_a_rerun_skips_finished_rows_and_another_model_or_version_runs_every_row(
    iris_store: Env, models: Models
) -> None:
    data = _rows_csv(iris_store.tmp / "rows.csv", models)
    publish(iris_store.store, "flower", models.logistic_onnx)

    def backfill(*args: str) -> str:
        done = iris_store.inferq("backfill", str(data), "--id-column", "id", "--batch-rows", "1", *args)
        assert done.returncode == 0, done.stderr
        iris_store.drain()
        return done.stdout.strip()

    assert backfill("--model", "iris", "--version", "champion") == (
        "published 6 jobs (6 rows) on iris version 1, skipped 0 already finished"
    )
    assert backfill("--model", "iris", "--version", "1").startswith(
        "published 0 jobs (0 rows) on iris version 1, skipped 6"
    )
    assert backfill("--model", "iris").startswith("published 6 jobs (6 rows) on iris version 2, skipped 0")
    publish(iris_store.store, "iris", models.forest_onnx)  # a new latest
    assert backfill("--model", "iris").startswith("published 6 jobs (6 rows) on iris version 3, skipped 0")
    assert backfill("--model", "flower").startswith("published 6 jobs (6 rows) on flower version 1, skipped 0")

    # Each id reads <model>:<version>:<row id>:<the first 16 hex digits of its job digest>
    stored = iris_store.stored()
    assert sorted(job_id.rsplit(":", 1)[0] for job_id in stored) == sorted(
        f"{m}:{v}:r{i}" for m, v in (("iris", 1), ("iris", 2), ("iris", 3), ("flower", 1)) for i in range(6)
    )
    assert all(r.status is Status.SUCCEEDED and r.id.startswith(f"{r.model}:{r.version}:") for r in stored.values())
    assert all(r.job_sha256 is not None and r.id.endswith(f":{r.job_sha256[:16]}") for r in stored.values())


def test_without_an_id_column_the_ids_still_depend_on_the_model_version(iris_store: Env, models: Models) -> None:
    data = _rows_csv(iris_store.tmp / "rows.csv", models, ids=False)

    def backfill(version: str) -> str:
        done = iris_store.inferq("backfill", str(data), "--model", "iris", "--version", version, "--batch-rows", "4")
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert backfill("1").startswith("published 2 jobs (6 rows) on iris version 1")
    iris_store.drain()
    assert backfill("1").startswith("published 0 jobs (0 rows) on iris version 1, skipped 2")
    assert backfill("2").startswith("published 2 jobs (6 rows) on iris version 2, skipped 0")


def test_one_id_on_two_rows_is_refused_naming_both_lines_before_anything_is_published(
    iris_store: Env, models: Models
) -> None:
    data = iris_store.tmp / "twice.csv"
    lines = _rows_csv(iris_store.tmp / "rows.csv", models).read_text().splitlines()
    data.write_text("\n".join([*lines, lines[2]]) + "\n")  # r1 again, on line 8

    done = iris_store.inferq("backfill", str(data), "--model", "iris", "--id-column", "id")

    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == f"inferq: error: {data}:8: id 'r1' is also the id of line 3\n"
    assert iris_store.depth(iris_store.jobs_queue) == 0


def test_a_file_that_is_not_utf8_is_one_line_naming_it(iris_store: Env) -> None:
    latin = "\u00e9t\u00e9".encode("latin-1")
    csv_file = iris_store.tmp / "latin.csv"
    csv_file.write_bytes(b"a,b,c,d\n1,2,3,4\n1,2,3," + latin + b"\n")

    jobs_file = iris_store.tmp / "jobs.jsonl"
    jobs_file.write_bytes(dumps(job_dict()) + b"\n" + dumps(job_dict(id="x")).replace(b'"x"', b'"' + latin + b'"'))

    # (JSONL rows share the reader of tests/shared/test_rowfile.py; one run of each command here.)
    runs = [
        (csv_file, 3, ["backfill", str(csv_file), "--model", "iris"]),
        (jobs_file, 2, ["submit", str(jobs_file)]),
    ]
    for path, line, args in runs:
        done = iris_store.inferq(*args)
        assert done.returncode == 1
        assert done.stderr == f"inferq: error: {path}:{line}: not UTF-8 text (save the file as UTF-8)\n"
    assert iris_store.depth(iris_store.jobs_queue) == 1  # submit sent its good line 1, as it reported

"""``inferq backfill --out`` end to end through the real broker and a real worker: it waits for every row,
writes them in input order with failures marked, a rerun only writes the file, and Ctrl-C leaves the
jobs queued with a way to resume. Also ``results export`` and ``results copy`` on the same results."""

from __future__ import annotations

import csv
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from support import Env, Models, hear_ctrl_c, wait_for

pytestmark = pytest.mark.broker


@pytest.fixture
def sqlite_env(iris_store: Env) -> Env:
    iris_store.result_location = f"sqlite:{iris_store.tmp / 'results.db'}"
    return iris_store


_running: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def no_backfill_outlives_its_test() -> Iterator[None]:
    """A failing test must not leave its backfill running, or its pipes open for a later test to find."""
    yield
    while _running:
        process = _running.pop()
        if process.poll() is None:
            process.kill()
        process.communicate()


def _backfill(env: Env, *args: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "inferq", "backfill", *args],
        # On SIGABRT (sent below to a backfill that outlived its Ctrl-C) every thread's stack goes to stderr.
        env={**env.environ(), "PYTHONFAULTHANDLER": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=hear_ctrl_c,  # noqa: PLW1509 (it only resets one signal disposition, no lock)
    )
    _running.append(process)
    return process


def _interrupt(process: subprocess.Popen[str], timeout_s: float = 30) -> str:
    """Ctrl-C, as a terminal sends it; its standard error once it exited."""
    process.send_signal(signal.SIGINT)
    try:
        return process.communicate(timeout=timeout_s)[1]
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)
        stderr = process.communicate()[1]
        raise AssertionError(f"still running {timeout_s:g}s after Ctrl-C; its threads:\n{stderr[-6000:]}") from None


def _write_csv(path: Path, models: Models, rows: int, *, ids: bool) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow((["key"] if ids else []) + ["a", "b", "c", "d"])
        for i in range(rows):
            writer.writerow(([f"row-{i:04d}"] if ids else []) + [float(v) for v in models.X[i % 150]])


def test_backfill_out_waits_for_every_row_and_writes_them_in_input_order(sqlite_env: Env, models: Models) -> None:
    # Given 600 rows with an id column, and no worker running yet
    data, out = sqlite_env.tmp / "rows.csv", sqlite_env.tmp / "predictions.csv"
    _write_csv(data, models, 600, ids=True)
    running = _backfill(
        sqlite_env, str(data), "--model", "iris", "--id-column", "key", "--batch-rows", "1", "--out", str(out)
    )
    # When it has published and a worker drains the queue
    wait_for(lambda: sqlite_env.depth(sqlite_env.jobs_queue) == 600, timeout_s=60)
    assert running.poll() is None, "it waits for the results"
    sqlite_env.drain()
    stdout, stderr = running.communicate(timeout=120)
    # Then the file has every row, in input order, with the forest's predictions
    assert running.returncode == 0, stderr
    assert f"wrote 600 rows to {out}" in stdout
    with out.open() as handle:
        table = list(csv.DictReader(handle))
    assert [row["key"] for row in table] == [f"row-{i:04d}" for i in range(600)]
    expected = models.logistic.predict(models.X)  # latest: version 2
    assert [int(row["label"]) for row in table] == [int(expected[i % 150]) for i in range(600)]
    assert all(row["error_code"] == "" for row in table)
    first = out.read_bytes()
    # And a rerun finds everything finished: it publishes nothing and only writes the file again
    out.unlink()
    again = sqlite_env.inferq(
        "backfill", str(data), "--model", "iris", "--id-column", "key", "--batch-rows", "1", "--out", str(out)
    )
    assert again.returncode == 0, again.stderr
    assert "published 0 jobs (0 rows) on iris version 2, skipped 600 already finished" in again.stdout
    assert out.read_bytes() == first
    assert sqlite_env.depth(sqlite_env.jobs_queue) == 0


def test_rows_whose_job_failed_get_the_error_code_and_empty_outputs(sqlite_env: Env, models: Models) -> None:
    # Given 7 rows in jobs of 3, 3 and 1 rows, and a worker that refuses jobs of more than 2 rows
    data, out = sqlite_env.tmp / "rows.jsonl", sqlite_env.tmp / "predictions.jsonl"
    data.write_bytes(b"".join(orjson.dumps([float(v) for v in models.X[i]]) + b"\n" for i in range(7)))
    running = _backfill(sqlite_env, str(data), "--model", "iris", "--batch-rows", "3", "--out", str(out))
    wait_for(lambda: sqlite_env.depth(sqlite_env.jobs_queue) == 3, timeout_s=60)
    counters = sqlite_env.drain(max_rows_per_job=2)
    _, stderr = running.communicate(timeout=120)
    assert running.returncode == 0, stderr
    assert counters.failed == 2 and counters.succeeded == 1
    # Then the six rows of the failed jobs carry its error code and no outputs; the last row its prediction
    lines = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert [line["line"] for line in lines] == [str(n) for n in range(1, 8)]
    assert [line["error_code"] for line in lines] == ["too_large"] * 6 + [None]
    assert all(set(line) == {"line", "error_code", "error_detail"} for line in lines[:6])
    assert "rows" in lines[0]["error_detail"] and lines[6]["error_detail"] is None
    assert lines[6]["label"] == int(models.logistic.predict(models.X[6:7])[0])


def test_ctrl_c_while_waiting_leaves_the_jobs_queued_and_says_how_to_resume(sqlite_env: Env, models: Models) -> None:
    data, out = sqlite_env.tmp / "rows.csv", sqlite_env.tmp / "predictions.csv"
    _write_csv(data, models, 50, ids=False)
    running = _backfill(sqlite_env, str(data), "--model", "iris", "--batch-rows", "1", "--out", str(out))
    wait_for(lambda: sqlite_env.depth(sqlite_env.jobs_queue) == 50, timeout_s=60)
    time.sleep(0.5)
    stderr = _interrupt(running)
    assert running.returncode == 130
    assert "0 of 50 rows finished; the jobs stay queued" in stderr and "Run the same command again" in stderr
    assert sqlite_env.depth(sqlite_env.jobs_queue) == 50
    assert not out.exists() and not list(sqlite_env.tmp.glob(".predictions.csv*"))
    # Resuming publishes nothing new and finishes once a worker has run
    sqlite_env.drain()
    again = sqlite_env.inferq("backfill", str(data), "--model", "iris", "--batch-rows", "1", "--out", str(out))
    assert again.returncode == 0 and "skipped 50 already finished" in again.stdout, again.stderr
    assert len(out.read_text().splitlines()) == 51


def test_results_export_and_copy(sqlite_env: Env, models: Models, tmp_path: Path) -> None:
    # Given 40 results in the SQLite store
    data = sqlite_env.tmp / "rows.csv"
    _write_csv(data, models, 40, ids=True)
    backfilled = sqlite_env.inferq("backfill", str(data), "--model", "iris", "--id-column", "key", "--batch-rows", "1")
    assert backfilled.returncode == 0, backfilled.stderr
    sqlite_env.drain()
    # When exported as CSV, by ids (one unknown; a backfill's job id is <model>:<version>:<row id>:<digest>)
    # and as JSON lines by model
    by_row = {result.id.split(":")[2]: result.id for result in sqlite_env.stored().values()}
    ids = tmp_path / "ids.txt"
    ids.write_text(f"{by_row['row-0003']}\nno-such-job\n{by_row['row-0001']}\n")
    by_ids = sqlite_env.inferq("results", "export", "--ids", str(ids))
    assert by_ids.returncode == 0, by_ids.stderr
    table = list(csv.DictReader(by_ids.stdout.splitlines()))
    assert [(r["id"], r["status"]) for r in table] == [
        (by_row["row-0003"], "succeeded"),
        ("no-such-job", "missing"),
        (by_row["row-0001"], "succeeded"),
    ]
    assert list(table[0])[:5] == ["id", "status", "version", "error_code", "label"]
    jsonl = tmp_path / "all.jsonl"
    by_model = sqlite_env.inferq("results", "export", "--model", "iris", "--out", str(jsonl))
    assert by_model.returncode == 0 and "exported 40 results" in by_model.stderr
    assert len(jsonl.read_bytes().splitlines()) == 40
    # And copied to a file store, twice: the second copy skips everything
    target = f"file://{tmp_path / 'copy'}"
    first = sqlite_env.inferq("results", "copy", sqlite_env.result_store_at, target)
    assert first.returncode == 0 and "copied 40 results, skipped 0" in first.stdout, first.stderr
    second = sqlite_env.inferq("results", "copy", sqlite_env.result_store_at, target)
    assert "copied 0 results, skipped 40" in second.stdout
    assert len(list((tmp_path / "copy").glob("*.json"))) == 40
    bad = sqlite_env.inferq("results", "copy", sqlite_env.result_store_at, "ftp://x")
    assert bad.returncode == 2 and bad.stderr.startswith("inferq: error: TARGET: unknown scheme 'ftp'")

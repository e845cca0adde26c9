"""Drift end to end: a model published with a reference, live jobs through the real broker and workers,
``inferq monitor drift`` reading what the workers wrote."""

from __future__ import annotations

import csv
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest
from sklearn.linear_model import LogisticRegression
from support import BackgroundWorker, Env, make_job, wait_for

from inferq.model_store.base import publish
from inferq.model_store.convert import estimator_to_onnx
from inferq.monitoring.reference import read_reference_data
from inferq.monitoring.store import open_monitor_store

pytestmark = pytest.mark.broker

FEATURES = 6
SHIFTED = 3
NAMES = [f"x{i}" for i in range(FEATURES)]


@pytest.fixture
def monitored(env: Env, tmp_path: Path) -> tuple[Env, np.random.Generator]:
    """Model ``risk`` (a logistic regression on six standard-normal features) and its training rows in
    ``train.csv``; results (and monitoring counts) in SQLite. Not published yet."""
    rng = np.random.default_rng(7)
    train = rng.standard_normal((4000, FEATURES))
    labels = (train[:, 0] + train[:, 1] > 0).astype(int)
    model = LogisticRegression().fit(train, labels)
    (tmp_path / "risk.onnx").write_bytes(estimator_to_onnx(model))
    with (tmp_path / "train.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(NAMES)
        writer.writerows(train.tolist())
    env.result_location = f"sqlite:{tmp_path}/results.db"
    return env, rng


def live_jobs(rng: np.random.Generator, jobs: int, rows_per_job: int) -> list:  # type: ignore[type-arg]
    made = []
    for _ in range(jobs):
        rows = rng.standard_normal((rows_per_job, FEATURES))
        rows[:, SHIFTED] += 3.0  # three standard deviations
        made.append(make_job(rows, model="risk"))
    return made


def drain_in_a_process(env: Env) -> None:
    """``inferq worker --drain`` as its own process: each one is a worker of its own name (host:pid)."""
    done = subprocess.run(
        [sys.executable, "-m", "inferq", "worker", "--drain"],
        env=env.environ(INFERQ_METRICS_PORT="0"),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_shifted_feature_drifts_and_the_others_stay_ok_with_counts_of_two_workers(
    monitored: tuple[Env, np.random.Generator], tmp_path: Path
) -> None:
    env, rng = monitored
    published = env.inferq(
        "models", "publish", "risk", str(tmp_path / "risk.onnx"), "--reference", str(tmp_path / "train.csv")
    )
    assert published.returncode == 0, published.stderr
    assert "reference of 4000 rows" in published.stdout
    # Given two workers, each draining its own share of the live traffic
    env.submit(live_jobs(rng, 40, 40))
    drain_in_a_process(env)
    env.submit(live_jobs(rng, 40, 40))
    drain_in_a_process(env)

    # When drift is read (a window is 60 s: what is there was written when each drain ended)
    shown = env.inferq("monitor", "drift", "risk", "--json", "--plot", str(tmp_path / "drift.png"))

    # Then feature 3 drifted, the others did not, and both workers' counts are in
    assert shown.returncode == 0, shown.stderr
    report = orjson.loads(shown.stdout)
    assert (report["model"], report["version"], report["rows"]) == ("risk", 1, 3200)
    status = {f["name"]: f["status"] for f in report["features"]}
    assert status == {name: "drift" if i == SHIFTED else "ok" for i, name in enumerate(NAMES)}
    shifted = report["features"][SHIFTED]
    assert shifted["n"] == 3200 and shifted["psi"] > 1 and shifted["p_value"] < 1e-12 and shifted["js"] > 0.5
    assert all(f["p_value"] > 1e-4 for f in report["features"] if f["index"] != SHIFTED)
    assert [o["name"] for o in report["outputs"]] == ["label", "probabilities[0]", "probabilities[1]"]
    assert (tmp_path / "drift.png").stat().st_size > 10_000
    with sqlite3.connect(tmp_path / "results.db") as db:
        per_worker = db.execute("SELECT worker, count FROM monitor_counts WHERE kind = 'rows'").fetchall()
    assert sorted(rows for _, rows in per_worker) == [1600, 1600] and len({w for w, _ in per_worker}) == 2


def test_the_table_names_each_feature_and_its_status(
    monitored: tuple[Env, np.random.Generator], tmp_path: Path
) -> None:
    env, rng = monitored
    data, names = read_reference_data(tmp_path / "train.csv")
    publish(env.store, "risk", (tmp_path / "risk.onnx").read_bytes(), reference=(data, names))
    env.submit(live_jobs(rng, 10, 20))
    env.drain()  # an in-process worker: the open window is written when the drain ends

    shown = env.inferq("monitor", "drift", "risk", "--version", "1", "--since", "1h", "--min-rows", "100")

    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == "risk version 1: 200 rows in 1 windows"
    assert "x3" in lines[2 + SHIFTED] and lines[2 + SHIFTED].endswith("drift")


def test_a_version_without_reference_is_one_line_error(env: Env, tmp_path: Path) -> None:
    model = LogisticRegression().fit(np.eye(4), [0, 1, 0, 1])
    publish(env.store, "plain", estimator_to_onnx(model))

    no_reference = env.inferq("monitor", "drift", "plain")
    no_model = env.inferq("monitor", "drift", "nothing")

    assert no_reference.returncode == 1
    assert no_reference.stderr.strip().splitlines() == [
        "inferq: error: model 'plain' version 1 has no reference: publish it with --reference DATA to measure drift"
    ]
    assert no_model.returncode == 1 and no_model.stderr.startswith("inferq: error: no model named 'nothing'")


def test_a_reference_that_does_not_fit_the_model_is_refused(env: Env, tmp_path: Path) -> None:
    model = LogisticRegression().fit(np.eye(4), [0, 1, 0, 1])
    (tmp_path / "plain.onnx").write_bytes(estimator_to_onnx(model))
    (tmp_path / "wide.jsonl").write_text("[1, 2, 3]\n[4, 5, 6]\n")

    refused = env.inferq(
        "models", "publish", "plain", str(tmp_path / "plain.onnx"), "--reference", str(tmp_path / "wide.jsonl")
    )

    assert refused.returncode == 1
    assert refused.stderr.strip() == "inferq: error: --reference: the model takes 4 features per row, the data has 3"


def test_a_stopped_worker_writes_its_open_window(monitored: tuple[Env, np.random.Generator], tmp_path: Path) -> None:
    env, rng = monitored
    data, names = read_reference_data(tmp_path / "train.csv")
    publish(env.store, "risk", (tmp_path / "risk.onnx").read_bytes(), reference=(data, names))
    jobs = live_jobs(rng, 12, 5)

    with BackgroundWorker(env.worker_settings(metrics_port=0, monitor_window_s=3600)):
        env.submit(jobs)
        wait_for(lambda: len(env.stored()) == len(jobs), timeout_s=60)
    # the worker stopped gracefully: an hour-long window could only have been written at the stop

    monitoring = open_monitor_store(env.result_store_at)
    try:
        totals = monitoring.totals("risk", 1)
    finally:
        monitoring.close()
    assert totals.rows == 60 and sum(totals.inputs[SHIFTED]) == 60


def test_jobs_sent_twice_are_counted_once(monitored: tuple[Env, np.random.Generator], tmp_path: Path) -> None:
    env, rng = monitored
    data, names = read_reference_data(tmp_path / "train.csv")
    publish(env.store, "risk", (tmp_path / "risk.onnx").read_bytes(), reference=(data, names))
    jobs = live_jobs(rng, 30, 4)
    # Given jobs whose producer sent them again after the first copies had their results
    env.submit(jobs)
    env.drain()
    env.submit(jobs)
    env.drain()

    # Then the second copies got the stored results, and drift counted each job once
    assert len(env.results_on_queue()) == 60 and len(env.stored()) == 30
    monitoring = open_monitor_store(env.result_store_at)
    try:
        totals = monitoring.totals("risk", 1)
    finally:
        monitoring.close()
    assert totals.rows == 120 and sum(totals.inputs[0]) == 120

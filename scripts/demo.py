"""The end-to-end demo, through the real CLI: train, publish two versions, backfill, publish a pipeline
over named columns and submit a row to it by name, drain with two workers, show results and throughput.
Uses the local RabbitMQ, a model directory and a SQLite result store under var/demo, or, with
``--store s3``, a SeaweedFS S3 server it starts on free local ports (and stops at the end)."""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import joblib
import numpy as np
import orjson
import pandas as pd
import pika
from sklearn.compose import ColumnTransformer
from sklearn.datasets import make_classification
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seaweedfs import SeaweedFS

from inferq.shared.broker.amqp import delete_topology
from inferq.shared.config.settings import InferqSettings
from inferq.shared.results.stores import open_result_store

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "var" / "demo"
INFERQ = [sys.executable, "-m", "inferq"]
FEATURES = 8
ROWS_V1 = 4000  # one row per job, on the "champion" alias (version 1)
ROWS_V2 = 2000  # ten rows per job, on "latest" (version 2)
DRIFTED = 3  # the feature the live data shifts away from the training data


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def inferq(*args: str, env: dict[str, str], quiet: bool = False) -> str:
    done = subprocess.run([*INFERQ, *args], env=env, text=True, capture_output=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"inferq {' '.join(args)} failed:\n{done.stderr.strip()}")
    if not quiet:
        print(done.stdout.strip())
    return done.stdout


CHAMPION_BACKFILL = ("--model", "churn", "--version", "champion", "--id-column", "id", "--batch-rows", "1")
"""The champion's backfill: one row per job, so each row's job id names its row (the demo shows a few)."""


def purge_queues(env: dict[str, str]) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(env["INFERQ_AMQP_URL"]))
    channel = connection.channel()
    settings = InferqSettings(jobs_queue=env["INFERQ_JOBS_QUEUE"], results_queue=env["INFERQ_RESULTS_QUEUE"])
    delete_topology(channel, settings)
    connection.close()


def backfill_ids(env: dict[str, str], *row_ids: str) -> list[str]:
    """The job ids of backfilled rows of champion (version 1): ``churn:1:<row id>:<16 hex of the job digest>``."""
    exported = inferq("results", "export", "--model", "churn", "--format", "jsonl", env=env, quiet=True)
    ids = [orjson.loads(line)["id"] for line in exported.splitlines()]
    return [next(job_id for job_id in ids if job_id.startswith(f"churn:1:{row_id}:")) for row_id in row_ids]


def write_data(path: Path, rows: np.ndarray, id_prefix: str | None) -> None:
    """A CSV with a header; with ``id_prefix``, a first column ``id`` names each row's job."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        ids = ["id"] if id_prefix else []
        writer.writerow([*ids, *[f"f{i}" for i in range(rows.shape[1])]])
        for number, row in enumerate(rows):
            ids = [f"{id_prefix}-{number:05d}"] if id_prefix else []
            writer.writerow([*ids, *[f"{v:.6f}" for v in row]])


def run_workers(env: dict[str, str], count: int) -> float:
    """Start ``count`` drain-mode workers; return the seconds from the first job taken to the last ack."""
    logs = [WORK / f"worker-{i}.log" for i in range(count)]
    procs = [
        subprocess.Popen([*INFERQ, "worker", "--drain"], env=env, stderr=log.open("w"), stdout=subprocess.DEVNULL)
        for log in logs
    ]
    for proc in procs:
        if proc.wait(timeout=600) != 0:
            raise SystemExit(f"a worker failed; see {WORK}/worker-*.log")
    firsts, lasts = [], []
    for log in logs:
        for line in log.read_text().splitlines():
            event = orjson.loads(line)
            if event.get("event") == "worker_stopped" and event.get("first_job_at"):
                firsts.append(event["first_job_at"])
                lasts.append(event["last_ack_at"])
    return max(lasts) - min(firsts)


def publish_table_model(env: dict[str, str]) -> Pipeline:
    """Train a scaler + one-hot encoder + logistic regression on a DataFrame and publish it as 'plans'."""
    rng = np.random.default_rng(7)
    frame = pd.DataFrame(
        {
            "plan": rng.choice(["free", "pro", "team"], 500),
            "tenure": rng.integers(1, 60, 500),
            "spend": rng.gamma(2, 30, 500),
        }
    )
    churned = (frame["tenure"] < 12) & (frame["plan"] != "team")
    prep = ColumnTransformer(
        [("numbers", StandardScaler(), ["tenure", "spend"]), ("plan", OneHotEncoder(handle_unknown="ignore"), ["plan"])]
    )
    pipeline = Pipeline([("prep", prep), ("model", LogisticRegression())]).fit(frame, churned)
    joblib.dump(pipeline, WORK / "plans.joblib")
    inferq("models", "publish", "plans", str(WORK / "plans.joblib"), env=env)
    return pipeline


S3_BUCKET = "inferq-demo"


def count_results(env: dict[str, str]) -> int:
    store = open_result_store(env["INFERQ_RESULT_STORE"])
    try:
        return store.count()
    finally:
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", choices=["file", "s3"], default="file")
    store = parser.parse_args().store
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    env = {
        **os.environ,
        "INFERQ_AMQP_URL": os.environ.get("INFERQ_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"),
        "INFERQ_MODEL_STORE": str(WORK / "models"),
        "INFERQ_RESULT_STORE": f"sqlite:{WORK / 'results.db'}",
        "INFERQ_JOBS_QUEUE": "inferq.demo.jobs",
        "INFERQ_RESULTS_QUEUE": "inferq.demo.results",
        "INFERQ_LOG_FORMAT": "json",
    }
    with contextlib.ExitStack() as stack:
        if store == "s3":
            step("start a local SeaweedFS S3 server (stopped when the demo ends)")
            server = stack.enter_context(SeaweedFS())
            server.create_bucket(S3_BUCKET)
            print(f"S3 endpoint {server.endpoint}, bucket {S3_BUCKET}")
            env.update(server.environ)
            env["INFERQ_MODEL_STORE"] = f"s3://{S3_BUCKET}/models"
            env["INFERQ_RESULT_STORE"] = f"s3://{S3_BUCKET}/results"
            env["INFERQ_MODEL_CACHE"] = str(WORK / "model-cache")
            os.environ.update(server.environ)  # for count_results in this process
        run_demo(env)


def watch_models(env: dict[str, str], truth: np.ndarray) -> None:
    step("drift of the champion's inputs and outputs against its reference (plot in var/demo/drift.png)")
    inferq("monitor", "drift", "churn", "--version", "champion", "--plot", str(WORK / "drift.png"), env=env)

    step("the shadow version against the champion, on the same jobs")
    inferq("monitor", "shadow", "churn", env=env)

    submit_labels(env, truth, "late", 1)  # the other half, after the predictions
    step("live performance per version: predictions joined with their labels")
    inferq("monitor", "performance", "churn", env=env)


def submit_labels(env: dict[str, str], truth: np.ndarray, name: str, first: int) -> None:
    """The true class of every other backfilled row (from row ``first``), by its id column."""
    path = WORK / f"labels-{name}.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "label"])
        writer.writerows([f"a-{number:05d}", int(truth[number])] for number in range(first, len(truth), 2))
    step(f"labels: the true class of every other champion row ({name}), by the backfill's id column")
    inferq("labels", "submit", str(path), "--model", "churn", env=env)


def rerun_with_out(env: dict[str, str]) -> None:
    step("rerun the backfill with --out: every job already has a result, nothing is published, predictions.csv")
    out = WORK / "predictions.csv"
    v1 = str(WORK / "v1.csv")
    inferq("backfill", v1, *CHAMPION_BACKFILL, "--out", str(out), env=env)
    print("".join(out.read_text().splitlines(keepends=True)[:3]), end="")


def backfill(env: dict[str, str], X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Backfill live rows on 'champion' (half of them labeled before their predictions exist) and random
    rows on 'latest'; returns the champion rows' true classes."""
    step(
        f"backfill {ROWS_V1} rows on 'champion' (1 row/job, f{DRIFTED} shifted by 3 sd) and {ROWS_V2} rows on 'latest'"
    )
    rng = np.random.default_rng(7)
    live = X[picks := rng.integers(0, len(X), ROWS_V1)] + rng.normal(scale=0.05, size=(ROWS_V1, FEATURES))
    live[:, DRIFTED] += 3 * X[:, DRIFTED].std()
    write_data(WORK / "v1.csv", live, "a")
    write_data(WORK / "v2.csv", rng.normal(size=(ROWS_V2, FEATURES)), None)
    truth: np.ndarray = y[picks]
    submit_labels(env, truth, "early", 0)  # before the predictions exist
    inferq("backfill", str(WORK / "v1.csv"), *CHAMPION_BACKFILL, env=env)
    inferq("backfill", str(WORK / "v2.csv"), "--model", "churn", "--batch-rows", "10", env=env)
    return truth


def run_demo(env: dict[str, str]) -> None:
    purge_queues(env)

    step("train two scikit-learn models and publish them as versions 1 and 2 of 'churn'")
    X, y = make_classification(n_samples=3000, n_features=FEATURES, n_informative=5, random_state=7)
    forest = RandomForestClassifier(n_estimators=50, max_depth=6, random_state=7).fit(X, y)
    logistic = LogisticRegression(max_iter=500).fit(X, y)
    joblib.dump(forest, WORK / "forest.joblib")
    joblib.dump(logistic, WORK / "logistic.joblib")
    write_data(WORK / "train.csv", X, None)
    reference = ["--reference", str(WORK / "train.csv")]
    inferq("models", "publish", "churn", str(WORK / "forest.joblib"), "--alias", "champion", *reference, env=env)
    inferq("models", "publish", "churn", str(WORK / "logistic.joblib"), *reference, env=env)
    inferq("models", "list", env=env)

    step("shadow: half of the jobs on 'champion' also run on version 2 (never answered with)")
    inferq("models", "shadow", "churn", "--target", "2", "--fraction", "0.5", env=env)

    truth = backfill(env, X, y)
    jobs = ROWS_V1 + ROWS_V2 // 10

    step("a pipeline over named columns of mixed types: publish it, submit one row by name")
    pipeline = publish_table_model(env)
    row = {"plan": "pro", "tenure": 14, "spend": 61.5}
    table_job = inferq("submit", "--model", "plans", "--input", orjson.dumps(row).decode(), env=env).strip()
    jobs += 1

    step("run two workers in drain mode")
    started = time.monotonic()
    busy_s = run_workers(env, 2)
    wall_s = time.monotonic() - started

    step("a few results")
    for job_id in backfill_ids(env, "a-00000", "a-00001"):
        result = orjson.loads(inferq("results", "get", job_id, env=env, quiet=True))
        probabilities = result["outputs"][1]["data"]
        print(f"{job_id}: version {result['version']} label {result['outputs'][0]['data']} p={probabilities}")
    result = orjson.loads(inferq("results", "get", table_job, env=env, quiet=True))
    expected = pipeline.predict_proba(pd.DataFrame([row]))[0].round(4).tolist()
    print(f"plans {row}: p={[round(p, 4) for p in result['outputs'][1]['data']]} (scikit-learn: {expected})")
    stored = count_results(env)

    watch_models(env, truth)
    rerun_with_out(env)

    step("throughput")
    rows = ROWS_V1 + ROWS_V2
    print(f"{jobs} jobs ({rows} rows), {stored} results stored in {env['INFERQ_RESULT_STORE']}, 2 workers")
    print(f"{jobs / busy_s:,.0f} jobs/s ({rows / busy_s:,.0f} rows/s) from first job taken to last ack")
    print(f"{wall_s:.1f}s wall time including worker start-up")
    if stored != jobs:
        raise SystemExit(f"expected {jobs} stored results, found {stored}")


if __name__ == "__main__":
    main()

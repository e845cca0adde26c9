"""Backfills read a block of columns at a time: CSV and Parquet files of tens of thousands of rows through a
scikit-learn pipeline over string and numeric columns, with the real command, broker and worker; files
refused in one line before anything is published; Ctrl-C while publishing and a rerun that publishes
nothing twice; a 1,000,000-row file published with the backfill's peak RSS under 600 MB (read from the
kernel's accounting of the child process, not estimated); the DataFrame method on the same path."""

from __future__ import annotations

import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from support import BackgroundWorker, Env, hear_ctrl_c, wait_for

from inferq.model_store.base import publish, read_table
from inferq.model_store.model_file import load_model_file
from inferq.producer.backfill import planned_jobs
from inferq.producer.client import Producer
from inferq.shared.contract.messages import Status
from inferq.shared.tables.columnar import read_blocks

pytestmark = pytest.mark.broker

PLANS = ["basic", "plus", "pro"]
REGIONS = ["north", "south", "east", "west", "centre"]
NUMERIC = ["tenure", "spend", "calls"]


def churn_frame(rows: int, seed: int) -> pd.DataFrame:
    """Customers: an id, two string columns and three numeric ones."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "customer_id": [f"C-{seed}-{i:06d}" for i in range(rows)],
            "plan": rng.choice(PLANS, rows),
            "region": rng.choice(REGIONS, rows),
            "tenure": rng.integers(0, 120, rows).astype(float),
            "spend": rng.normal(60, 25, rows).round(2),
            "calls": rng.poisson(3, rows).astype(float),
        }
    )


@dataclass(frozen=True)
class Churn:
    """The pipeline (one-hot on two string columns, scaled numbers, logistic regression) and its joblib."""

    pipeline: Pipeline
    path: Path


@pytest.fixture(scope="module")
def churn(tmp_path_factory: pytest.TempPathFactory) -> Churn:
    train = churn_frame(3000, seed=1)
    label = ((train["tenure"] < 24) & (train["plan"] != "pro")) | (train["calls"] > 5)
    prep = ColumnTransformer(
        [
            ("cat", OneHotEncoder(handle_unknown="ignore"), ["plan", "region"]),
            ("num", StandardScaler(), NUMERIC),
        ]
    )
    pipeline = Pipeline([("prep", prep), ("clf", LogisticRegression(max_iter=500))])
    pipeline.fit(train.drop(columns="customer_id"), label.astype(int))
    path = tmp_path_factory.mktemp("churn") / "churn.joblib"
    joblib.dump(pipeline, path)
    return Churn(pipeline, path)


@pytest.fixture
def churn_env(env: Env, churn: Churn) -> Env:
    exported = load_model_file(churn.path)
    publish(env.store, "churn", exported.onnx, source=exported.source, columns=exported.columns)
    env.result_location = f"sqlite:{env.tmp / 'results.db'}"
    return env


def predictions(env: Env, data: Path) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities of every row of ``data``, in input order, read from the result store by the
    ids the backfill derives (each result checked to answer its own job)."""
    table = read_table(env.store, "churn", "latest")
    stored = env.stored()
    labels, probabilities = [], []
    for planned in planned_jobs(read_blocks(data, table, "customer_id"), table, 2048):
        result = stored[planned.job_id]
        assert result.status is Status.SUCCEEDED and result.job_sha256 == planned.digest, result.error
        label, probability = result.outputs or []
        labels.append(label.to_numpy().reshape(-1))
        probabilities.append(probability.to_numpy().reshape(planned.rows, -1))
    return np.concatenate(labels), np.concatenate(probabilities)


def test_csv_and_parquet_files_are_scored_as_scikit_learn_scores_them_in_input_order(
    churn_env: Env, churn: Churn
) -> None:
    # Given 30,000 customers in a CSV file and 20,000 others in a Parquet file
    as_csv, as_parquet = churn_frame(30_000, seed=2), churn_frame(20_000, seed=3)
    csv_file, parquet_file = churn_env.tmp / "customers.csv", churn_env.tmp / "customers.parquet"
    as_csv.to_csv(csv_file, index=False)
    pq.write_table(pa.Table.from_pandas(as_parquet, preserve_index=False), parquet_file)

    # When each is backfilled with the default rows per job and a worker drains the queue
    for data, rows in ((csv_file, 30_000), (parquet_file, 20_000)):
        done = churn_env.inferq("backfill", str(data), "--model", "churn", "--id-column", "customer_id")
        assert done.returncode == 0, done.stderr
        jobs = -(-rows // 2048)  # 2 strings and 3 numbers: 2,048 rows per job (a few hundred kilobytes)
        assert (
            done.stdout.strip() == f"published {jobs} jobs ({rows} rows) on churn version 1, skipped 0 already finished"
        )
    churn_env.drain()

    # Then every row's prediction is scikit-learn's, in input order
    for data, frame in ((csv_file, as_csv), (parquet_file, as_parquet)):
        labels, probabilities = predictions(churn_env, data)
        features = frame.drop(columns="customer_id")
        np.testing.assert_array_equal(labels, churn.pipeline.predict(features))
        np.testing.assert_allclose(probabilities, churn.pipeline.predict_proba(features), atol=1e-5)
    # And a rerun publishes nothing
    again = churn_env.inferq("backfill", str(csv_file), "--model", "churn", "--id-column", "customer_id")
    assert again.stdout.strip() == "published 0 jobs (0 rows) on churn version 1, skipped 15 already finished"


def test_a_bad_row_anywhere_is_one_line_naming_file_line_and_column_and_nothing_is_published(
    churn_env: Env,
) -> None:
    frame = churn_frame(20_000, seed=4)
    bad_value = frame.astype({"calls": object})
    bad_value.loc[15_000, "calls"] = "many"
    bad_csv = churn_env.tmp / "bad_value.csv"
    bad_value.to_csv(bad_csv, index=False)
    twice = frame.copy()
    twice.loc[17_000, "customer_id"] = twice.loc[3, "customer_id"]
    twice_parquet = churn_env.tmp / "twice.parquet"
    pq.write_table(pa.Table.from_pandas(twice, preserve_index=False), twice_parquet)
    missing = frame.copy()
    missing.loc[12_345, "spend"] = None
    missing_parquet = churn_env.tmp / "missing.parquet"
    pq.write_table(pa.Table.from_pandas(missing, preserve_index=False), missing_parquet)
    no_region = churn_env.tmp / "no_region.parquet"
    pq.write_table(pa.Table.from_pandas(frame.drop(columns="region"), preserve_index=False), no_region)

    errors = []
    for data in (bad_csv, twice_parquet, missing_parquet, no_region):
        done = churn_env.inferq("backfill", str(data), "--model", "churn", "--id-column", "customer_id")
        assert done.returncode == 1 and done.stdout == "" and done.stderr.count("\n") == 1, done.stderr
        errors.append(done.stderr.strip())

    assert errors == [
        f"inferq: error: {bad_csv}:15002: column 'calls': 'many' is not a number (FP32 needed)",
        f"inferq: error: {twice_parquet}: row 17001: id 'C-4-000003' is also the id of row 4",
        f"inferq: error: {missing_parquet}: row 12346: column 'spend': no value (FP32 needed)",
        f"inferq: error: {no_region}: no column 'region' (model 'churn' version 1 reads "
        "plan, region, tenure, spend, calls)",
    ]
    assert churn_env.depth(churn_env.jobs_queue) == 0


def test_ctrl_c_while_publishing_then_a_rerun_publishes_nothing_twice(churn_env: Env) -> None:
    # Given 4,000 jobs for a jobs queue bounded at 40 (the publisher waits on its refusals)
    data = churn_env.tmp / "customers.csv"
    churn_frame(40_000, seed=5).to_csv(data, index=False)
    command = [sys.executable, "-m", "inferq", "backfill", str(data), "--model", "churn", "--batch-rows", "10"]
    with subprocess.Popen(
        command,
        env=churn_env.environ(INFERQ_MAX_QUEUE_LENGTH="40"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=hear_ctrl_c,  # noqa: PLW1509 (it only resets one signal disposition, no lock)
    ) as first:
        try:
            wait_for(lambda: churn_env.depth(churn_env.jobs_queue) >= 40, timeout_s=60)
            # When the user presses Ctrl-C while it waits for room
            first.send_signal(signal.SIGINT)
            _stdout, stderr = first.communicate(timeout=30)
        finally:
            if first.poll() is None:
                first.kill()
    # Then it stops with one line on how to resume
    assert first.returncode == 130, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("inferq: interrupted: ") and last.endswith(
        " of 40000 rows published or already finished. Run the same command again to resume: it publishes "
        "nothing twice."
    )
    scored = churn_env.drain(max_queue_length=40).received
    assert 40 <= scored < 4000
    churn_env.delete_queues()  # the rerun declares an unbounded queue

    # When it runs again, and a worker drains the queue
    again = subprocess.run(command, env=churn_env.environ(), capture_output=True, text=True, timeout=120, check=False)
    rest = churn_env.drain().received
    # Then it publishes only the jobs not yet scored, and every job was run once
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == (
        f"published {4000 - scored} jobs ({(4000 - scored) * 10} rows) on churn version 1, "
        f"skipped {scored} already finished"
    )
    assert rest == 4000 - scored
    stored = churn_env.stored()
    assert len(stored) == 4000 and all(r.status is Status.SUCCEEDED for r in stored.values())


def test_a_dataframe_is_scored_through_the_fleet_and_comes_back_in_its_order(churn_env: Env, churn: Churn) -> None:
    # Given a DataFrame of 10,000 customers, shuffled, with an index of its own
    frame = churn_frame(10_000, seed=6).sample(frac=1.0, random_state=0).drop(columns="customer_id")
    with BackgroundWorker(churn_env.worker_settings()) as worker, Producer(churn_env.producer_settings()) as producer:
        # When it is scored through the workers, twice
        scored = producer.score_frame(frame, "churn", batch_rows=1000)
        again = producer.score_frame(frame, "churn", batch_rows=1000)
    # Then the predictions are scikit-learn's, row by row, under the frame's index
    assert list(scored.columns) == ["error_code", "label", "probabilities_0", "probabilities_1"]
    assert scored.index.equals(frame.index) and scored["error_code"].isna().all()
    np.testing.assert_array_equal(scored["label"].to_numpy(), churn.pipeline.predict(frame))
    probabilities = scored[["probabilities_0", "probabilities_1"]].to_numpy()
    np.testing.assert_allclose(probabilities, churn.pipeline.predict_proba(frame), atol=1e-5)
    # And the second call published nothing: it read the stored results
    assert worker.counters is not None and worker.counters.received == 10 and len(churn_env.stored()) == 10
    pd.testing.assert_frame_equal(again, scored)


MILLION = 1_000_000
RSS_BOUND_MB = 600
PEAK_RSS = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)
print(done.stdout.strip())
print(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "")
"""
"""Runs a command and prints its exit code and peak RSS in MB (ru_maxrss is in kilobytes on Linux)."""


def test_a_million_row_backfill_publishes_everything_with_its_peak_rss_under_the_bound(churn_env: Env) -> None:
    # Given a 1,000,000-row CSV (two strings, three numbers, an id)
    data = churn_env.tmp / "million.csv"
    churn_frame(MILLION, seed=7).to_csv(data, index=False)
    # When it is backfilled with the default settings
    command = [sys.executable, "-m", "inferq", "backfill", str(data), "--model", "churn", "--id-column", "customer_id"]
    done = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, *command],
        env=churn_env.environ(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    code, peak_mb = done.stdout.splitlines()[0].split()
    # Then every row is published, and the process never held more than the bound
    assert code == "0", done.stdout
    assert done.stdout.splitlines()[1] == (
        f"published {-(-MILLION // 2048)} jobs ({MILLION} rows) on churn version 1, skipped 0 already finished"
    )
    assert int(peak_mb) < RSS_BOUND_MB, f"peak RSS {peak_mb} MB"
    print(f"backfill of {MILLION} rows: peak RSS {peak_mb} MB")

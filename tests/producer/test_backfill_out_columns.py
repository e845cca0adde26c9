"""``inferq backfill --out`` written from column arrays, end to end through the real broker, a real worker and
the SQLite store: CSV, Parquet and JSON lines outputs hold scikit-learn's predictions for every row in input
order, Parquet keeps the outputs' types (float32 stays float32), and CSV writes each float32 in its shortest
form, never the float64 digits of its value."""

from __future__ import annotations

import csv
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import joblib
import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from support import BackgroundWorker, Env

pytestmark = pytest.mark.broker

ROWS = 20_000
PLANS = ["basic", "plus", "family", "pro"]
REGIONS = ["north", "south", "east", "west"]
FEATURES = ["plan", "region", "tenure", "spend", "calls"]


@dataclass(frozen=True)
class Churn:
    """A pipeline over two text and three number columns, and rows it has not seen (with their ids)."""

    pipeline: Pipeline
    path: Path
    frame: pd.DataFrame


def _customers(rng: np.random.Generator, rows: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "customer": [f"c-{i:06d}" for i in range(rows)],
            "plan": rng.choice(PLANS, rows),
            "region": rng.choice(REGIONS, rows),
            "tenure": rng.integers(1, 120, rows),
            "spend": np.round(rng.gamma(4.0, 12.5, rows), 2),
            "calls": rng.poisson(1.5, rows),
        }
    )


@pytest.fixture(scope="module")
def churn(tmp_path_factory: pytest.TempPathFactory) -> Churn:
    rng = np.random.default_rng(23)
    training = _customers(rng, 3000)
    label = (training["calls"] * 0.5 - training["tenure"] * 0.02 + (training["plan"] == "basic")) > 0.3
    prep = ColumnTransformer(
        [("cat", OneHotEncoder(handle_unknown="ignore"), ["plan", "region"]), ("num", StandardScaler(), FEATURES[2:])]
    )
    pipeline = Pipeline([("prep", prep), ("clf", LogisticRegression())]).fit(training[FEATURES], label)
    path = tmp_path_factory.mktemp("churn") / "churn.joblib"
    joblib.dump(pipeline, path)
    return Churn(pipeline, path, _customers(rng, ROWS))


@pytest.fixture
def scored(env: Env, churn: Churn) -> Env:
    """The churn model published, results in SQLite."""
    env.result_location = f"sqlite:{env.tmp / 'results.db'}"
    published = env.inferq("models", "publish", "churn", str(churn.path))
    assert published.returncode == 0, published.stderr
    return env


def _backfill_with_a_worker(env: Env, data: Path, out: Path) -> subprocess.CompletedProcess[str]:
    with BackgroundWorker(env.worker_settings()):
        return env.inferq("backfill", str(data), "--model", "churn", "--id-column", "customer", "--out", str(out))


def _expected(churn: Churn) -> tuple[np.ndarray, np.ndarray]:
    frame = churn.frame[FEATURES]
    return churn.pipeline.predict(frame), churn.pipeline.predict_proba(frame)


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_every_row_gets_scikit_learns_prediction_in_input_order(scored: Env, churn: Churn, suffix: str) -> None:
    # Given 20,000 rows of text and number columns in a CSV file
    data, out = scored.tmp / "customers.csv", scored.tmp / f"predictions{suffix}"
    churn.frame.to_csv(data, index=False)
    # When they are backfilled with --out and a worker running
    done = _backfill_with_a_worker(scored, data, out)
    # Then every row is in the output, in input order, with scikit-learn's label and probabilities
    assert done.returncode == 0, done.stderr
    assert f"wrote {ROWS} rows to {out}" in done.stdout
    if suffix == ".csv":
        table = pd.read_csv(out, keep_default_na=False)
    elif suffix == ".parquet":
        table = pd.read_parquet(out)
    else:
        table = pd.DataFrame([orjson.loads(line) for line in out.read_bytes().splitlines()])
    assert list(table.columns) == [
        "customer",
        "error_code",
        "error_detail",
        "label",
        "probabilities_0",
        "probabilities_1",
    ]
    assert table["customer"].tolist() == churn.frame["customer"].tolist()
    assert set(table["error_code"].replace({None: ""})) == {""}
    label, probabilities = _expected(churn)
    np.testing.assert_array_equal(table["label"].to_numpy(dtype=np.int64), label.astype(np.int64))
    np.testing.assert_allclose(table[["probabilities_0", "probabilities_1"]].to_numpy(), probabilities, atol=1e-6)


def test_a_parquet_output_reads_back_with_its_types_and_csv_holds_the_same_float32s_in_shortest_form(
    scored: Env, churn: Churn
) -> None:
    # Given the same rows backfilled to Parquet, then (a rerun: nothing published again) to CSV
    data = scored.tmp / "customers.csv"
    churn.frame.to_csv(data, index=False)
    parquet, text = scored.tmp / "predictions.parquet", scored.tmp / "predictions.csv"
    assert _backfill_with_a_worker(scored, data, parquet).returncode == 0
    again = scored.inferq("backfill", str(data), "--model", "churn", "--id-column", "customer", "--out", str(text))
    assert again.returncode == 0 and "published 0 jobs" in again.stdout, again.stderr
    # Then the Parquet columns keep the outputs' types: float32 stays float32, through pyarrow and pandas
    schema = pq.read_schema(parquet)
    assert schema.field("probabilities_1").type == pa.float32()
    assert schema.field("label").type == pa.int64()
    assert schema.field("customer").type == pa.string()
    assert pd.read_parquet(parquet)["probabilities_1"].dtype == np.float32
    # And each CSV cell is the shortest text that reads back as the very same float32
    stored = pq.read_table(parquet).column("probabilities_1").to_numpy()
    with text.open() as handle:
        cells = [row["probabilities_1"] for row in csv.DictReader(handle)]
    assert np.array_equal(np.array(cells, dtype=np.float32), stored)
    assert all(_digits(cell) <= _digits(str(value)) for cell, value in zip(cells, stored, strict=True))
    assert max(_digits(cell) for cell in cells) <= 9  # a float32 never needs more; a float64's digits would


def _digits(text: str) -> int:
    """Significant digits of a number's text."""
    return len(text.lower().split("e")[0].lstrip("-").replace(".", "").strip("0"))


def test_the_out_file_of_a_large_run_streams_in_bounded_memory(scored: Env, churn: Churn) -> None:
    # Given 300,000 rows already scored (a first run), when a rerun only writes --out
    rows = 300_000
    big = pd.concat([churn.frame] * (rows // ROWS), ignore_index=True)
    big["customer"] = [f"c-{i:07d}" for i in range(rows)]
    data, out = scored.tmp / "big.csv", scored.tmp / "big.parquet"
    big.to_csv(data, index=False)
    assert _backfill_with_a_worker(scored, data, scored.tmp / "first.csv").returncode == 0
    command = [sys.executable, "-m", "inferq", "backfill", str(data), "--model", "churn", "--id-column", "customer"]
    process = subprocess.Popen(
        [*command, "--out", str(out)],
        env=scored.environ(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    peak_mb = _peak_rss_mb(process)
    stdout = process.communicate()[0]
    # Then it wrote every row, and its peak RSS stayed far under the 600 MB bound
    assert process.returncode == 0 and "published 0 jobs" in stdout, stdout
    assert pq.read_metadata(out).num_rows == rows
    assert peak_mb < 600, f"backfill --out peaked at {peak_mb:.0f} MB"


def _peak_rss_mb(process: subprocess.Popen[str]) -> float:
    """The process's peak RSS (``VmHWM``, read until it exits). NOTE: not ``wait4``'s ``ru_maxrss``, which
    Linux starts from the forking parent's high-water mark (this test process's, with pandas loaded)."""
    peak_kb = 0
    while process.poll() is None:
        try:
            status = Path(f"/proc/{process.pid}/status").read_text()
        except OSError:
            break
        peak_kb = max([peak_kb] + [int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")])
        time.sleep(0.02)
    return peak_kb / 1024

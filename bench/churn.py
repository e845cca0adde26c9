"""The backfill benchmark's data set and model: customers with two categorical and three numeric columns,
and a scikit-learn pipeline that one-hot encodes the first, scales the second and fits a logistic
regression. Everything follows from one seed, so two runs score the same file with the same model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import joblib
import numpy as np
import numpy.typing as npt
import pandas as pd  # type: ignore[import-untyped]
import pyarrow as pa
import pyarrow.csv as pacsv
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

SEED = 23
ID_COLUMN = "customer_id"
CATEGORICAL = ("plan", "region")
NUMERIC = ("tenure_months", "monthly_spend", "support_calls")
FEATURES = (*CATEGORICAL, *NUMERIC)
PLANS = ("basic", "plus", "family", "pro")
REGIONS = ("north", "south", "east", "west", "central", "islands")
TRAINING_ROWS = 50_000
BLOCK_ROWS = 250_000
"""Rows generated and written at a time: the generator's memory does not grow with the file."""


@dataclass(frozen=True, slots=True)
class DataSet:
    """The generated CSV and the fitted pipeline's joblib file."""

    csv: Path
    model: Path
    rows: int


def customers(rows: int, rng: np.random.Generator, first_id: int = 1) -> pd.DataFrame:
    """``rows`` synthetic customers (ids from ``first_id``), the columns the pipeline reads, rounded as a CSV
    export would hold them."""
    return pd.DataFrame(
        {
            ID_COLUMN: np.arange(first_id, first_id + rows, dtype=np.int64) + 10_000_000,
            "plan": rng.choice(PLANS, rows, p=[0.4, 0.3, 0.2, 0.1]),
            "region": rng.choice(REGIONS, rows),
            "tenure_months": rng.integers(1, 120, rows),
            "monthly_spend": np.round(rng.gamma(4.0, 12.5, rows), 2),
            "support_calls": rng.poisson(1.5, rows),
        }
    )


def churned(frame: pd.DataFrame, rng: np.random.Generator) -> npt.NDArray[np.bool_]:
    """A noisy churn label that depends on every feature."""
    score = (
        -0.02 * frame["tenure_months"].to_numpy()
        + 0.01 * frame["monthly_spend"].to_numpy()
        + 0.45 * frame["support_calls"].to_numpy()
        + np.where(frame["plan"].to_numpy() == "basic", 0.6, 0.0)
        + np.where(frame["region"].to_numpy() == "islands", 0.4, 0.0)
    )
    return np.asarray((score + rng.normal(0, 0.8, len(frame))) > 0.5, dtype=np.bool_)


def pipeline(rng: np.random.Generator) -> Pipeline:
    """The pipeline, fitted on a sample of its own (training is not what the benchmark measures)."""
    frame = customers(TRAINING_ROWS, rng)
    label = churned(frame, rng)
    prep = ColumnTransformer(
        [
            ("cat", OneHotEncoder(handle_unknown="ignore"), list(CATEGORICAL)),
            ("num", StandardScaler(), list(NUMERIC)),
        ]
    )
    return Pipeline([("prep", prep), ("clf", LogisticRegression(max_iter=500))]).fit(frame[list(FEATURES)], label)


def generate(directory: Path, rows: int) -> DataSet:
    """The data set in ``directory`` (``big.csv``, ``churn.joblib``), made once per size and seed and reused."""
    directory.mkdir(parents=True, exist_ok=True)
    data, model = directory / f"big-{rows}-{SEED}.csv", directory / f"churn-{SEED}.joblib"
    rng = np.random.default_rng(SEED)
    if not model.exists():
        joblib.dump(pipeline(rng), model)
    if not data.exists():
        _write_csv(data, rows, np.random.default_rng(SEED + 1))
    return DataSet(data, model, rows)


def _write_csv(path: Path, rows: int, rng: np.random.Generator) -> None:
    partial = path.with_name(f".{path.name}.partial")
    writer: pacsv.CSVWriter | None = None
    sink: BinaryIO
    try:
        for start in range(0, rows, BLOCK_ROWS):
            block = pa.Table.from_pandas(customers(min(BLOCK_ROWS, rows - start), rng, start + 1), preserve_index=False)
            if writer is None:
                partial.write_text(",".join(block.schema.names) + "\n")  # a plain header, as pandas writes one
                sink = partial.open("ab")
                options = pacsv.WriteOptions(include_header=False, quoting_style="none")
                writer = pacsv.CSVWriter(sink, block.schema, write_options=options)
            writer.write_table(block)
    finally:
        if writer is not None:
            writer.close()
            sink.close()
    partial.replace(path)

"""Tabular models as users have them, end to end through the real broker and workers: a scikit-learn
pipeline over named columns of mixed types, fed rows by name from every producer, answers exactly as
scikit-learn does on the same rows."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import orjson
import pandas as pd
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import GradientBoostingRegressor
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from support import Env

from inferq.model_store.base import publish, read_table
from inferq.model_store.model_file import load_model_file
from inferq.producer import job_from_columns, job_from_rows
from inferq.shared.contract.messages import Job, Result, Status, Tensor
from inferq.shared.errors import ErrorCode

pytestmark = pytest.mark.broker

CITIES = ["rome", "oslo", "lima", "kyiv"]


@dataclass(frozen=True)
class Mixed:
    """A pipeline trained on a DataFrame of named columns (a string, an integer, a float) and its joblib file."""

    pipeline: Pipeline
    path: Path
    rows: list[dict[str, Any]]  # rows it has not seen, to score


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Mixed:
    rng = np.random.default_rng(11)
    size = 400
    frame = pd.DataFrame(
        {"city": rng.choice(CITIES, size), "age": rng.integers(18, 90, size), "income": rng.normal(50, 15, size)}
    )
    label = ((frame["age"] > 50) ^ (frame["city"] == "rome") ^ (frame["income"] > 60)).astype(int)
    prep = ColumnTransformer(
        [("num", StandardScaler(), ["age", "income"]), ("cat", OneHotEncoder(handle_unknown="ignore"), ["city"])]
    )
    pipeline = Pipeline([("prep", prep), ("clf", LogisticRegression())]).fit(frame, label)
    path = tmp_path_factory.mktemp("mixed") / "mixed.joblib"
    joblib.dump(pipeline, path)
    rows = [
        {"city": str(city), "age": int(age), "income": round(float(income), 3)}
        for city, age, income in zip(
            rng.choice(CITIES, 24), rng.integers(18, 90, 24), rng.normal(50, 15, 24), strict=True
        )
    ]
    rows[5]["city"] = "tokyo"  # a category never seen in training: handle_unknown="ignore" scores it anyway
    return Mixed(pipeline, path, rows)


def assert_answers_as_scikit_learn(result: Result, pipeline: Pipeline, rows: list[dict[str, Any]]) -> None:
    assert result.status is Status.SUCCEEDED, result.error
    label, probabilities = (t.to_numpy() for t in result.outputs or [])
    frame = pd.DataFrame(rows)[["city", "age", "income"]]
    np.testing.assert_array_equal(label, pipeline.predict(frame))
    np.testing.assert_allclose(probabilities, pipeline.predict_proba(frame), atol=1e-5)


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_a_mixed_pipeline_answers_as_scikit_learn_for_rows_from_every_producer(env: Env, mixed: Mixed) -> None:
    published = env.inferq("models", "publish", "mixed", str(mixed.path))
    assert published.returncode == 0, published.stderr
    assert "columns: city:BYTES, age:FP32, income:FP32" in published.stdout
    rows = mixed.rows
    expected: dict[str, list[dict[str, Any]]] = {}

    # submit --input: one object, then a list of objects (one job of two rows)
    for given in (rows[0], rows[1:3]):
        done = env.inferq("submit", "--model", "mixed", "--input", orjson.dumps(given).decode())
        assert done.returncode == 0, done.stderr
        expected[done.stdout.strip()] = [given] if isinstance(given, dict) else given

    # submit FILE --model: JSONL of objects, keys in any order, one job per line
    lines = env.tmp / "rows.jsonl"
    lines.write_text("".join(orjson.dumps(dict(reversed(r.items()))).decode() + "\n" for r in rows[3:7]))
    done = env.inferq("submit", str(lines), "--model", "mixed", "--version", "1")
    assert done.returncode == 0, done.stderr
    expected.update(zip(done.stdout.split(), [[r] for r in rows[3:7]], strict=True))

    # the Producer: a list of dicts, and a mapping of columns
    table = read_table(env.store, "mixed", "latest")
    by_rows = job_from_rows(table, rows[7:10])
    by_columns = job_from_columns(table, {key: [r[key] for r in rows[10:13]] for key in ("income", "city", "age")})
    env.submit([by_rows, by_columns])
    expected[by_rows.id], expected[by_columns.id] = rows[7:10], rows[10:13]

    # backfill: columns in another order than at training time, an extra column, an id column
    data = write_csv(
        env.tmp / "backfill.csv",
        ["income", "id", "comment", "city", "age"],
        [[r["income"], f"row-{i}", "ignored", r["city"], r["age"]] for i, r in enumerate(rows[13:], start=13)],
    )
    done = env.inferq("backfill", str(data), "--model", "mixed", "--id-column", "id", "--version", "champion")
    assert done.returncode == 1 and "no alias 'champion'" in done.stderr
    done = env.inferq("backfill", str(data), "--model", "mixed", "--id-column", "id", "--batch-rows", "1")
    assert done.returncode == 0, done.stderr
    assert "published 11 jobs (11 rows) on mixed version 1" in done.stdout
    expected.update({f"mixed:1:row-{i}": [r] for i, r in enumerate(rows[13:], start=13)})

    counters = env.drain()

    # a backfill job's id ends with 16 hex digits of its digest: matched here by the readable part
    stored = {key if key in expected else key.rsplit(":", 1)[0]: r for key, r in env.stored().items()}
    assert counters.succeeded == len(expected) == len(stored)
    for job_id, given_rows in expected.items():
        assert_answers_as_scikit_learn(stored[job_id], mixed.pipeline, given_rows)


def test_a_missing_column_or_a_value_that_does_not_fit_is_one_line_and_publishes_nothing(
    env: Env, mixed: Mixed
) -> None:
    exported = load_model_file(mixed.path)
    publish(env.store, "mixed", exported.onnx, columns=exported.columns)
    no_income = write_csv(env.tmp / "no_income.csv", ["city", "age"], [["rome", 30]])
    bad_age = write_csv(env.tmp / "bad_age.csv", ["city", "age", "income"], [["rome", 30, 1.5], ["oslo", "old", 2]])
    jsonl = env.tmp / "rows.jsonl"
    jsonl.write_text('{"city": "rome", "age": 30, "income": 1}\n{"city": "rome", "age": 30}\n')

    errors = []
    for data in (no_income, bad_age, jsonl):
        done = env.inferq("backfill", str(data), "--model", "mixed")
        assert done.returncode == 1 and done.stdout == "" and done.stderr.count("\n") == 1, done.stderr
        errors.append(done.stderr.strip())

    assert errors == [
        f"inferq: error: {no_income}:1: no column 'income' in the header "
        "(model 'mixed' version 1 reads city, age, income)",
        f"inferq: error: {bad_age}:3: column 'age': 'old' is not a number (FP32 needed)",
        f"inferq: error: {jsonl}:2: column 'income': missing (model 'mixed' version 1 reads city, age, income)",
    ]
    assert env.depth(env.jobs_queue) == 0
    # submit reports each job as the broker confirms it: line 1 is published and printed, line 2 is refused
    done = env.inferq("submit", str(jsonl), "--model", "mixed")
    assert done.returncode == 1 and len(done.stdout.split()) == 1 and done.stderr.strip() == errors[2]
    assert env.depth(env.jobs_queue) == 1


def test_the_worker_names_the_column_a_job_left_out(env: Env, mixed: Mixed) -> None:
    exported = load_model_file(mixed.path)
    publish(env.store, "mixed", exported.onnx, columns=exported.columns)
    inputs = [
        Tensor(name="city", shape=[1, 1], datatype="BYTES", data=["rome"]),
        Tensor(name="age", shape=[1, 1], datatype="FP32", data=[61.0]),
    ]
    wrong_type = [*inputs, Tensor(name="income", shape=[1, 1], datatype="FP64", data=[50.0])]
    env.submit([Job(id="no-income", model="mixed", inputs=inputs), Job(id="fp64", model="mixed", inputs=wrong_type)])

    env.drain()

    stored = env.stored()
    for job_id, fragment in (("no-income", "missing ['income']"), ("fp64", "input 'income' must be FP32")):
        error = stored[job_id].error
        assert error is not None and error.code is ErrorCode.INPUT_MISMATCH and fragment in error.message


def test_a_gradient_boosting_regressor_on_numbers_works_as_before_and_by_name(env: Env) -> None:
    rng = np.random.default_rng(5)
    features = pd.DataFrame({"rooms": rng.integers(1, 8, 300), "area": rng.normal(80, 20, 300)})
    target = features["rooms"] * 10 + features["area"] + rng.normal(size=300)
    unnamed = GradientBoostingRegressor(n_estimators=30, random_state=0).fit(features.to_numpy(), target)
    named = GradientBoostingRegressor(n_estimators=30, random_state=0).fit(features, target)
    for name, estimator in (("unnamed", unnamed), ("named", named)):
        joblib.dump(estimator, env.tmp / f"{name}.joblib")
        exported = load_model_file(env.tmp / f"{name}.joblib")  # what `models publish` does, in this process
        publish(env.store, name, exported.onnx, source=exported.source, columns=exported.columns)
    assert env.store.read_manifest("unnamed", 1).columns is None
    assert [c.name for c in env.store.read_manifest("named", 1).columns or []] == ["rooms", "area"]
    rows = features.head(20)
    positional = write_csv(env.tmp / "positional.csv", ["a", "b"], rows.to_numpy().tolist())
    by_name = write_csv(env.tmp / "by_name.csv", ["area", "rooms"], rows[["area", "rooms"]].to_numpy().tolist())

    for model, data in (("unnamed", positional), ("named", by_name)):
        done = env.inferq("backfill", str(data), "--model", model, "--batch-rows", "20")
        assert done.returncode == 0, done.stderr
    env.drain()

    results = {r.model: r for r in env.stored().values()}
    for model, expected in (("unnamed", unnamed.predict(rows.to_numpy())), ("named", named.predict(rows))):
        (prediction,) = (t.to_numpy() for t in results[model].outputs or [])
        np.testing.assert_allclose(prediction.reshape(-1), expected, rtol=1e-4)

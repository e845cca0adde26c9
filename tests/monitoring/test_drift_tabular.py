"""Drift of a model that reads named columns, end to end: a scikit-learn pipeline over a text column and
numeric columns published with its training rows by name, live rows through the real broker and a
draining worker, ``inferq monitor drift`` per column."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import orjson
import pandas as pd
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from support import Env

from inferq.model_store.base import publish, read_table
from inferq.model_store.model_file import load_model_file
from inferq.monitoring.reference import MISSING, OTHER, ReferenceTable, read_reference, read_reference_table
from inferq.monitoring.store import open_monitor_store
from inferq.producer import job_from_rows

pytestmark = pytest.mark.broker

CITIES = ["rome", "oslo", "lima", "kyiv"]
TRAINING_SHARES = [0.4, 0.3, 0.2, 0.1]
COLUMNS = ["city", "age", "income", "tenure"]


def training_frame(rng: np.random.Generator, size: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "city": rng.choice(CITIES, size, p=TRAINING_SHARES),
            "age": rng.normal(45, 12, size).round(1),
            "income": rng.normal(50, 15, size).round(3),
            "tenure": rng.exponential(4, size).round(2),
        }
    )


@pytest.fixture
def churn(env: Env, tmp_path: Path) -> tuple[Env, Path, Path]:
    """A pipeline over named columns (OneHotEncoder on ``city``, a scaler on three numbers) saved with
    joblib, and its training rows in ``train.csv`` (columns in another order, plus an id column)."""
    rng = np.random.default_rng(21)
    frame = training_frame(rng, 3000)
    label = ((frame["age"] > 45) ^ (frame["city"] == "kyiv") ^ (frame["income"] > 55)).astype(int)
    prep = ColumnTransformer(
        [
            ("num", StandardScaler(), ["age", "income", "tenure"]),
            ("cat", OneHotEncoder(handle_unknown="ignore"), ["city"]),
        ]
    )
    pipeline = Pipeline([("prep", prep), ("clf", LogisticRegression())]).fit(frame[COLUMNS], label)
    joblib.dump(pipeline, tmp_path / "churn.joblib")
    with (tmp_path / "train.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "tenure", "income", "age", "city"])
        writer.writerows([i, r.tenure, r.income, r.age, r.city] for i, r in enumerate(frame.itertuples()))
    env.result_location = f"sqlite:{tmp_path}/results.db"
    return env, tmp_path / "churn.joblib", tmp_path / "train.csv"


def live_rows(rng: np.random.Generator, size: int) -> list[dict[str, Any]]:
    """Rows where ``kyiv`` (10 % in training) is 70 %, 5 % of cities are unseen and 2 % empty, and
    ``income`` is shifted by three standard deviations; ``age`` and ``tenure`` as in training."""
    frame = training_frame(rng, size)
    frame["city"] = rng.choice([*CITIES, "tokyo", ""], size, p=[0.09, 0.07, 0.07, 0.7, 0.05, 0.02])
    frame["income"] += 3 * 15
    return [{k: (str(v) if k == "city" else float(v)) for k, v in row.items()} for row in frame.to_dict("records")]


def test_a_shifted_text_column_and_a_shifted_number_drift_and_the_other_columns_stay_ok(
    churn: tuple[Env, Path, Path],
) -> None:
    env, model, train = churn
    published = env.inferq("models", "publish", "churn", str(model), "--reference", str(train))
    assert published.returncode == 0, published.stderr
    assert "reference of 3000 rows" in published.stdout
    reference = env.store.read_manifest("churn", 1).reference
    assert reference is not None
    assert [(f.name, f.kind) for f in reference.features] == [
        ("city", "categorical"),
        ("age", "numeric"),
        ("income", "numeric"),
        ("tenure", "numeric"),
    ]
    city = reference.features[0]
    assert city.labels() == [*sorted(CITIES), OTHER, MISSING]
    assert city.proportions[city.categories.index("kyiv")] == pytest.approx(0.1, abs=0.02)

    # Given live rows by name through the real broker, 20 rows a job, and a draining worker
    rows = live_rows(np.random.default_rng(5), 2000)
    table = read_table(env.store, "churn", "latest")
    env.submit([job_from_rows(table, rows[i : i + 20]) for i in range(0, len(rows), 20)])
    counters = env.drain()
    assert counters.succeeded == 100

    # When drift is read
    shown = env.inferq("monitor", "drift", "churn", "--json")

    # Then the text column and the shifted number drifted, the other columns did not
    assert shown.returncode == 0, shown.stderr
    report = orjson.loads(shown.stdout)
    assert report["rows"] == 2000
    status = {f["name"]: f["status"] for f in report["features"]}
    assert status == {"city": "drift", "age": "ok", "income": "drift", "tenure": "ok"}
    by_name = {f["name"]: f for f in report["features"]}
    assert by_name["city"]["n"] == 2000 and by_name["city"]["psi"] > 0.5 and by_name["city"]["p_value"] < 1e-12
    assert by_name["age"]["p_value"] > 1e-4 and by_name["tenure"]["p_value"] > 1e-4
    assert [o["name"] for o in report["outputs"]] == ["label", "probabilities[0]", "probabilities[1]"]
    # and every city landed in its bin: unseen ones in OTHER, empty ones in MISSING
    monitoring = open_monitor_store(env.result_store_at)
    try:
        counts = dict(zip(city.labels(), monitoring.totals("churn", 1).inputs[0], strict=True))
    finally:
        monitoring.close()
    for value in CITIES:
        assert counts[value] == sum(r["city"] == value for r in rows)
    assert counts[OTHER] == sum(r["city"] == "tokyo" for r in rows) > 0
    assert counts[MISSING] == sum(r["city"] == "" for r in rows) > 0
    table_text = env.inferq("monitor", "drift", "churn", "--min-rows", "100").stdout.splitlines()
    assert any(line.split()[2:3] == ["city"] and line.endswith("drift") for line in table_text)


def test_a_reference_by_name_from_jsonl_matches_the_csv(churn: tuple[Env, Path, Path]) -> None:
    env, model, train = churn
    exported = load_model_file(model)
    assert exported.columns is not None
    with train.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    jsonl = train.with_suffix(".jsonl")
    jsonl.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))

    from_csv = read_reference(train, exported.columns)
    from_jsonl = read_reference_table(jsonl, exported.columns)
    assert isinstance(from_csv, ReferenceTable) and from_csv.rows == from_jsonl.rows == 3000
    first = publish(env.store, "churn", exported.onnx, columns=exported.columns, reference=from_csv)
    second = publish(env.store, "churn", exported.onnx, columns=exported.columns, reference=from_jsonl)
    assert first.reference == second.reference


def test_a_reference_without_a_column_the_model_reads_or_not_utf8_is_one_line_and_publishes_nothing(
    churn: tuple[Env, Path, Path],
) -> None:
    env, model, train = churn
    no_income = train.with_name("no_income.csv")
    no_income.write_text("city,age,tenure\nrome,30,2\n")
    no_income_jsonl = train.with_name("no_income.jsonl")
    no_income_jsonl.write_text('{"city": "rome", "age": 30, "tenure": 2}\n')
    latin1 = train.with_name("latin1.csv")
    latin1.write_bytes("city,age,income,tenure\nrome,30,40,2\nm\xe1laga,31,41,3\n".encode("latin-1"))
    bad_number = train.with_name("bad_number.csv")
    bad_number.write_text("city,age,income,tenure\nrome,30,40,2\noslo,old,41,3\n")

    errors = []
    for data in (no_income, no_income_jsonl, latin1, bad_number):
        done = env.inferq("models", "publish", "churn", str(model), "--reference", str(data))
        assert done.returncode == 1 and done.stdout == "" and done.stderr.count("\n") == 1, done.stderr
        errors.append(done.stderr.strip())

    assert errors == [
        f"inferq: error: --reference {no_income}: no column 'income', which the model reads "
        "(city, age, income, tenure)",
        f"inferq: error: --reference {no_income_jsonl}: no row has column 'income', which the model reads "
        "(city, age, income, tenure)",
        f"inferq: error: --reference {latin1}:3: not UTF-8 text (save the file as UTF-8)",
        f"inferq: error: --reference {bad_number}:3: column 'age': 'old' is not a number",
    ]
    assert env.store.list_models() == [] or env.store.list_versions("churn") == []


def test_a_model_over_named_numbers_in_one_input_reads_its_reference_by_name(env: Env, tmp_path: Path) -> None:
    # Given a regression fitted on named columns (one 2-D input) and its rows in a CSV of another order
    rng = np.random.default_rng(3)
    frame = pd.DataFrame({"rooms": rng.integers(1, 8, 500).astype(float), "area": rng.normal(80, 20, 500)})
    joblib.dump(LogisticRegression().fit(frame, frame["area"] > 80), tmp_path / "named.joblib")
    exported = load_model_file(tmp_path / "named.joblib")
    assert exported.columns is not None and {c.input for c in exported.columns} == {"X"}
    data = tmp_path / "rows.csv"
    frame[["area", "rooms"]].assign(note="x").to_csv(data, index=False)

    manifest = publish(
        env.store, "named", exported.onnx, columns=exported.columns, reference=read_reference(data, exported.columns)
    )

    # Then each column is the feature of its name, binned from its own values
    assert manifest.reference is not None
    rooms, area = manifest.reference.features
    assert (rooms.name, rooms.tensor, rooms.column, area.name, area.column) == ("rooms", "X", 0, "area", 1)
    assert sorted(set(rooms.edges)) == rooms.edges and rooms.edges[0] >= 1 and rooms.edges[-1] <= 7
    assert 60 < area.edges[len(area.edges) // 2] < 100

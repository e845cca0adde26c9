"""Publishing a scikit-learn model derives its ONNX inputs from what scikit-learn knows, or refuses in one line."""

from __future__ import annotations

import pickle
from pathlib import Path

import joblib
import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import GradientBoostingRegressor
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import OneHotEncoder, SplineTransformer, StandardScaler

from inferq.model_store.base import publish
from inferq.model_store.local import LocalModelStore
from inferq.model_store.model_file import ExportError, load_model_file
from inferq.shared.contract.messages import Datatype
from inferq.shared.errors import ModelLoadError
from inferq.shared.tables.table import Column


def _frame(rows: int = 120) -> pd.DataFrame:
    rng = np.random.default_rng(3)
    return pd.DataFrame(
        {
            "city": rng.choice(["rome", "oslo", "lima"], rows),
            "age": rng.integers(18, 80, rows),
            "zone": rng.integers(1, 4, rows),
            "income": rng.normal(50, 10, rows),
            "note": rng.normal(size=rows),  # dropped by the pipeline
        }
    )


def _dump(tmp_path: Path, model: object, name: str = "model.joblib") -> Path:
    path = tmp_path / name
    joblib.dump(model, path)
    return path


def test_a_column_transformer_pipeline_gets_one_typed_input_per_column_it_uses(tmp_path: Path) -> None:
    frame = _frame()
    prep = ColumnTransformer(
        [
            ("num", StandardScaler(), ["age", "income"]),
            ("cat", OneHotEncoder(handle_unknown="ignore"), ["city", "zone"]),
        ]
    )
    pipeline = Pipeline([("prep", prep), ("clf", LogisticRegression())]).fit(frame, frame["age"] > 40)

    exported = load_model_file(_dump(tmp_path, pipeline))

    assert [(c.name, c.datatype, c.input) for c in exported.columns or []] == [
        ("city", Datatype.BYTES, "city"),
        ("age", Datatype.FP32, "age"),
        ("zone", Datatype.INT64, "zone"),
        ("income", Datatype.FP32, "income"),
    ]
    session = ort.InferenceSession(exported.onnx)
    rows = frame.head(5)
    feeds = {
        "city": rows[["city"]].to_numpy(dtype=object),
        "age": rows[["age"]].to_numpy(dtype=np.float32),
        "zone": rows[["zone"]].to_numpy(dtype=np.int64),
        "income": rows[["income"]].to_numpy(dtype=np.float32),
    }
    _labels, probabilities = session.run(None, feeds)
    np.testing.assert_allclose(probabilities, pipeline.predict_proba(rows), atol=1e-5)


def test_an_estimator_fitted_on_named_numbers_keeps_one_input_and_records_the_names(tmp_path: Path) -> None:
    frame = _frame()
    model = GradientBoostingRegressor(n_estimators=5).fit(frame[["age", "income"]], frame["income"])

    exported = load_model_file(_dump(tmp_path, model))

    assert exported.columns == [
        Column(name="age", datatype=Datatype.FP32, input="X"),
        Column(name="income", datatype=Datatype.FP32, input="X"),
    ]
    assert [i.shape for i in ort.InferenceSession(exported.onnx).get_inputs()] == [[None, 2]]


def test_an_estimator_fitted_without_names_is_published_as_before_or_named_by_a_sample(tmp_path: Path) -> None:
    frame = _frame()
    model = GradientBoostingRegressor(n_estimators=5).fit(frame[["age", "income"]].to_numpy(), frame["income"])
    path = _dump(tmp_path, model)
    assert load_model_file(path).columns is None

    sample = tmp_path / "sample.csv"
    sample.write_text("age,income\n61,50.5\n30,41\n")
    assert [c.name for c in load_model_file(path, sample=sample).columns or []] == ["age", "income"]

    sample.write_text("age,income,target\n61,50.5,1\n")
    with pytest.raises(ExportError, match=r"the sample has 3 columns \(age, income, target\) but the model takes 2"):
        load_model_file(path, sample=sample)
    sample.write_text("age,income\nold,50.5\n")
    with pytest.raises(ExportError, match="column 'age' holds text, but GradientBoostingRegressor takes numbers only"):
        load_model_file(path, sample=sample)


def test_a_sample_tells_text_columns_of_a_transformer_fitted_on_positions(tmp_path: Path) -> None:
    matrix = _frame()[["city", "age"]].to_numpy(dtype=object)
    prep = ColumnTransformer([("cat", OneHotEncoder(), [0]), ("num", "passthrough", [1])])
    pipeline = make_pipeline(prep, LogisticRegression()).fit(matrix, matrix[:, 1] > 40)
    sample = tmp_path / "sample.jsonl"
    sample.write_text('{"city": "rome", "age": 61}\n')

    exported = load_model_file(_dump(tmp_path, pipeline), sample=sample)

    assert [(c.name, c.datatype) for c in exported.columns or []] == [("city", Datatype.BYTES), ("age", Datatype.FP32)]


def test_a_standard_scaler_step_or_a_transformer_alone_is_published(tmp_path: Path) -> None:
    frame = _frame()[["age", "income"]]
    scaler = StandardScaler().fit(frame)
    exported = load_model_file(_dump(tmp_path, make_pipeline(scaler), "scaler.pkl"))
    (output,) = ort.InferenceSession(exported.onnx).run(None, {"X": frame.head(3).to_numpy(dtype=np.float32)})
    np.testing.assert_allclose(output, scaler.transform(frame.head(3)), atol=1e-5)
    assert load_model_file(_dump(tmp_path, scaler, "scaler.pickle")).source == "sklearn:StandardScaler"


def test_a_step_skl2onnx_cannot_convert_is_named_in_the_refusal(tmp_path: Path) -> None:
    frame = _frame()
    pipeline = Pipeline([("spline", SplineTransformer()), ("fit", LinearRegression())])
    pipeline.fit(frame[["age"]], frame["income"])
    with pytest.raises(ExportError) as caught:
        load_model_file(_dump(tmp_path, pipeline))
    assert str(caught.value) == (
        "skl2onnx cannot convert step 'spline' (SplineTransformer): it has no converter for SplineTransformer"
    )


def test_a_step_whose_conversion_fails_is_named_with_skl2onnxs_reason(tmp_path: Path) -> None:
    frame = _frame()
    prep = ColumnTransformer([("num", StandardScaler(), ["age"]), ("cat", OneHotEncoder(), ["city"])])
    pipeline = Pipeline([("prep", prep), ("clf", LogisticRegression())]).fit(frame, frame["age"] > 40)
    sample = tmp_path / "sample.csv"
    sample.write_text("city,age\nrome,old\n")  # says 'age' is text, which StandardScaler cannot take
    with pytest.raises(ExportError) as caught:
        load_model_file(_dump(tmp_path, pipeline), sample=sample)
    message = str(caught.value)
    assert message.startswith("skl2onnx cannot convert step 'prep > num' (StandardScaler): Operator SklearnScaler")
    assert "wrong type" in message and "\n" not in message


def test_only_onnx_and_pickle_extensions_are_opened(tmp_path: Path) -> None:
    trap = tmp_path / "data.csv"
    trap.write_bytes(pickle.dumps(StandardScaler()))  # a pickle in disguise is never unpickled
    with pytest.raises(ExportError, match=r"data.csv: publish an .onnx file or a scikit-learn model saved as"):
        load_model_file(trap)


def test_a_manifest_refuses_columns_that_do_not_feed_the_graph(tmp_path: Path) -> None:
    frame = _frame()
    model = GradientBoostingRegressor(n_estimators=5).fit(frame[["age", "income"]], frame["income"])
    exported = load_model_file(_dump(tmp_path, model))
    store = LocalModelStore(tmp_path / "models")
    one_short = [Column(name="age", datatype=Datatype.FP32, input="X")]
    with pytest.raises(ModelLoadError, match=r"input 'X' of shape \[None, 2\] cannot take 1 column"):
        publish(store, "gbr", exported.onnx, columns=one_short)
    manifest = publish(store, "gbr", exported.onnx, columns=exported.columns)
    assert store.read_manifest("gbr", manifest.version).columns == exported.columns


def test_an_onnx_file_with_one_input_per_column_records_them(tmp_path: Path) -> None:
    frame = _frame()
    prep = ColumnTransformer([("num", StandardScaler(), ["age"]), ("cat", OneHotEncoder(), ["city"])])
    pipeline = Pipeline([("prep", prep), ("clf", LogisticRegression())]).fit(frame, frame["age"] > 40)
    onnx_file = tmp_path / "mixed.onnx"
    onnx_file.write_bytes(load_model_file(_dump(tmp_path, pipeline)).onnx)
    assert [(c.name, c.datatype) for c in load_model_file(onnx_file).columns or []] == [
        ("city", Datatype.BYTES),
        ("age", Datatype.FP32),
    ]


def test_a_classifier_at_the_end_of_nested_pipelines_gives_plain_probabilities(tmp_path: Path) -> None:
    frame = _frame()[["age", "income"]]
    inner = Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression())])
    pipeline = Pipeline([("first", StandardScaler()), ("model", inner)]).fit(frame, frame["age"] > 40)
    session = ort.InferenceSession(load_model_file(_dump(tmp_path, pipeline)).onnx)
    _labels, probabilities = session.run(None, {"X": frame.head(3).to_numpy(dtype=np.float32)})
    np.testing.assert_allclose(probabilities, pipeline.predict_proba(frame.head(3)), atol=1e-5)

"""The benchmark's workload: three scikit-learn models exported with skl2onnx, and 1-row jobs for them.

Two random forests (100 trees, depth 8; 20 and 4 features) and a logistic regression (12 features), so a
worker holds three models, as the memory target asks. Jobs go round-robin over the models; each is the
exact JSON the inferq producer publishes (a :class:`Job` with one KServe FP32 tensor).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.datasets import make_classification
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression

from inferq.model_store.base import publish
from inferq.model_store.convert import INPUT_NAME, estimator_to_onnx, framework_versions
from inferq.model_store.local import LocalModelStore
from inferq.shared.contract.messages import Datatype, Job, Tensor

SEED = 7
ROWS_PER_MODEL = 512
"""Distinct input rows per model; jobs cycle through them."""
_ID_PLACEHOLDER = "ID-PLACEHOLDER-0000000000"


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One benchmark model: its name, kind and input width."""

    name: str
    kind: str
    features: int

    def estimator(self) -> Any:
        """An untrained scikit-learn estimator of this kind."""
        if self.kind == "forest":
            return RandomForestClassifier(n_estimators=100, max_depth=8, random_state=SEED, n_jobs=1)
        return LogisticRegression(max_iter=1000)


MODELS = (
    ModelSpec("forest-20", "forest", 20),
    ModelSpec("forest-4", "forest", 4),
    ModelSpec("logistic-12", "logistic", 12),
)


def publish_models(model_store: Path) -> None:
    """Train every model and publish it as version 1 into the local model store at ``model_store``."""
    store = LocalModelStore(model_store)
    for spec in MODELS:
        if store.list_versions(spec.name):
            continue
        x, y = make_classification(
            n_samples=4000, n_features=spec.features, n_informative=2, n_redundant=1, random_state=SEED
        )
        fitted = spec.estimator().fit(x, y)
        data = estimator_to_onnx(fitted, spec.features)
        # The training rows as reference: the workers count drift for every job (what it costs is measured
        # against workers with INFERQ_MONITOR=false).
        reference = (x, [f"f{i}" for i in range(spec.features)])
        publish(
            store,
            spec.name,
            data,
            source=f"sklearn:{type(fitted).__name__}",
            framework=framework_versions(),
            reference=reference,
        )


class Jobs:
    """Job bodies, built once per model from the real :class:`Job` model and stamped with ids."""

    def __init__(self) -> None:
        rng = np.random.default_rng(SEED)
        self._templates: list[list[tuple[bytes, bytes]]] = []
        for spec in MODELS:
            rows = np.round(rng.normal(size=(ROWS_PER_MODEL, spec.features)), 4)
            self._templates.append([_template(spec, row) for row in rows])

    def body(self, index: int, job_id: str) -> bytes:
        """The body of job number ``index`` (round-robin over the models) with id ``job_id``."""
        templates = self._templates[index % len(self._templates)]
        head, tail = templates[(index // len(self._templates)) % len(templates)]
        return head + job_id.encode() + tail


def _template(spec: ModelSpec, row: np.ndarray[Any, Any]) -> tuple[bytes, bytes]:
    tensor = Tensor(name=INPUT_NAME, shape=[1, spec.features], datatype=Datatype.FP32, data=row.tolist())
    body = Job(id=_ID_PLACEHOLDER, model=spec.name, inputs=[tensor]).model_dump_json(exclude_none=True).encode()
    head, tail = body.split(_ID_PLACEHOLDER.encode())
    return head, tail


TABULAR_MODEL = "tabular-7"
TABULAR_TEXT = {"city": 30, "plan": 4}
"""Text columns of the tabular model and how many distinct values each takes (more than 20: OTHER is used)."""
TABULAR_NUMBERS = ("age", "income", "tenure", "visits", "spend")


def _tabular_frame(rng: np.random.Generator, size: int) -> Any:
    pd: Any = importlib.import_module("pandas")  # a test dependency, untyped; only this workload needs it

    columns: dict[str, Any] = {
        name: [f"{name}-{v:02d}" for v in rng.zipf(1.6, size) % values] for name, values in TABULAR_TEXT.items()
    }
    columns.update({name: np.round(rng.normal(50, 15, size), 3) for name in TABULAR_NUMBERS})
    return pd.DataFrame(columns)


def publish_tabular(model_store: Path) -> None:
    """A pipeline over named columns (two text columns one-hot encoded, five numbers scaled, a logistic
    regression), published as version 1 of ``tabular-7`` with one input per column and its training rows
    by name as reference."""
    from sklearn.compose import ColumnTransformer  # noqa: PLC0415
    from sklearn.pipeline import Pipeline  # noqa: PLC0415
    from sklearn.preprocessing import OneHotEncoder, StandardScaler  # noqa: PLC0415

    from inferq.model_store.convert import export_estimator  # noqa: PLC0415
    from inferq.monitoring.reference import ReferenceTable  # noqa: PLC0415

    store = LocalModelStore(model_store)
    if store.list_versions(TABULAR_MODEL):
        return
    frame = _tabular_frame(np.random.default_rng(SEED), 4000)
    label = (frame["income"] > 50) ^ (frame["city"] == "city-01")
    prep = ColumnTransformer(
        [
            ("num", StandardScaler(), list(TABULAR_NUMBERS)),
            ("cat", OneHotEncoder(handle_unknown="ignore"), list(TABULAR_TEXT)),
        ]
    )
    pipeline = Pipeline([("prep", prep), ("clf", LogisticRegression(max_iter=1000))]).fit(frame, label)
    data, columns = export_estimator(pipeline, None, None)
    assert columns is not None
    values = [frame[c.name].to_numpy(dtype=object if c.datatype is Datatype.BYTES else np.float64) for c in columns]
    publish(
        store,
        TABULAR_MODEL,
        data,
        source="sklearn:Pipeline",
        framework=framework_versions(),
        columns=columns,
        reference=ReferenceTable(columns, values),
    )


class TabularJobs(Jobs):
    """1-row jobs for ``tabular-7``: one ``[1, 1]`` tensor per column, as the inferq producer sends a row."""

    def __init__(self) -> None:
        frame = _tabular_frame(np.random.default_rng(SEED + 1), ROWS_PER_MODEL)
        templates = []
        for row in frame.to_dict("records"):
            tensors = [
                Tensor(
                    name=name,
                    shape=[1, 1],
                    datatype=Datatype.BYTES if name in TABULAR_TEXT else Datatype.FP32,
                    data=[value],
                )
                for name, value in row.items()
            ]
            body = Job(id=_ID_PLACEHOLDER, model=TABULAR_MODEL, inputs=tensors).model_dump_json(exclude_none=True)
            head, tail = body.encode().split(_ID_PLACEHOLDER.encode())
            templates.append((head, tail))
        self._templates = [templates]

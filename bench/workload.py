"""The benchmark's workload: three scikit-learn models exported with skl2onnx, and 1-row jobs for them.

Two random forests (100 trees, depth 8; 20 and 4 features) and a logistic regression (12 features), so a
worker holds three models, as the memory target asks. Jobs go round-robin over the models; each is the
exact JSON the inferq producer publishes (a :class:`Job` with one KServe FP32 tensor).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.datasets import make_classification
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression

from model_store.base import publish
from model_store.export import INPUT_NAME, estimator_to_onnx, framework_versions
from model_store.local import LocalModelStore
from shared.messages import Datatype, Job, Tensor

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

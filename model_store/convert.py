"""Turning scikit-learn estimators into ONNX with skl2onnx, as the store expects them (the sklearn extra).

NOTE: unpickling runs code from the file: publish only pickles you trust, as with any pickle.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import joblib
import sklearn
from skl2onnx import __version__ as skl2onnx_version
from skl2onnx import convert_sklearn
from skl2onnx._supported_operators import sklearn_operator_name_map
from skl2onnx.common.data_types import (
    BooleanTensorType,
    DoubleTensorType,
    FloatTensorType,
    Int64TensorType,
    StringTensorType,
)
from sklearn.base import is_classifier

from inferq.model_store.input_plan import MATRIX_INPUT, InputPlan, plan_inputs, read_sample
from inferq.model_store.model_file import Exported, ExportError
from inferq.shared.contract.messages import Datatype
from inferq.shared.tables.table import Column

INPUT_NAME = MATRIX_INPUT
MAX_REASON_CHARS = 300
_TENSOR_TYPES = {
    Datatype.FP32: FloatTensorType,
    Datatype.FP64: DoubleTensorType,
    Datatype.INT64: Int64TensorType,
    Datatype.BOOL: BooleanTensorType,
    Datatype.BYTES: StringTensorType,
}

__all__ = ["INPUT_NAME", "ExportError", "estimator_to_onnx", "framework_versions", "load_pickle"]


def framework_versions() -> dict[str, str]:
    """Versions recorded in manifests of converted models."""
    return {"scikit-learn": sklearn.__version__, "skl2onnx": skl2onnx_version}


def estimator_to_onnx(estimator: Any, n_features: int | None = None, *, double: bool = False) -> bytes:
    """Convert a fitted estimator or pipeline that takes one 2-D input of numbers (``X``)."""
    features = n_features or getattr(estimator, "n_features_in_", None)
    if not features:
        raise ExportError("cannot tell the number of input features: pass --n-features")
    tensor_type = DoubleTensorType if double else FloatTensorType
    return _convert(estimator, [(INPUT_NAME, tensor_type([None, int(features)]))])


def export_estimator(
    estimator: Any, n_features: int | None = None, sample: list[dict[str, Any]] | None = None
) -> tuple[bytes, list[Column] | None]:
    """Convert a fitted estimator or pipeline with the inputs it takes (see :mod:`inferq.model_store.input_plan`):
    the ONNX bytes and the named columns it reads (``None`` when no names are known)."""
    plan: InputPlan = plan_inputs(estimator, n_features, sample)
    if plan.per_column and plan.columns is not None:
        types = [(c.name, _TENSOR_TYPES[c.datatype]([None, 1])) for c in plan.columns]
        return _convert(estimator, types), plan.columns
    return _convert(estimator, [(INPUT_NAME, FloatTensorType([None, plan.width]))]), plan.columns


def _convert(estimator: Any, initial_types: list[tuple[str, Any]]) -> bytes:
    """skl2onnx with classifiers giving plain tensors (``zipmap`` off); a refusal names the step."""
    steps = dict(_steps(estimator))
    for step, path in steps.values():
        if type(step) not in sklearn_operator_name_map:
            raise ExportError(f"skl2onnx cannot convert step {path}: it has no converter for {type(step).__name__}")
    final = estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator
    options = {id(final): {"zipmap": False}} if is_classifier(final) else None
    try:
        onx = convert_sklearn(estimator, initial_types=initial_types, options=options)
    except Exception as exc:  # skl2onnx raises a variety of errors for what it cannot convert
        where = _failing_step(exc.__traceback__, steps) or type(estimator).__name__
        raise ExportError(f"skl2onnx cannot convert step {where}: {_one_line(exc)}") from None
    data: bytes = onx.SerializeToString()
    return data


def _steps(estimator: Any, path: str | None = None) -> Iterator[tuple[int, tuple[Any, str]]]:
    """``id → (estimator, label)`` for a model and every step of its pipelines, column transformers and
    unions; a label reads ``'prep > cat > onehotencoder' (OneHotEncoder)``."""
    kind = type(estimator).__name__
    yield id(estimator), (estimator, f"{path!r} ({kind})" if path else kind)
    for name, child in _children(estimator):
        if not isinstance(child, str) and child is not None:
            yield from _steps(child, f"{path} > {name}" if path else name)


def _children(estimator: Any) -> list[tuple[str, Any]]:
    if hasattr(estimator, "steps"):
        return [(n, s) for n, s in estimator.steps]
    if hasattr(estimator, "transformers_"):
        return [(n, s) for n, s, _ in estimator.transformers_]
    if hasattr(estimator, "transformer_list"):
        return [(n, s) for n, s in estimator.transformer_list]
    return []


def _failing_step(tb: TracebackType | None, steps: dict[int, tuple[Any, str]]) -> str | None:
    """The innermost step skl2onnx was parsing or converting when it raised: its converters and parsers
    hold the scikit-learn object as ``operator.raw_operator`` or ``model``."""
    found = None
    while tb is not None:
        scope = tb.tb_frame.f_locals
        for candidate in (getattr(scope.get("operator"), "raw_operator", None), scope.get("model")):
            if candidate is not None and id(candidate) in steps:
                found = steps[id(candidate)][1]
        tb = tb.tb_next
    return found


def _one_line(exc: Exception) -> str:
    text = re.sub(r"\s+", " ", str(exc)).strip() or type(exc).__name__
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"


def load_pickle(path: Path, n_features: int | None = None, sample: Path | None = None) -> Exported:
    """The ONNX model of a pickled or joblib scikit-learn estimator or pipeline, with the columns it reads.

    NOTE: unpickling runs code from the file: publish pickles you trust, as with any pickle."""
    try:
        estimator = joblib.load(path)
    except Exception as exc:  # a pickle can fail in many ways
        raise ExportError(f"{path}: not a loadable scikit-learn pickle ({_one_line(exc)})") from None
    if not (hasattr(estimator, "fit") and (hasattr(estimator, "predict") or hasattr(estimator, "transform"))):
        raise ExportError(f"{path}: holds a {type(estimator).__name__}, not a scikit-learn estimator or pipeline")
    rows = read_sample(sample) if sample is not None else None
    data, columns = export_estimator(estimator, n_features, rows)
    return Exported(data, f"sklearn:{type(estimator).__name__}", columns)

"""Turning scikit-learn estimators into ONNX with skl2onnx, as the store expects them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import joblib
import sklearn
from skl2onnx import __version__ as skl2onnx_version
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import DoubleTensorType, FloatTensorType
from sklearn.base import is_classifier

from shared.errors import InferqError

INPUT_NAME = "X"


class ExportError(InferqError):
    """The file could not be turned into an ONNX model."""


def framework_versions() -> dict[str, str]:
    """Versions recorded in manifests of converted models."""
    return {"scikit-learn": sklearn.__version__, "skl2onnx": skl2onnx_version}


def estimator_to_onnx(estimator: Any, n_features: int | None = None, *, double: bool = False) -> bytes:
    """Convert a fitted estimator or pipeline; classifiers output plain tensors (``zipmap`` off)."""
    features = n_features or getattr(estimator, "n_features_in_", None)
    if not features:
        raise ExportError("cannot tell the number of input features: pass --n-features")
    tensor_type = DoubleTensorType if double else FloatTensorType
    final = estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator
    options = {id(final): {"zipmap": False}} if is_classifier(final) else None
    try:
        onx = convert_sklearn(
            estimator, initial_types=[(INPUT_NAME, tensor_type([None, int(features)]))], options=options
        )
    except Exception as exc:  # skl2onnx raises a variety of errors for unsupported estimators
        raise ExportError(f"skl2onnx cannot convert {type(estimator).__name__}: {exc}") from None
    data: bytes = onx.SerializeToString()
    return data


def load_model_file(path: Path, n_features: int | None = None) -> tuple[bytes, str]:
    """ONNX bytes and a source tag for a ``.onnx`` file or a pickled/joblib scikit-learn estimator.

    NOTE: unpickling runs code from the file: publish pickles you trust, as with any pickle.
    """
    if not path.is_file():
        raise ExportError(f"{path}: no such file")
    if path.suffix == ".onnx":
        return path.read_bytes(), "onnx"
    try:
        estimator = joblib.load(path)
    except Exception as exc:  # a pickle can fail in many ways
        raise ExportError(f"{path}: neither .onnx nor a loadable scikit-learn pickle ({exc})") from None
    if not hasattr(estimator, "predict"):
        raise ExportError(f"{path}: holds a {type(estimator).__name__}, not a scikit-learn estimator")
    return estimator_to_onnx(estimator, n_features), f"sklearn:{type(estimator).__name__}"

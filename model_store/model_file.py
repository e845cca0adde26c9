"""What ``inferq models publish`` reads: an ``.onnx`` file as it is, with the named columns its inputs
show, or a scikit-learn model saved as ``.joblib``, ``.pkl`` or ``.pickle``, converted by
:mod:`inferq.model_store.convert` (the sklearn extra, imported only for such a file).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx

from inferq.model_store.manifest import datatype_of_elem
from inferq.shared.errors import InferqError
from inferq.shared.extras import SKLEARN, needs_extra
from inferq.shared.tables.table import Column

PICKLE_SUFFIXES = frozenset({".joblib", ".pkl", ".pickle"})


class ExportError(InferqError):
    """The file could not be turned into an ONNX model."""


@dataclass(frozen=True, slots=True)
class Exported:
    """A model file ready to publish: ONNX bytes, where they came from, and the columns it reads (if named)."""

    onnx: bytes
    source: str
    columns: list[Column] | None


def load_model_file(path: Path, n_features: int | None = None, sample: Path | None = None) -> Exported:
    """What to publish for a ``.onnx`` file or a pickled/joblib scikit-learn estimator or pipeline.

    NOTE: unpickling runs code from the file: publish pickles you trust, as with any pickle."""
    if not path.is_file():
        raise ExportError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        if sample is not None:
            raise ExportError("--sample applies to scikit-learn pickles; an .onnx file keeps its own inputs")
        data = path.read_bytes()
        return Exported(data, "onnx", onnx_columns(data))
    if suffix not in PICKLE_SUFFIXES:
        raise ExportError(f"{path}: publish an .onnx file or a scikit-learn model saved as .joblib, .pkl or .pickle")
    with needs_extra(SKLEARN, "publishing a scikit-learn model"):
        from inferq.model_store.convert import load_pickle  # noqa: PLC0415  (scikit-learn: seconds to import)
    return load_pickle(path, n_features, sample)


def onnx_columns(data: bytes) -> list[Column] | None:
    """Named columns of an ONNX model built with one ``[N, 1]`` input per column (as skl2onnx does for a
    table); ``None`` for anything else, which keeps taking its inputs as tensors or rows by position."""
    try:
        graph = onnx.load_model_from_string(data).graph
    except Exception:  # not ONNX: build_manifest reports it
        return None
    initializers = {i.name for i in graph.initializer}
    inputs = [v for v in graph.input if v.name not in initializers]
    if len(inputs) < 2:
        return None
    columns = []
    for value in inputs:
        dims = value.type.tensor_type.shape.dim
        if len(dims) != 2 or not dims[1].HasField("dim_value") or dims[1].dim_value != 1:
            return None
        datatype = datatype_of_elem(value.type.tensor_type.elem_type)
        columns.append(Column(name=value.name, datatype=datatype, input=value.name))
    return columns

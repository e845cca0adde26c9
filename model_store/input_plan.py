"""Which columns a fitted scikit-learn estimator reads, and the type each needs, for its ONNX inputs.

What scikit-learn knows comes first: the column names it was fitted on (``feature_names_in_``), the
columns a ``ColumnTransformer`` routes to each transformer, and the categories an encoder learned
(strings or integers). A sample of training rows (``--sample``) names the columns of an estimator
fitted without names, and tells string columns from numbers where the pipeline cannot.

A pipeline that starts with a ``ColumnTransformer`` over named columns gets one ONNX input per column
it uses (numbers as FP32, integer categories as INT64, strings as BYTES); anything else really takes
one 2-D input of numbers, whose columns are recorded by name when they are known.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from inferq.model_store.model_file import ExportError
from inferq.shared.contract.messages import Datatype
from inferq.shared.tables.rowfile import read_records
from inferq.shared.tables.table import Column

MATRIX_INPUT = "X"
SAMPLE_ROWS = 1000


@dataclass(frozen=True, slots=True)
class InputPlan:
    """The ONNX inputs to convert with: named ``columns`` (``None`` when no names are known), one input
    per column or, when ``per_column`` is false, one 2-D input of ``width`` numbers."""

    columns: list[Column] | None
    per_column: bool
    width: int


def plan_inputs(
    estimator: Any, n_features: int | None = None, sample: Sequence[dict[str, Any]] | None = None
) -> InputPlan:
    """The inputs ``estimator`` takes, from what it knows and an optional sample of training rows."""
    names = _fitted_names(estimator)
    if names is None and sample is not None:
        names = list(sample[0])
    width = n_features or getattr(estimator, "n_features_in_", None) or (len(names) if names else None)
    if not width:
        raise ExportError("cannot tell the number of input features: pass --n-features or --sample")
    if names is not None and len(names) != width:
        raise ExportError(
            f"the sample has {len(names)} columns ({', '.join(names)}) but the model takes {width} features: "
            "keep only the feature columns, in training order"
        )
    transformer = _front(estimator)
    if names is None:
        return InputPlan(None, per_column=False, width=int(width))
    if not _is_column_transformer(transformer):
        strings = _sample_strings(names, sample)
        if strings:
            raise ExportError(
                f"column {strings[0]!r} holds text, but {type(transformer).__name__} takes numbers only: "
                "encode it in the pipeline (a ColumnTransformer with a OneHotEncoder)"
            )
        columns = [Column(name=n, datatype=Datatype.FP32, input=MATRIX_INPUT) for n in names]
        return InputPlan(columns, per_column=False, width=int(width))
    hints, used = _routed_types(transformer, names)
    strings = _sample_strings([n for n in names if n in used], sample)  # a dropped column need not be there
    columns = [
        Column(name=n, datatype=hints.get(n) or (Datatype.BYTES if n in strings else Datatype.FP32), input=n)
        for n in names
        if n in used
    ]
    if not columns:
        raise ExportError("the ColumnTransformer uses none of the columns")
    return InputPlan(columns, per_column=True, width=len(columns))


def read_sample(path: Any) -> list[dict[str, Any]]:
    """Up to ``SAMPLE_ROWS`` rows of a CSV or JSONL sample file, as objects by column name."""
    rows: list[dict[str, Any]] = []
    for record in read_records(path):
        if not isinstance(record.values, dict):
            raise ExportError(f"{path}:{record.line}: --sample rows must be objects with column names")
        rows.append(record.values)
        if len(rows) == SAMPLE_ROWS:
            break
    if not rows:
        raise ExportError(f"{path}: the sample holds no rows")
    return rows


def _fitted_names(estimator: Any) -> list[str] | None:
    names = getattr(estimator, "feature_names_in_", None)
    if names is None:
        names = getattr(_front(estimator), "feature_names_in_", None)
    return None if names is None else [str(n) for n in names]


def _front(estimator: Any) -> Any:
    """The first step that sees the raw columns (through nested pipelines)."""
    while hasattr(estimator, "steps") and estimator.steps:
        estimator = estimator.steps[0][1]
    return estimator


def _is_column_transformer(estimator: Any) -> bool:
    return hasattr(estimator, "transformers_")


def _sample_strings(names: list[str], sample: Sequence[dict[str, Any]] | None) -> list[str]:
    """Columns of ``names`` whose sample values include text that is not a number."""
    if sample is None:
        return []
    for name in names:
        if name not in sample[0]:
            raise ExportError(f"the sample has no column {name!r}, which the model reads")
    return [n for n in names if any(_is_text(row.get(n)) for row in sample)]


def _is_text(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        float(value)
    except ValueError:
        return value.strip() != ""
    return False


def _routed_types(transformer: Any, names: list[str]) -> tuple[dict[str, Datatype], set[str]]:
    """For a fitted ColumnTransformer: the type each column must have where an encoder tells it, and
    the columns that some transformer uses (a dropped column needs no input)."""
    hints: dict[str, Datatype] = {}
    used: set[str] = set()
    for _name, step, selected in transformer.transformers_:
        if isinstance(step, str) and step == "drop":
            continue
        routed = _column_names(selected, names)
        used.update(routed)
        for column, datatype in zip(routed, _step_types(step, len(routed)), strict=True):
            if datatype is not None:
                hints.setdefault(column, datatype)
    return hints, used


def _column_names(selected: Any, names: list[str]) -> list[str]:
    """The names of the columns a ColumnTransformer entry selects (names, positions, a mask or a slice)."""
    if isinstance(selected, str | int):
        selected = [selected]
    if isinstance(selected, slice):
        return names[selected]
    items = list(selected)
    if items and all(isinstance(i, bool | np.bool_) for i in items):
        return [n for n, keep in zip(names, items, strict=True) if keep]
    return [names[int(i)] if isinstance(i, int | np.integer) else str(i) for i in items]


def _step_types(step: Any, count: int) -> list[Datatype | None]:
    """What a transformer's first informative step says of its input columns' types."""
    steps = [s for _, s in step.steps] if hasattr(step, "steps") else [step]
    for inner in steps:
        categories = getattr(inner, "categories_", None)
        if isinstance(categories, list) and len(categories) == count:
            return [_datatype_of(np.asarray(c).dtype) for c in categories]
        statistics = getattr(inner, "statistics_", None)
        if statistics is not None:
            return [Datatype.BYTES if np.asarray(statistics).dtype.kind in "OUS" else None] * count
    return [None] * count


def _datatype_of(dtype: np.dtype[Any]) -> Datatype:
    if dtype.kind in "OUS":
        return Datatype.BYTES
    if dtype.kind in "iu":
        return Datatype.INT64
    if dtype.kind == "b":
        return Datatype.BOOL
    return Datatype.FP32

"""A version's reference distribution, fixed at publish time: bins per input feature and per output.

Numbers are binned at the reference deciles with open outer bins plus a bin for NaN; labels and strings
by their most frequent reference values plus OTHER and MISSING. The bins never change after publish, so
counts from any worker and any window compare with the reference and merge with each other by adding.
The same :func:`bin_counts` bins the reference at publish and live rows in the workers.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import orjson
from pydantic import BaseModel, ConfigDict, Field

from inferq.shared.contract.messages import NUMPY_DTYPES, Datatype
from inferq.shared.errors import InvalidPayload
from inferq.shared.tables.rowfile import RowFileError, csv_header, kind_of, read_records
from inferq.shared.tables.table import Column

DECILES = tuple(q / 10 for q in range(1, 10))
MAX_CATEGORIES = 20
MAX_OUTPUT_COLUMNS = 16
OTHER = "OTHER"
MISSING = "MISSING"
NAN_BIN = "NaN"


class BinnedColumn(BaseModel):
    """One monitored column: where it is (tensor, column), how it is binned, and the reference share of each bin."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    index: int
    name: str
    tensor: str
    column: int | None
    """Column of a 2-D tensor; ``None`` for a 1-D tensor (one value per row)."""
    kind: Literal["numeric", "categorical"]
    edges: list[float] = Field(default_factory=list)
    """Numeric: the inner bin edges (ascending, distinct); bin ``i`` holds ``edges[i-1] <= x < edges[i]``."""
    categories: list[str] = Field(default_factory=list)
    """Categorical: the reference's most frequent values (as text), then OTHER and MISSING bins."""
    proportions: list[float]

    @property
    def bins(self) -> int:
        """How many bins, the NaN / OTHER / MISSING ones included."""
        return len(self.edges) + 2 if self.kind == "numeric" else len(self.categories) + 2

    def labels(self) -> list[str]:
        """A readable label per bin."""
        if self.kind == "categorical":
            return [*self.categories, OTHER, MISSING]
        bounds = ["-inf", *(f"{e:.4g}" for e in self.edges), "inf"]
        return [f"[{lo}, {hi})" for lo, hi in pairwise(bounds)] + [NAN_BIN]


class Reference(BaseModel):
    """What a version's training inputs and outputs looked like, stored in its manifest."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rows: int
    features: list[BinnedColumn]
    outputs: list[BinnedColumn]


def bin_counts(column: BinnedColumn, values: npt.NDArray[Any]) -> npt.NDArray[np.int64]:
    """Counts of ``values`` (1-D) in each bin of ``column``."""
    if column.kind == "numeric":
        numbers = np.asarray(values, dtype=np.float64)
        index = np.searchsorted(np.asarray(column.edges), numbers, side="right")
        index[np.isnan(numbers)] = len(column.edges) + 1
        return np.bincount(index, minlength=column.bins).astype(np.int64)
    return _string_counts({c: i for i, c in enumerate(column.categories)}, column.bins, values)


def _string_counts(slot: dict[str, int], bins: int, values: npt.NDArray[Any]) -> npt.NDArray[np.int64]:
    """Counts of categorical ``values`` in bins ``slot`` (text → bin), then OTHER and MISSING: each
    distinct value is read as text once, however often it occurs."""
    other, missing = bins - 2, bins - 1
    counts = np.zeros(bins, dtype=np.int64)
    for value, n in Counter(values.reshape(-1).tolist()).items():
        text = _text(value)
        counts[missing if text is None else slot.get(text, other)] += n
    return counts


def _text(value: Any) -> str | None:
    """A categorical value as the text it is binned by (None: missing)."""
    if value is None or (isinstance(value, float) and value != value):  # noqa: PLR0124  (NaN)
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        return value if value else None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _proportions(counts: npt.NDArray[np.int64]) -> list[float]:
    total = int(counts.sum())
    return [float(c) / total if total else 0.0 for c in counts]


def numeric_column(index: int, name: str, tensor: str, column: int | None, values: npt.NDArray[Any]) -> BinnedColumn:
    """Decile bins of ``values`` (NaN excluded from the deciles, counted in its own bin)."""
    numbers = np.asarray(values, dtype=np.float64)
    finite = numbers[~np.isnan(numbers)]
    edges = [float(e) for e in np.unique(np.quantile(finite, DECILES))] if finite.size else []
    draft = BinnedColumn(
        index=index, name=name, tensor=tensor, column=column, kind="numeric", edges=edges, proportions=[]
    )
    return draft.model_copy(update={"proportions": _proportions(bin_counts(draft, numbers))})


def categorical_column(
    index: int, name: str, tensor: str, column: int | None, values: npt.NDArray[Any]
) -> BinnedColumn:
    """Bins for the ``MAX_CATEGORIES`` most frequent reference values (equal counts: the smaller text
    first, so the bins do not depend on the order of the rows), OTHER and MISSING."""
    tally = Counter(t for t in (_text(v) for v in values.tolist()) if t is not None)
    ranked = sorted(tally.items(), key=lambda item: (-item[1], item[0]))[:MAX_CATEGORIES]
    categories = sorted(c for c, _ in ranked)
    draft = BinnedColumn(
        index=index, name=name, tensor=tensor, column=column, kind="categorical", categories=categories, proportions=[]
    )
    return draft.model_copy(update={"proportions": _proportions(bin_counts(draft, values))})


def _is_label(array: npt.NDArray[Any]) -> bool:
    return array.dtype.kind in "iubUSO"


def describe_inputs(tensor: str, data: npt.NDArray[Any], names: list[str]) -> list[BinnedColumn]:
    """One binned column per column of the model's single 2-D input."""
    return [
        numeric_column(i, names[i], tensor, i, data[:, i])
        if data.dtype.kind == "f"
        else categorical_column(i, names[i], tensor, i, data[:, i])
        for i in range(data.shape[1])
    ]


def describe_outputs(outputs: dict[str, npt.NDArray[Any]]) -> list[BinnedColumn]:
    """Class shares of a label output; decile bins of each column of a score or regression output."""
    columns: list[BinnedColumn] = []
    for name, array in outputs.items():
        if array.ndim == 1 or (array.ndim == 2 and array.shape[1] == 1):
            flat = array.reshape(-1)
            kind = categorical_column if _is_label(flat) else numeric_column
            columns.append(kind(len(columns), name, name, None if array.ndim == 1 else 0, flat))
        elif array.ndim == 2 and array.dtype.kind == "f":
            for j in range(min(array.shape[1], MAX_OUTPUT_COLUMNS)):
                columns.append(numeric_column(len(columns), f"{name}[{j}]", name, j, array[:, j]))
    return columns


def column_values(column: BinnedColumn, array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """The values of ``column`` in ``array`` (the whole tensor, rows on axis 0)."""
    if column.column is None:
        return array.reshape(-1)
    return array.reshape(array.shape[0], -1)[:, column.column]


def read_reference_data(path: Path, feature_names: list[str] | None = None) -> tuple[npt.NDArray[Any], list[str]]:
    """Rows of reference data from ``.csv`` (with a header), ``.jsonl`` (one row list per line) or ``.npy``,
    and the feature names (the CSV header, ``feature_names``, or ``f0``, ``f1``, …)."""
    if not path.is_file():
        raise InvalidPayload(f"--reference {path}: no such file")
    header: list[str] | None = None
    try:
        if path.suffix == ".npy":
            data = np.load(path, allow_pickle=False)
        elif path.suffix == ".csv":
            with path.open(newline="") as handle:
                reader = csv.reader(handle)
                header = next(reader, None)
                data = np.array([[float(x) if x else np.nan for x in row] for row in reader if row], dtype=np.float64)
        elif path.suffix == ".jsonl":
            lines = [line for line in path.read_bytes().splitlines() if line.strip()]
            data = np.array([orjson.loads(line) for line in lines], dtype=np.float64)
        else:
            raise InvalidPayload(f"--reference {path}: use a .csv (with a header), .jsonl or .npy file")
    except (ValueError, orjson.JSONDecodeError, OSError) as exc:
        raise InvalidPayload(f"--reference {path}: not a table of numbers ({exc})") from None
    if data.ndim != 2 or data.shape[0] == 0:
        raise InvalidPayload(f"--reference {path}: needs rows of the same width, got shape {list(data.shape)}")
    names = feature_names or header or [f"f{i}" for i in range(data.shape[1])]
    if len(names) != data.shape[1]:
        raise InvalidPayload(f"--reference {path}: {len(names)} feature names for {data.shape[1]} columns")
    return data, names


def build_reference(
    model_bytes: bytes, input_name: str, input_datatype: Datatype, data: npt.NDArray[Any], names: list[str]
) -> Reference:
    """Bin the reference rows and the model's outputs on them (one onnxruntime run over all rows)."""
    outputs = _run_model(model_bytes, {input_name: data.astype(NUMPY_DTYPES[input_datatype])})
    features = describe_inputs(input_name, data, names)
    return Reference(rows=int(data.shape[0]), features=features, outputs=describe_outputs(outputs))


def _run_model(model_bytes: bytes, feeds: dict[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
    """The model's outputs on ``feeds`` (one onnxruntime run over all reference rows)."""
    import onnxruntime as ort  # noqa: PLC0415  (only publishing with a reference runs the model here)

    try:
        session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
        names_out = [o.name for o in session.get_outputs()]
        outputs = dict(zip(names_out, session.run(names_out, feeds), strict=True))
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidArgument types
        raise InvalidPayload(f"--reference: the model cannot run on the reference rows: {exc}") from None
    return {name: np.asarray(value) for name, value in outputs.items() if isinstance(value, np.ndarray)}


# -- models that read named columns ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReferenceTable:
    """The training rows of a model that reads named columns, one array per column in the model's order:
    numbers as float64 (NaN where a value is missing), text as objects (``None`` where it is missing)."""

    columns: list[Column]
    values: list[npt.NDArray[Any]]

    @property
    def rows(self) -> int:
        """How many reference rows."""
        return int(self.values[0].shape[0]) if self.values else 0


def read_reference(
    path: Path, columns: Sequence[Column] | None, feature_names: list[str] | None = None
) -> tuple[npt.NDArray[Any], list[str]] | ReferenceTable:
    """The ``--reference`` file: read by column name for a model that names its columns (unless it is a
    ``.npy`` array), else as rows of numbers in the model's input order."""
    if not columns or path.suffix == ".npy":
        return read_reference_data(path, feature_names)
    if feature_names is not None:
        raise InvalidPayload("--feature-names: the model names its own columns; the reference is read by those names")
    return read_reference_table(path, columns)


def read_reference_table(path: Path, columns: Sequence[Column]) -> ReferenceTable:
    """Reference rows by column name from a ``.csv`` with a header or ``.jsonl`` rows (objects by name, or
    arrays in the model's column order); every column the model reads must be there. An empty cell, a
    ``null`` or an absent key is a missing value: the MISSING bin of a text column, the NaN bin of a number."""
    try:
        if kind_of(path) == "csv" and path.is_file():
            header = csv_header(path)
            absent = [c.name for c in columns if c.name not in header]
            if absent:
                raise InvalidPayload(
                    f"--reference {path}: no column {absent[0]!r}, which the model reads "
                    f"({', '.join(c.name for c in columns)})"
                )
        readers = [_reader(c) for c in columns]
        cells: list[list[Any]] = [[] for _ in columns]
        named: set[str] = set()
        for record in read_records(path):
            if isinstance(record.values, dict):
                named.update(c.name for c in columns if c.name in record.values)
            row = _cells(path, record.line, record.values, columns)
            for position, (value, read) in enumerate(zip(row, readers, strict=True)):
                try:
                    cells[position].append(read(value))
                except ValueError as exc:
                    raise InvalidPayload(
                        f"--reference {path}:{record.line}: column {columns[position].name!r}: {exc}"
                    ) from None
    except RowFileError as exc:
        raise InvalidPayload(f"--reference {exc}") from None
    if not cells or not cells[0]:
        raise InvalidPayload(f"--reference {path}: no rows")
    absent = [c.name for c in columns if named and c.name not in named]
    if absent:
        raise InvalidPayload(
            f"--reference {path}: no row has column {absent[0]!r}, which the model reads "
            f"({', '.join(c.name for c in columns)})"
        )
    values = [
        np.array(c, dtype=object if column.datatype is Datatype.BYTES else np.float64)
        for c, column in zip(cells, columns, strict=True)
    ]
    return ReferenceTable(list(columns), values)


def _cells(path: Path, line: int, values: dict[str, Any] | list[Any], columns: Sequence[Column]) -> list[Any]:
    """One row's values in the model's column order (absent keys of an object row are missing values)."""
    if isinstance(values, dict):
        return [values.get(c.name) for c in columns]
    if len(values) != len(columns):
        raise InvalidPayload(
            f"--reference {path}:{line}: {len(values)} values, the model reads {len(columns)} columns "
            f"({', '.join(c.name for c in columns)})"
        )
    return values


def _reader(column: Column) -> Any:
    """How one reference cell of ``column`` is read: text for a BYTES column, else a number."""
    return _text_cell if column.datatype is Datatype.BYTES else _number_cell


def _text_cell(value: Any) -> str | None:
    if isinstance(value, list | dict):
        raise ValueError(f"{value!r} is not a value")
    return _text(value)


def _number_cell(value: Any) -> float:
    if value is None or (isinstance(value, str) and not value.strip()):
        return float("nan")
    if isinstance(value, list | dict):
        raise ValueError(f"{value!r} is not a number")
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a number") from None


def build_table_reference(model_bytes: bytes, inputs: Sequence[Any], table: ReferenceTable) -> Reference:
    """Bin each column of ``table`` as a feature (numbers at deciles, text by its most frequent values) and
    the model's outputs on the rows; ``inputs`` are the model's ONNX inputs (a manifest's ``TensorSpec``)."""
    feeds: dict[str, list[npt.NDArray[Any]]] = {}
    features: list[BinnedColumn] = []
    for index, (column, values) in enumerate(zip(table.columns, table.values, strict=True)):
        position = len(feeds.setdefault(column.input, []))
        feeds[column.input].append(values)
        describe = categorical_column if column.datatype is Datatype.BYTES else numeric_column
        features.append(describe(index, column.name, column.input, position, values))
    datatypes = {spec.name: spec.datatype for spec in inputs}
    arrays = {name: _feed(name, datatypes[name], parts, table) for name, parts in feeds.items()}
    outputs = _run_model(model_bytes, arrays)
    return Reference(rows=table.rows, features=features, outputs=describe_outputs(outputs))


def _feed(name: str, datatype: Datatype, parts: list[npt.NDArray[Any]], table: ReferenceTable) -> npt.NDArray[Any]:
    """The model input ``name`` on every reference row (a missing text is the empty string)."""
    if datatype is Datatype.BYTES:
        return np.stack([np.array(["" if v is None else v for v in p], dtype=object) for p in parts], axis=1)
    dtype = NUMPY_DTYPES[datatype]
    if np.dtype(dtype).kind != "f":
        for column, values in zip(table.columns, table.values, strict=True):
            if column.input == name and np.isnan(values).any():
                raise InvalidPayload(
                    f"--reference: column {column.name!r} has missing values; the model needs {datatype}"
                )
    return np.stack(parts, axis=1).astype(dtype)


def _numeric_categories(column: BinnedColumn) -> npt.NDArray[np.float64] | None:
    """The categories as numbers when every one is a number (class labels), else ``None``."""
    try:
        return np.array([float(c) for c in column.categories], dtype=np.float64)
    except ValueError:
        return None


class Binner:
    """Bins whole batches for a list of columns at once: one vector of counts, the columns' bins end to end.

    Numeric columns of one tensor are binned together with one comparison against a matrix of edges
    (padded with +inf) and one ``bincount``, and numeric class labels with one ``searchsorted``, so a
    batch costs a handful of numpy calls however many features the model has; text categories (and
    numeric labels that arrive as text) are counted once per distinct value. Same bins as
    :func:`bin_counts` (``x >= edge`` counted over the edges is ``searchsorted(..., side="right")``)."""

    def __init__(self, columns: list[BinnedColumn]) -> None:
        self.columns = columns
        sizes = [c.bins for c in columns]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.size = int(self.offsets[-1])
        self._numeric: list[_NumericGroup] = []
        self._labels: list[tuple[BinnedColumn, npt.NDArray[np.float64], npt.NDArray[np.int64], int]] = []
        self._strings: list[tuple[int, BinnedColumn, dict[str, int], bool]] = []
        by_tensor: dict[str, list[int]] = {}
        for position, column in enumerate(columns):
            numbers = _numeric_categories(column) if column.kind == "categorical" else None
            if column.kind == "numeric":
                by_tensor.setdefault(column.tensor, []).append(position)
            elif numbers is not None:
                order = np.argsort(numbers)
                self._labels.append(
                    (column, numbers[order], order + self.offsets[position], int(self.offsets[position]))
                )
            if column.kind == "categorical":  # text values (and numeric labels sent as text) go by their text
                slots = {c: i for i, c in enumerate(column.categories)}
                self._strings.append((position, column, slots, numbers is not None))
        for tensor, positions in by_tensor.items():
            self._numeric.append(_NumericGroup(tensor, [columns[p] for p in positions], self.offsets[positions]))

    def counts(self, arrays: dict[str, npt.NDArray[Any]]) -> npt.NDArray[np.int64]:
        """Counts of every bin of every column over the rows of ``arrays`` (tensor name → whole batch)."""
        indexes = [group.bins(arrays) for group in self._numeric]
        for column, values, slots, start in self._labels:
            array = arrays.get(column.tensor)
            if array is not None and array.size and array.dtype.kind not in "OUS":
                indexes.append(_label_bins(column, column_values(column, array), values, slots, start))
        present = [i for i in indexes if i is not None]
        total = (
            np.bincount(np.concatenate(present) if len(present) > 1 else present[0], minlength=self.size)
            if present
            else np.zeros(self.size, dtype=np.int64)
        )
        for position, column, texts, numbered in self._strings:
            array = arrays.get(column.tensor)
            if array is None or not array.size or (numbered and array.dtype.kind not in "OUS"):
                continue  # absent, or numeric labels in numbers: binned above
            start = self.offsets[position]
            total[start : start + column.bins] += _string_counts(texts, column.bins, column_values(column, array))
        return total

    def split(self, counts: npt.NDArray[np.int64]) -> dict[int, list[int]]:
        """``counts`` as column index → counts per bin."""
        return {
            column.index: counts[self.offsets[p] : self.offsets[p + 1]].tolist()
            for p, column in enumerate(self.columns)
        }


def _label_bins(
    column: BinnedColumn,
    raw: npt.NDArray[Any],
    values: npt.NDArray[np.float64],
    slots: npt.NDArray[np.int64],
    start: int,
) -> npt.NDArray[np.int64]:
    numbers = np.asarray(raw, dtype=np.float64).reshape(-1)
    where = np.minimum(np.searchsorted(values, numbers), len(values) - 1)
    other, missing = start + len(column.categories), start + len(column.categories) + 1
    index = np.where(values[where] == numbers, slots[where], other)
    return np.where(np.isnan(numbers), missing, index)


class _NumericGroup:
    """The numeric columns of one tensor, binned together."""

    def __init__(self, tensor: str, columns: list[BinnedColumn], offsets: npt.NDArray[np.int64]) -> None:
        self.tensor = tensor
        self.picks = [0 if c.column is None else c.column for c in columns]
        width = max(1, *(len(c.edges) for c in columns))
        self.edges = np.full((len(columns), width), np.inf)
        for row, column in enumerate(columns):
            self.edges[row, : len(column.edges)] = column.edges
        self.nan_bins = np.array([len(c.edges) + 1 for c in columns], dtype=np.int64) + offsets
        self.offsets = offsets

    def bins(self, arrays: dict[str, npt.NDArray[Any]]) -> npt.NDArray[np.int64] | None:
        """The flat bin index of every value of these columns, or ``None`` when the tensor is absent."""
        array = arrays.get(self.tensor)
        if array is None or array.size == 0:
            return None
        matrix = array.reshape(array.shape[0], -1)
        values = matrix[:, self.picks].astype(np.float64, copy=False)
        index = (values[:, :, None] >= self.edges[None, :, :]).sum(axis=2) + self.offsets[None, :]
        result: npt.NDArray[np.int64] = np.where(np.isnan(values), self.nan_bins[None, :], index).ravel()
        return result

"""Ground-truth files: CSV (with a header), JSONL (one object per line) or Parquet, one ``(id, label)`` per row.

The whole file is read and checked before anything is stored: a missing column, an empty id or label, or
one id given two different labels is an error naming the file and the line (the same id twice with the
same label is one label). Parquet needs the tables extra (pyarrow).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from inferq.shared.errors import InferqError
from inferq.shared.extras import TABLES, MissingExtra
from inferq.shared.results.labels import LabelValue
from inferq.shared.tables.rowfile import RowFileError, csv_header, kind_of, read_records

PARQUET_SUFFIXES = (".parquet", ".pq")


class LabelFileError(InferqError):
    """A label file that cannot be stored as it is; names the file, the line and what is wrong."""


def read_labels(path: Path, id_column: str = "id", label_column: str = "label") -> list[tuple[str, LabelValue]]:
    """Every ``(id, label)`` of the file, in file order, each id once; raises :class:`LabelFileError`."""
    first: dict[str, tuple[int, LabelValue]] = {}
    for line, given_id, given_label in _rows(path, id_column, label_column):
        label_id = _id(path, line, given_id, id_column)
        label = _label(path, line, given_label, label_column)
        seen = first.setdefault(label_id, (line, label))
        if seen[1] != label:
            raise LabelFileError(
                f"{path}:{line}: id {label_id!r} has label {label!r} here and {seen[1]!r} on line {seen[0]}"
            )
    return [(label_id, label) for label_id, (_line, label) in first.items()]


def _rows(path: Path, id_column: str, label_column: str) -> Iterator[tuple[int, Any, Any]]:
    """``(line, id, label)`` as the file holds them (line 1 is a CSV's header, a Parquet file's first row)."""
    if path.suffix.lower() in PARQUET_SUFFIXES:
        yield from _parquet_rows(path, id_column, label_column)
        return
    try:
        if kind_of(path) == "csv" and path.is_file():
            _check_columns(path, csv_header(path), (id_column, label_column), 1)
        for record in read_records(path):
            if not isinstance(record.values, dict):
                raise LabelFileError(
                    f"{path}:{record.line}: expected an object with {id_column!r} and {label_column!r}"
                )
            _check_columns(path, list(record.values), (id_column, label_column), record.line)
            yield record.line, record.values[id_column], record.values[label_column]
    except RowFileError as exc:
        raise LabelFileError(f"{exc} (or .parquet)" if "expected a .csv" in str(exc) else str(exc)) from None


def _check_columns(path: Path, names: list[str], wanted: tuple[str, str], line: int) -> None:
    missing = [name for name in wanted if name not in names]
    if missing:
        raise LabelFileError(
            f"{path}:{line}: no column {missing[0]!r} (found {', '.join(map(repr, names)) or 'none'}; "
            "rename with --id-column/--label-column)"
        )


def _parquet_rows(path: Path, id_column: str, label_column: str) -> Iterator[tuple[int, Any, Any]]:
    try:
        import pyarrow.parquet as pq  # noqa: PLC0415  (the tables extra, only for a Parquet file)
    except ModuleNotFoundError:
        raise MissingExtra(TABLES, "a Parquet label file") from None
    if not path.is_file():
        raise LabelFileError(f"{path}: no such file")
    try:
        names = pq.read_schema(path).names
        _check_columns(path, names, (id_column, label_column), 1)
        table = pq.read_table(path, columns=[id_column, label_column])
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise LabelFileError(f"{path}: not a readable Parquet file: {exc}") from None
    ids, labels = table.column(id_column).to_pylist(), table.column(label_column).to_pylist()
    for index, (given_id, given_label) in enumerate(zip(ids, labels, strict=True)):
        yield index + 1, given_id, given_label


def _id(path: Path, line: int, value: Any, column: str) -> str:
    """An id as text: text or an integer, not empty (``17`` and ``"17"`` are the same id)."""
    if isinstance(value, bool) or not isinstance(value, str | int) or str(value).strip() == "":
        raise LabelFileError(f"{path}:{line}: column {column!r}: {value!r} is not an id (text or an integer)")
    return str(value)


def _label(path: Path, line: int, value: Any, column: str) -> LabelValue:
    """A label: text, a number or a boolean, not empty and not NaN."""
    if isinstance(value, str) and value.strip() == "":
        raise LabelFileError(f"{path}:{line}: column {column!r} is empty")
    if isinstance(value, float) and math.isnan(value):  # no truth to compare with
        raise LabelFileError(f"{path}:{line}: column {column!r} is NaN")
    if not isinstance(value, str | int | float | bool):
        raise LabelFileError(f"{path}:{line}: column {column!r}: {value!r} is not a label (text or a number)")
    return value

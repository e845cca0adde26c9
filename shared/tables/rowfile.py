"""Reading rows from the files users have: CSV with a header, or JSONL (one object or array per line).

Every problem is a :class:`RowFileError` naming the file and line: a file that is not UTF-8, a line
that is not JSON, a CSV row longer than its header. Values come out as the file holds them (CSV cells
are text); typing them is the model's business (see :mod:`inferq.shared.tables.table`).
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from inferq.shared.errors import InferqError

CSV_SUFFIXES = frozenset({".csv"})
JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson"})


class RowFileError(InferqError):
    """A row file that cannot be read; the message names the file and, where it can, the line."""


@dataclass(frozen=True, slots=True)
class Record:
    """One row as the file holds it: an object (CSV rows and JSONL objects) or an array, and its line."""

    line: int
    values: dict[str, Any] | list[Any]


def kind_of(path: Path) -> str:
    """``"csv"`` or ``"jsonl"`` by the file's extension; raises :class:`RowFileError` for anything else."""
    suffix = path.suffix.lower()
    if suffix in CSV_SUFFIXES:
        return "csv"
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    raise RowFileError(f"{path}: expected a .csv or .jsonl file")


def read_records(path: Path) -> Iterator[Record]:
    """Every row of the CSV or JSONL file at ``path``, with its line number."""
    kind = kind_of(path)
    if not path.is_file():
        raise RowFileError(f"{path}: no such file")
    if kind == "csv":
        yield from _csv_records(path)
    else:
        yield from jsonl_records(path, path.open("rb"))


def csv_header(path: Path) -> list[str]:
    """The column names of a CSV file (empty for an empty file)."""
    reader = csv.reader(text_lines(path, path.open("rb")))
    return next(reader, [])


def text_lines(name: Path | str, handle: Any) -> Iterator[str]:
    """Lines of a binary ``handle`` decoded as UTF-8 (a leading byte-order mark is dropped); a line that is
    not UTF-8 is a :class:`RowFileError` naming ``name`` and the line. Closes ``handle`` at the end."""
    with handle:
        for number, raw in enumerate(handle, start=1):
            try:
                yield raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError:
                raise RowFileError(f"{name}:{number}: not UTF-8 text (save the file as UTF-8)") from None


def _csv_records(path: Path) -> Iterator[Record]:
    reader = csv.reader(text_lines(path, path.open("rb")))
    header = next(reader, None)
    if header is None:
        return
    try:
        for cells in reader:
            if not cells:
                continue  # a blank line
            if len(cells) > len(header):
                raise RowFileError(f"{path}:{reader.line_num}: {len(cells)} cells, the header names {len(header)}")
            values: dict[str, Any] = dict(zip(header, cells, strict=False))
            for name in header[len(cells) :]:  # a short row: missing values, which the model's columns refuse
                values[name] = None
            yield Record(reader.line_num, values)
    except csv.Error as exc:
        raise RowFileError(f"{path}:{reader.line_num}: not CSV ({exc})") from None


def jsonl_records(name: Path | str, handle: Any) -> Iterator[Record]:
    """Rows of JSON lines from a binary ``handle``: each non-blank line an object or an array."""
    for line, text in enumerate(text_lines(name, handle), start=1):
        if not text.strip():
            continue
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise RowFileError(f"{name}:{line}: not JSON ({exc})") from None
        if not isinstance(value, dict | list):
            raise RowFileError(f"{name}:{line}: expected an object or an array, found {type(value).__name__}")
        yield Record(line, value)

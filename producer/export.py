"""Getting results out of a result store: as rows of a CSV or JSONL file, or into another store.

A result becomes one flat row: its id, status, version and error code, then one column per output
element, named after the output (``label``) or, when an output has several elements per row,
``probabilities_0``, ``probabilities_1``, …
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

from inferq.shared.contract.messages import Result, Tensor
from inferq.shared.errors import InferqError
from inferq.shared.results.base import ResultStore

COPY_BATCH = 1000
READ_CHUNK = 1000
FORMATS = ("csv", "jsonl")
OUT_FORMATS = ("csv", "jsonl", "parquet")
"""Formats of ``backfill --out`` (written from column arrays by :mod:`inferq.producer.output`)."""
_OUT_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}

Cell = str | int | float | bool | None


class ExportError(InferqError):
    """Results cannot be written the way asked (mixed output shapes in one CSV, a bad output path)."""


def output_format(out: Path | None, given: str | None) -> str:
    """``given``, or the format the suffix of ``out`` names, or CSV."""
    if given is not None:
        return given
    if out is not None and out.suffix.lower() in (".jsonl", ".ndjson"):
        return "jsonl"
    if out is None or out.suffix.lower() == ".csv":
        return "csv"
    raise ExportError(f"{out}: name a .csv or .jsonl file, or give --format")


def out_format(out: Path, given: str | None) -> str:
    """``given``, or the format the suffix of ``out`` names: ``.csv``, ``.parquet`` or ``.jsonl``."""
    if given is not None:
        return given
    fmt = _OUT_SUFFIXES.get(out.suffix.lower())
    if fmt is None:
        raise ExportError(f"{out}: name a .csv, .parquet or .jsonl file, or give --format")
    return fmt


def row_outputs(outputs: Sequence[Tensor], rows: int, row: int) -> dict[str, Cell]:
    """The output columns of row ``row`` of a job of ``rows`` rows (``rows`` 0: the whole tensor)."""
    columns: dict[str, Cell] = {}
    for tensor in outputs:
        data = list(tensor.data)
        if rows:
            size = math.prod(tensor.shape[1:]) if len(tensor.shape) > 1 else 1
            data = data[row * size : (row + 1) * size]
        if len(data) == 1:
            columns[tensor.name] = data[0]
        else:
            columns.update({f"{tensor.name}_{i}": value for i, value in enumerate(data)})
    return columns


def summary_row(result: Result) -> dict[str, Cell]:
    """One export row for ``result``: id, status, version, error code and every output element."""
    row: dict[str, Cell] = {
        "id": result.id,
        "status": result.status.value,
        "version": result.version,
        "error_code": result.error.code.value if result.error is not None else None,
    }
    row.update(row_outputs(result.outputs or [], 0, 0))
    return row


class RowWriter:
    """Writes flat rows as CSV (header from the first row with outputs) or as JSON lines.

    CSV rows that come before the first one with outputs (failures) wait in memory for the header."""

    def __init__(self, handle: IO[str], fmt: str, leading: Sequence[str]) -> None:
        self.handle = handle
        self.fmt = fmt
        self.leading = list(leading)
        self.columns: list[str] | None = None
        self._waiting: list[dict[str, Cell]] = []
        self._csv = csv.writer(handle)

    def write(self, row: dict[str, Cell]) -> None:
        if self.fmt == "jsonl":
            self.handle.write(orjson.dumps(row).decode() + "\n")
            return
        if self.columns is None:
            if len(row) == len(self.leading):  # no outputs: the header is not known yet
                self._waiting.append(row)
                return
            self._start(list(row))
        self._row(row)

    def _start(self, columns: list[str]) -> None:
        self.columns = columns
        self._csv.writerow(columns)
        for waiting in self._waiting:
            self._row(waiting)
        self._waiting = []

    def _row(self, row: dict[str, Cell]) -> None:
        assert self.columns is not None
        extra = set(row) - set(self.columns)
        if extra:
            raise ExportError(
                f"result {row[self.leading[0]]!r} has outputs {sorted(extra)} that earlier results lack; "
                "use --format jsonl for results of different shapes"
            )
        self._csv.writerow(["" if row.get(c) is None else row.get(c) for c in self.columns])

    def close(self) -> None:
        if self.fmt == "csv" and self.columns is None:
            self._start(self.leading)


def read_ids(path: Path) -> list[str]:
    """Job ids, one a line (blank lines ignored)."""
    try:
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise ExportError(f"{path}: {exc.strerror}") from None


def results_of(store: ResultStore, ids: Sequence[str]) -> Iterator[tuple[str, Result | None]]:
    """Each of ``ids`` in order with its stored result (``None`` when it has none), read in chunks."""
    for start in range(0, len(ids), READ_CHUNK):
        chunk = ids[start : start + READ_CHUNK]
        found = store.get_many(chunk)
        for job_id in chunk:
            yield job_id, found.get(job_id)


def export(
    results: Iterable[tuple[str, Result | None]], handle: IO[str], fmt: str, on_row: Callable[[], None]
) -> tuple[int, int]:
    """Write ``results``; returns (written, missing). JSONL lines are the full result JSON."""
    written = missing = 0
    writer = RowWriter(handle, fmt, ["id", "status", "version", "error_code"])
    for job_id, result in results:
        on_row()
        if result is None:
            missing += 1
            row: dict[str, Any] = {"id": job_id, "status": "missing", "version": None, "error_code": None}
            writer.write(row)
            continue
        written += 1
        if fmt == "jsonl":
            handle.write(result.to_json().decode() + "\n")
        else:
            writer.write(summary_row(result))
    writer.close()
    return written, missing


@dataclass(slots=True)
class CopyReport:
    """What ``results copy`` did."""

    copied: int = 0
    skipped: int = 0


def copy_results(source: ResultStore, target: ResultStore, on_batch: Callable[[int], None]) -> CopyReport:
    """Every result of ``source`` into ``target``, in batches; ids ``target`` already has are skipped
    (the target's first-result-wins rule decides, so a rerun after an interruption copies the rest)."""
    report = CopyReport()
    batch: list[Result] = []

    def flush() -> None:
        stored = target.put_many(batch)
        copied = sum(1 for mine, kept in zip(batch, stored, strict=True) if kept is mine)
        report.copied += copied
        report.skipped += len(batch) - copied
        on_batch(len(batch))
        batch.clear()

    for result in source.scan():
        batch.append(result)
        if len(batch) == COPY_BATCH:
            flush()
    if batch:
        flush()
    return report

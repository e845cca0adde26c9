"""Backfill: turn the rows of a CSV or JSONL file into jobs, with ids derived from the input so that a
rerun skips every job that already has a stored result."""

from __future__ import annotations

import csv
import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from shared.errors import InferqError
from shared.messages import Datatype, Job, Tensor, VersionRef, is_valid_job_id
from shared.results import ResultStore

NUMERIC = frozenset(
    {Datatype.FP16, Datatype.FP32, Datatype.FP64, Datatype.INT8, Datatype.INT16, Datatype.INT32, Datatype.INT64}
)


class BackfillError(InferqError):
    """The input file cannot be turned into jobs; names the file and line."""


@dataclass(frozen=True, slots=True)
class Row:
    """One input row: where it came from, its explicit id (if any) and its feature values."""

    line: int
    row_id: str | None
    values: list[float]


@dataclass(frozen=True, slots=True)
class InputSpec:
    """The one 2-D numeric input a backfill feeds: its name, type and width (``None``: any)."""

    name: str
    datatype: Datatype
    width: int | None

    def __post_init__(self) -> None:
        if self.datatype not in NUMERIC:
            raise BackfillError(f"input {self.name!r} is {self.datatype}; backfill feeds numbers")


@dataclass(slots=True)
class BackfillPlan:
    """What a backfill will publish and what it skips."""

    jobs: int = 0
    rows: int = 0
    skipped_jobs: int = 0


def read_rows(path: Path, id_column: str | None) -> Iterator[Row]:
    """Rows of a CSV (with a header) or JSONL file (each line an array of numbers or an object)."""
    if not path.is_file():
        raise BackfillError(f"{path}: no such file")
    if path.suffix.lower() == ".csv":
        yield from _csv_rows(path, id_column)
    elif path.suffix.lower() in (".jsonl", ".ndjson"):
        yield from _jsonl_rows(path, id_column)
    else:
        raise BackfillError(f"{path}: expected a .csv or .jsonl file")


def _numbers(path: Path, line: int, values: list[Any]) -> list[float]:
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError):
        raise BackfillError(f"{path}:{line}: every feature must be a number") from None
    if not all(math.isfinite(v) for v in numbers):
        raise BackfillError(f"{path}:{line}: NaN or infinite feature value")
    return numbers


def _split_id(path: Path, line: int, record: dict[str, Any], id_column: str | None) -> tuple[str | None, list[Any]]:
    if id_column is None:
        return None, list(record.values())
    if id_column not in record:
        raise BackfillError(f"{path}:{line}: no column {id_column!r}")
    row_id = str(record.pop(id_column))
    if not is_valid_job_id(row_id):
        raise BackfillError(f"{path}:{line}: id {row_id!r} is not a valid job id ([A-Za-z0-9._:-], at most 128)")
    return row_id, list(record.values())


def _csv_rows(path: Path, id_column: str | None) -> Iterator[Row]:
    with path.open(newline="") as handle:
        for line, record in enumerate(csv.DictReader(handle), start=2):
            row_id, values = _split_id(path, line, dict(record), id_column)
            yield Row(line, row_id, _numbers(path, line, values))


def _jsonl_rows(path: Path, id_column: str | None) -> Iterator[Row]:
    with path.open("rb") as handle:
        for line, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                record = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise BackfillError(f"{path}:{line}: not JSON ({exc})") from None
            if isinstance(record, list):
                if id_column is not None:
                    raise BackfillError(f"{path}:{line}: --id-column needs JSON objects, found an array")
                yield Row(line, None, _numbers(path, line, record))
            elif isinstance(record, dict):
                row_id, values = _split_id(path, line, record, id_column)
                yield Row(line, row_id, _numbers(path, line, values))
            else:
                raise BackfillError(f"{path}:{line}: expected an array of numbers or an object")


def derive_job_id(model: str, version: VersionRef, rows: list[Row], batch_rows: int) -> str:
    """A job id that depends only on the input: the same file gives the same ids on every run."""
    if batch_rows == 1 and rows[0].row_id is not None:
        return rows[0].row_id
    digest = hashlib.sha256(f"{model}|{version}|{batch_rows}".encode())
    for row in rows:
        digest.update(f"|{row.line}:{row.row_id or ''}:{row.values}".encode())
    return f"bf-{digest.hexdigest()[:40]}"


def chunks(rows: Iterator[Row], size: int) -> Iterator[list[Row]]:
    """``rows`` in lists of ``size`` (the last may be shorter)."""
    chunk: list[Row] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def backfill_jobs(
    rows: Iterator[Row],
    *,
    model: str,
    version: VersionRef,
    spec: InputSpec,
    batch_rows: int,
    results: ResultStore,
    plan: BackfillPlan,
    on_skip: Callable[[int], None] = lambda _rows: None,
) -> Iterator[Job]:
    """Jobs of ``batch_rows`` rows each, skipping those whose result is already stored."""
    width = spec.width
    for chunk in chunks(rows, batch_rows):
        for row in chunk:
            if width is not None and len(row.values) != width:
                raise BackfillError(f"line {row.line}: {len(row.values)} features, model {model!r} takes {width}")
        job_id = derive_job_id(model, version, chunk, batch_rows)
        if results.exists(job_id):
            plan.skipped_jobs += 1
            on_skip(len(chunk))
            continue
        plan.jobs += 1
        plan.rows += len(chunk)
        data: list[bool | int | float | str] = [v for row in chunk for v in row.values]
        tensor = Tensor(name=spec.name, shape=[len(chunk), len(chunk[0].values)], datatype=spec.datatype, data=data)
        yield Job(id=job_id, model=model, version=version, inputs=[tensor])

"""Backfill: turn the rows of a CSV or JSONL file into jobs for one concrete model version, with ids
derived from the model, the version and the input, so that a rerun skips every job already finished.

Rows feed the model the way its manifest says: by column name (CSV header, JSONL keys; extra columns
ignored) for a model that records its columns, by position otherwise. The whole file is checked
(:func:`check_rows`) before anything is published: a missing column, a value that does not fit its
column's type, or one id on two rows is an error naming the file, the line and the column.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from inferq.shared.contract.messages import Job, is_valid_job_id
from inferq.shared.errors import InferqError, InvalidPayload
from inferq.shared.results.base import ResultStore
from inferq.shared.tables.rowfile import RowFileError, csv_header, kind_of, read_records
from inferq.shared.tables.table import Cell, RowError, Table

T = TypeVar("T")

MAX_JOB_ID_CHARS = 128  # the wire contract's bound on a job id


class BackfillError(InferqError):
    """The input file cannot be turned into jobs; names the file and line."""


@dataclass(frozen=True, slots=True)
class Row:
    """One input row: where it came from, its explicit id (if any) and its values in the model's column order."""

    line: int
    row_id: str | None
    values: tuple[Cell, ...]


@dataclass(slots=True)
class BackfillPlan:
    """What a backfill will publish and what it skips."""

    jobs: int = 0
    rows: int = 0
    skipped_jobs: int = 0


def read_rows(path: Path, table: Table, id_column: str | None) -> Iterator[Row]:
    """The rows of a CSV (with a header) or JSONL file (objects, or arrays by position), typed for ``table``."""
    try:
        kind = kind_of(path)
        if kind == "csv" and path.is_file():
            _check_header(path, table, id_column)
        for record in read_records(path):
            values = record.values
            row_id = None
            if id_column is not None:
                if not isinstance(values, dict):
                    raise BackfillError(f"{path}:{record.line}: --id-column needs objects, found an array")
                row_id = _row_id(path, record.line, values.pop(id_column, None), id_column)  # a fresh dict per row
            try:
                typed = table.values(values)
            except RowError as exc:
                raise BackfillError(f"{path}:{record.line}: {exc.detail}") from None
            yield Row(record.line, row_id, typed)
    except (RowFileError, InvalidPayload) as exc:
        raise BackfillError(str(exc)) from None


def _check_header(path: Path, table: Table, id_column: str | None) -> None:
    """A CSV header must name every column the model reads (and the id column): say so at line 1."""
    header = csv_header(path)
    wanted = ([id_column] if id_column else []) + ([c.name for c in table.columns] if table.named else [])
    missing = [name for name in wanted if name not in header]
    if missing:
        raise BackfillError(
            f"{path}:1: no column {missing[0]!r} in the header (model {table.model!r} version {table.version} "
            f"reads {table.describe()})"
        )


def _row_id(path: Path, line: int, value: object, id_column: str) -> str:
    if value is None:
        raise BackfillError(f"{path}:{line}: no column {id_column!r}")
    row_id = str(value)
    if not is_valid_job_id(row_id):
        raise BackfillError(f"{path}:{line}: id {row_id!r} is not a valid job id ([A-Za-z0-9._:-], at most 128)")
    return row_id


def check_rows(path: Path, rows: Iterator[Row]) -> int:
    """Read every row (which checks it) and refuse an id given to two rows, naming both lines; returns
    the number of rows. Run before publishing, so a bad file publishes nothing."""
    first_line: dict[str, int] = {}
    count = 0
    for row in rows:
        count += 1
        if row.row_id is None:
            continue
        seen = first_line.setdefault(row.row_id, row.line)
        if seen != row.line:
            raise BackfillError(f"{path}:{row.line}: id {row.row_id!r} is also the id of line {seen}")
    return count


def derive_job_id(model: str, version: int, rows: list[Row], batch_rows: int) -> str:
    """A job id that depends only on the model, its concrete version and the input.

    One row with an id of its own: ``<model>:<version>:<row id>``, readable and unique per model
    version. Otherwise ``bf-`` and a digest of model, version, rows per job and the rows (line, id,
    values). A rerun of the same file on the same version finds the same ids; another model or version
    gives other ids, so it runs every row."""
    row_id = rows[0].row_id
    if batch_rows == 1 and row_id is not None:
        job_id = f"{model}:{version}:{row_id}"
        if len(job_id) > MAX_JOB_ID_CHARS:
            raise BackfillError(
                f"line {rows[0].line}: job id {job_id!r} (model:version:row id) is longer than "
                f"{MAX_JOB_ID_CHARS} characters: use shorter ids"
            )
        return job_id
    digest = hashlib.sha256(f"{model}|{version}|{batch_rows}".encode())
    for row in rows:
        digest.update(f"|{row.line}:{row.row_id or ''}:{row.values}".encode())
    return f"bf-{digest.hexdigest()[:40]}"


def chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """``items`` in lists of ``size`` (the last may be shorter)."""
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def backfill_jobs(
    rows: Iterator[Row],
    *,
    table: Table,
    batch_rows: int,
    results: ResultStore,
    plan: BackfillPlan,
    on_skip: Callable[[int], None] = lambda _rows: None,
) -> Iterator[Job]:
    """Jobs of ``batch_rows`` rows each for the table's model version, skipping those already finished."""
    for chunk in chunks(rows, batch_rows):
        job_id = derive_job_id(table.model, table.version, chunk, batch_rows)
        if results.exists(job_id):
            plan.skipped_jobs += 1
            on_skip(len(chunk))
            continue
        plan.jobs += 1
        plan.rows += len(chunk)
        try:
            inputs = table.tensors([row.values for row in chunk])
        except InvalidPayload as exc:
            raise BackfillError(f"lines {chunk[0].line}-{chunk[-1].line}: {exc}") from None
        yield Job(id=job_id, model=table.model, version=table.version, inputs=inputs)

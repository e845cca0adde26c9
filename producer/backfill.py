"""Backfill: turn the rows of a CSV or JSONL file into jobs for one concrete model version, with ids
derived from the model, the version and each row's own content, so that a rerun skips every job already
finished and a row whose values changed is scored again.

Rows feed the model the way its manifest says: by column name (CSV header, JSONL keys; extra columns
ignored) for a model that records its columns, by position otherwise. The whole file is checked
(:func:`check_rows`) before anything is published: a missing column, a value that does not fit its
column's type, or one id on two rows is an error naming the file, the line and the column.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Container, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from inferq.shared.contract.messages import Job, Result, Tensor, is_valid_job_id, job_digest
from inferq.shared.errors import InferqError, InvalidPayload
from inferq.shared.results.base import ResultStore
from inferq.shared.results.labels import RowId
from inferq.shared.tables.rowfile import RowFileError, csv_header, kind_of, read_records
from inferq.shared.tables.table import Cell, RowError, Table

T = TypeVar("T")

CONTENT_DIGEST_CHARS = 16
"""Hex digits of the job digest in a readable job id (64 bits: a collision is still caught, see
:func:`answers`)."""
SKIP_CHECK_JOBS = 500
"""Jobs whose stored results are read in one round trip before publishing."""


class BackfillError(InferqError):
    """The input file cannot be turned into jobs; names the file and line."""


@dataclass(frozen=True, slots=True)
class Row:
    """One input row: where it came from, its explicit id (if any) and its values in the model's column order.

    ``row_id`` is the id as text (what job ids and duplicate checks use); ``given_id`` the id exactly as
    the file holds it (``17`` stays a number in JSONL), for ``--out``."""

    line: int
    row_id: str | None
    values: tuple[Cell, ...]
    given_id: Cell | None = None

    @property
    def key(self) -> Cell:
        """What ``--out`` writes for this row: its id as given, or its line."""
        return self.given_id if self.given_id is not None else str(self.line)


@dataclass(slots=True)
class BackfillPlan:
    """What a backfill will publish and what it skips."""

    jobs: int = 0
    rows: int = 0
    skipped_jobs: int = 0
    dead_lettered_jobs: int = 0
    """Jobs not published again because they wait in the dead-letter queue (``inferq dlq replay``)."""


def read_rows(path: Path, table: Table, id_column: str | None) -> Iterator[Row]:
    """The rows of a CSV (with a header) or JSONL file (objects, or arrays by position), typed for ``table``."""
    try:
        kind = kind_of(path)
        if kind == "csv" and path.is_file():
            _check_header(path, table, id_column)
        for record in read_records(path):
            values = record.values
            given: Cell | None = None
            if id_column is not None:
                if not isinstance(values, dict):
                    raise BackfillError(f"{path}:{record.line}: --id-column needs objects, found an array")
                given = _given_id(path, record.line, values.pop(id_column, None), id_column)  # a fresh dict per row
            try:
                typed = table.values(values)
            except RowError as exc:
                raise BackfillError(f"{path}:{record.line}: {exc.detail}") from None
            yield Row(record.line, None if given is None else str(given), typed, given)
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


def _given_id(path: Path, line: int, value: object, id_column: str) -> Cell:
    """A row's id as the file gives it: text or a number, not empty. Any text will do (an e-mail address, a
    name with spaces): an id that cannot be part of a job id makes a digest job id instead."""
    if value is None:
        raise BackfillError(f"{path}:{line}: no column {id_column!r}")
    if isinstance(value, bool) or not isinstance(value, str | int | float) or str(value) == "":
        raise BackfillError(f"{path}:{line}: column {id_column!r}: {value!r} is not an id (text or a number)")
    return value


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


def derive_job_id(model: str, version: int, rows: list[Row], batch_rows: int, content: str) -> str:
    """A job id that depends only on the model, its concrete version and the input; ``content`` is the job's
    digest (:func:`inferq.shared.contract.messages.job_digest`: model, version and the values it feeds).

    One row with an id of its own: ``<model>:<version>:<row id>:<16 hex of the job digest>``, readable
    and joinable by humans, when it is a valid job id (characters ``[A-Za-z0-9._:-]``, at most 128),
    else ``bf-`` and a digest of model, version, row id and content. Several rows per job (or no id
    column): ``bf-`` and a digest of model, version, rows per job and the rows (line, id, values). A rerun
    of the same file on the same version finds the same ids; a row whose values changed, another model
    or another version gives other ids, so it runs again."""
    row_id = rows[0].row_id
    if batch_rows == 1 and row_id is not None:
        readable = f"{model}:{version}:{row_id}:{content[:CONTENT_DIGEST_CHARS]}"
        if is_valid_job_id(readable):
            return readable
        return "bf-" + hashlib.sha256(f"{model}|{version}|{row_id}|{content}".encode()).hexdigest()[:40]
    # NOTE: the same digest as before ids followed each row's content: results of earlier runs stay found.
    digest = hashlib.sha256(f"{model}|{version}|{batch_rows}".encode())
    for row in rows:
        digest.update(f"|{row.line}:{row.row_id or ''}:{row.values}".encode())
    return f"bf-{digest.hexdigest()[:40]}"


@dataclass(frozen=True, slots=True)
class BackfillJob:
    """A job of a backfill, its job digest and its rows' keys (ids as given, or lines), in input order."""

    job: Job
    digest: str
    keys: list[Cell]
    row_ids: list[str | None] | None = None
    """The rows' ids as text (``None`` for a row without one)."""


def _record_row_ids(results: ResultStore, model: str, group: list[BackfillJob]) -> None:
    rows = [
        RowId(row_id, planned.job.id, index)
        for planned in group
        for index, row_id in enumerate(planned.row_ids or [])
        if row_id is not None
    ]
    if rows:
        results.labels().put_row_ids(model, rows)


def backfill_job(table: Table, rows: list[Row], batch_rows: int) -> BackfillJob:
    """The job for ``rows`` (one chunk of ``batch_rows``), with the id :func:`derive_job_id` gives it."""
    inputs, digest = _content(table, rows)
    job_id = derive_job_id(table.model, table.version, rows, batch_rows, digest)
    job = Job(id=job_id, model=table.model, version=table.version, inputs=inputs)
    return BackfillJob(job, digest, [row.key for row in rows], [row.row_id for row in rows])


def job_identity(table: Table, rows: list[Row], batch_rows: int) -> tuple[str, str]:
    """The id and the job digest of :func:`backfill_job`'s job, without building the job itself."""
    _inputs, digest = _content(table, rows)
    return derive_job_id(table.model, table.version, rows, batch_rows, digest), digest


def _content(table: Table, rows: list[Row]) -> tuple[list[Tensor], str]:
    """The input tensors of ``rows`` and the job digest of a job feeding them to the table's version."""
    try:
        inputs = table.tensors([row.values for row in rows])
    except InvalidPayload as exc:
        raise BackfillError(f"lines {rows[0].line}-{rows[-1].line}: {exc}") from None
    # The digest covers what the job asks for, not its id: computed on an id-less copy, then the id follows.
    unnamed = Job.model_construct(id="", model=table.model, version=table.version, inputs=inputs, parameters={})
    return inputs, job_digest(unnamed)


def backfill_plan(rows: Iterator[Row], table: Table, batch_rows: int) -> Iterator[BackfillJob]:
    """Every job of a backfill of ``rows``, in input order, ``batch_rows`` rows each."""
    for chunk in chunks(rows, batch_rows):
        yield backfill_job(table, chunk, batch_rows)


def answers(result: Result, digest: str) -> bool:
    """True when ``result`` is the answer to the job of ``digest``: an id alone proves nothing (another job
    may have used it, or a short digest in a readable id may collide)."""
    return result.job_sha256 == digest


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
    dead_lettered: Container[str] = frozenset(),
    on_skip: Callable[[int], None] = lambda _rows: None,
) -> Iterator[Job]:
    """Jobs of ``batch_rows`` rows each for the table's model version, skipping those already finished
    (a stored result that answers the job) and those waiting in the dead-letter queue (``dead_lettered``).
    Rows with an id are recorded in the result store's label side first (row id -> job and row), so a
    label given by row id finds its prediction."""
    for group in chunks(backfill_plan(rows, table, batch_rows), SKIP_CHECK_JOBS):
        _record_row_ids(results, table.model, group)
        stored = results.get_many([planned.job.id for planned in group])
        for planned in group:
            earlier = stored.get(planned.job.id)
            if earlier is not None and answers(earlier, planned.digest):
                plan.skipped_jobs += 1
                on_skip(len(planned.keys))
            elif planned.job.id in dead_lettered:
                plan.dead_lettered_jobs += 1
                on_skip(len(planned.keys))
            else:
                plan.jobs += 1
                plan.rows += len(planned.keys)
                yield planned.job

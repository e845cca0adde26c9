"""``backfill --out``: wait for the result of every row of a backfill and write them, in input order.

The file gets the input's id column (its name and values as given), the job's error code and detail
(empty when it succeeded) and one column per output element. Results are read in input order, a chunk at
a time, waiting on a chunk until each of its jobs has a result of its own (its job digest matches) or is
known to have none: dead-lettered (``dead_lettered``, the dead-letter reason as detail), or gone with
nothing queued or in flight any more (``no_result``), as a :class:`JobTracker` tells. Memory stays bounded
by the chunk, however long the input. The file is written under a temporary name and renamed when
complete, so an interrupted wait never leaves a partial file behind.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from inferq.producer.backfill import Row, answers, chunks, job_identity
from inferq.producer.export import Cell, RowWriter, row_outputs
from inferq.shared.contract.messages import Result, Status
from inferq.shared.errors import ErrorCode
from inferq.shared.results.base import ResultStore
from inferq.shared.tables.table import Table

CHUNK_JOBS = 2048
POLL_S = 0.5
ERROR_COLUMNS = ("error_code", "error_detail")
NO_RESULT_DETAIL = "neither stored nor dead-lettered, and nothing left queued or in flight"


@dataclass(frozen=True, slots=True)
class ExpectedJob:
    """A job of the backfill, its job digest and the keys of its input rows (ids as given, or lines)."""

    job_id: str
    digest: str
    row_keys: Sequence[Cell]


class JobTracker(Protocol):
    """What the wait learns beyond the result store: dead letters, and when nothing can still arrive."""

    def reason(self, job_id: str) -> str | None:
        """Why ``job_id`` was dead-lettered, or ``None`` if it was not (as far as known)."""

    def nothing_in_flight(self) -> bool:
        """True once no job can still be queued or unacknowledged (then for good)."""

    def wait(self, timeout_s: float) -> None:
        """Block up to ``timeout_s`` for news."""


@dataclass(slots=True)
class Collected:
    """What ``--out`` wrote: rows, and those with no result (dead-lettered, or gone)."""

    rows: int = 0
    dead_lettered: int = 0
    no_result: int = 0

    @property
    def missing(self) -> int:
        """Rows written without a result."""
        return self.dead_lettered + self.no_result


def expected_jobs(rows: Iterator[Row], table: Table, batch_rows: int) -> Iterator[ExpectedJob]:
    """The jobs a backfill of ``rows`` publishes (the same ids and digests), each with its rows' keys."""
    for chunk in chunks(rows, batch_rows):
        job_id, digest = job_identity(table, chunk, batch_rows)
        yield ExpectedJob(job_id, digest, [row.key for row in chunk])


def belongs(result: Result, digest: str) -> bool:
    """True when ``result`` answers the job of ``digest``; also a failure that carries no digest (a message
    refused before it was read as a job): it is no prediction of another job's values."""
    return answers(result, digest) or (result.job_sha256 is None and result.status is not Status.SUCCEEDED)


def wait_for_chunk(store: ResultStore, chunk: list[ExpectedJob], tracker: JobTracker) -> dict[str, Result]:
    """The results of the jobs of ``chunk`` that have one of their own, once every other job of it is
    dead-lettered or nothing can be in flight any more."""
    digests = {job.job_id: job.digest for job in chunk}
    found: dict[str, Result] = {}
    pending = list(digests)
    while pending:
        found.update(_own(store, pending, digests))
        pending = [job_id for job_id in pending if job_id not in found and tracker.reason(job_id) is None]
        if pending and tracker.nothing_in_flight():
            found.update(_own(store, pending, digests))  # a last look, after the queues were seen empty
            break
        if pending:
            tracker.wait(POLL_S)
    return found


def _own(store: ResultStore, job_ids: list[str], digests: dict[str, str]) -> dict[str, Result]:
    return {i: r for i, r in store.get_many(job_ids).items() if belongs(r, digests[i])}


def write_backfill_output(
    store: ResultStore,
    jobs: Iterable[ExpectedJob],
    out: Path,
    fmt: str,
    id_header: str,
    tracker: JobTracker,
    on_rows: Callable[[int], None],
) -> Collected:
    """Wait for and write every row's result (or why it has none) to ``out``."""
    partial = out.with_name(f".{out.name}.partial")
    collected = Collected()
    try:
        with partial.open("w", newline="") as handle:
            writer = RowWriter(handle, fmt, [id_header, *ERROR_COLUMNS])
            for chunk in chunks(jobs, CHUNK_JOBS):
                results = wait_for_chunk(store, chunk, tracker)
                for job in chunk:
                    _write_job(writer, job, _answer(job, results, tracker, collected), id_header)
                    on_rows(len(job.row_keys))
            writer.close()
            handle.flush()
            os.fsync(handle.fileno())
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)  # interrupted: the rerun writes the whole file again
    return collected


@dataclass(frozen=True, slots=True)
class _Answer:
    error_code: str | None
    error_detail: str | None
    result: Result | None


def _answer(job: ExpectedJob, results: dict[str, Result], tracker: JobTracker, collected: Collected) -> _Answer:
    """What the rows of ``job`` get: its result, or the reason it has none (counted in ``collected``)."""
    rows = len(job.row_keys)
    collected.rows += rows
    result = results.get(job.job_id)
    if result is not None:
        error = result.error
        return _Answer(None if error is None else error.code.value, None if error is None else error.message, result)
    reason = tracker.reason(job.job_id)
    if reason is not None:
        collected.dead_lettered += rows
        return _Answer(ErrorCode.DEAD_LETTERED.value, reason, None)
    collected.no_result += rows
    return _Answer(ErrorCode.NO_RESULT.value, NO_RESULT_DETAIL, None)


def _write_job(writer: RowWriter, job: ExpectedJob, answer: _Answer, id_header: str) -> None:
    rows = len(job.row_keys)
    for index, key in enumerate(job.row_keys):
        row: dict[str, Cell] = {id_header: key, "error_code": answer.error_code, "error_detail": answer.error_detail}
        if answer.result is not None and answer.result.outputs is not None:
            row.update(row_outputs(answer.result.outputs, rows, index))
        writer.write(row)

"""``backfill --out``: wait for the result of every row of a backfill and write them, in input order.

The file gets the input's id column (its name and values as given), the job's error code and detail
(empty when it succeeded) and one column per output value, built from column arrays and written with
pyarrow as CSV, Parquet or JSON lines (:mod:`inferq.producer.output`). Results are read in input order, a
chunk of jobs at a time (at most :data:`CHUNK_ROWS` rows: memory stays bounded however long the input),
one record per job, waiting on a chunk until each of its jobs has a result of its own (its job digest
matches) or is known to have none: dead-lettered (``dead_lettered``, the dead-letter reason as detail), or
gone with nothing queued or in flight any more (``no_result``), as a :class:`JobTracker` tells. The file is
written under a temporary name and renamed when complete, so an interrupted wait never leaves a partial
file behind.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from inferq.producer.backfill import answers, plan_job
from inferq.producer.export import Cell
from inferq.shared.contract.messages import Result, Status
from inferq.shared.errors import ErrorCode
from inferq.shared.results.base import ResultStore
from inferq.shared.tables.block import Block, reblock
from inferq.shared.tables.table import Table

if TYPE_CHECKING:
    from inferq.producer.output import JobRows

CHUNK_JOBS = 2048
"""Jobs whose results are read in one round trip (one-row jobs: a chunk of 2,048 rows)."""
CHUNK_ROWS = 100_000
"""Rows per chunk, whatever the rows per job: what ``--out`` holds in memory at once (tens of megabytes of
results for a few columns of outputs)."""
POLL_S = 0.5
NO_RESULT_DETAIL = "neither stored nor dead-lettered, and nothing left queued or in flight"


@dataclass(frozen=True, slots=True)
class ExpectedJob:
    """A job of the backfill, its job digest and the keys of its input rows (ids as given, or lines; a
    list, or a pyarrow array)."""

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
    """What ``--out`` wrote: rows, those with no result (dead-lettered, or gone), and where its time went."""

    rows: int = 0
    dead_lettered: int = 0
    no_result: int = 0
    waiting_s: float = 0.0
    """Blocked until workers finished more jobs."""
    reading_s: float = 0.0
    """Reading results from the store."""
    writing_s: float = 0.0
    """Turning results into columns and writing them."""

    @property
    def missing(self) -> int:
        """Rows written without a result."""
        return self.dead_lettered + self.no_result


def _ignore(_rows: int) -> None:
    return None


def expected_jobs(blocks: Iterable[Block], table: Table, batch_rows: int, first_line: int) -> Iterator[ExpectedJob]:
    """The jobs a backfill of ``blocks`` publishes (the same ids and digests, cut the same way), each with its
    rows' keys: the ids as the file gives them, or the rows' lines (``first_line`` is the first row's)."""
    for block in reblock(blocks, batch_rows):
        planned = plan_job(table, block, batch_rows)
        yield ExpectedJob(planned.job_id, planned.digest, _keys(block, first_line))


def _keys(block: Block, first_line: int) -> Sequence[Cell]:
    """A block's keys as an array: its ids, or its lines as text."""
    if block.ids is not None:
        return block.ids  # type: ignore[return-value]  # a numpy array: a sequence of cells
    first = first_line + block.start
    return np.arange(first, first + block.rows).astype(str)  # type: ignore[return-value]


def belongs(result: Result, digest: str) -> bool:
    """True when ``result`` answers the job of ``digest``; also a failure that carries no digest (a message
    refused before it was read as a job): it is no prediction of another job's values."""
    return answers(result, digest) or (result.job_sha256 is None and result.status is not Status.SUCCEEDED)


def wait_for_chunk(
    store: ResultStore,
    chunk: list[ExpectedJob],
    tracker: JobTracker,
    on_finished: Callable[[int], None] = _ignore,
    collected: Collected | None = None,
) -> dict[str, Result]:
    """The results of the jobs of ``chunk`` that have one of their own, once every other job of it is
    dead-lettered or nothing can be in flight any more; ``on_finished`` hears of rows as their jobs end
    (a result, a dead letter, or nothing left in flight)."""
    timing = collected if collected is not None else Collected()
    rows = {job.job_id: len(job.row_keys) for job in chunk}
    digests = {job.job_id: job.digest for job in chunk}
    found: dict[str, Result] = {}
    pending = list(digests)
    while pending:
        found.update(_own(store, pending, digests, timing))
        still = [job_id for job_id in pending if job_id not in found and tracker.reason(job_id) is None]
        if still and tracker.nothing_in_flight():
            found.update(_own(store, still, digests, timing))  # a last look, after the queues were seen empty
            still = []
        on_finished(sum(rows[job_id] for job_id in pending) - sum(rows[job_id] for job_id in still))
        pending = still
        if pending:
            started = time.perf_counter()
            tracker.wait(POLL_S)
            timing.waiting_s += time.perf_counter() - started
    return found


def _own(store: ResultStore, job_ids: list[str], digests: dict[str, str], timing: Collected) -> dict[str, Result]:
    started = time.perf_counter()
    stored = store.get_many(job_ids)
    timing.reading_s += time.perf_counter() - started
    return {i: r for i, r in stored.items() if belongs(r, digests[i])}


def chunks_of_rows(jobs: Iterable[ExpectedJob], max_rows: int, max_jobs: int) -> Iterator[list[ExpectedJob]]:
    """``jobs`` in lists of at most ``max_jobs`` jobs and, unless one job alone has more, ``max_rows`` rows."""
    chunk: list[ExpectedJob] = []
    rows = 0
    for job in jobs:
        size = len(job.row_keys)
        if chunk and (len(chunk) == max_jobs or rows + size > max_rows):
            yield chunk
            chunk, rows = [], 0
        chunk.append(job)
        rows += size
    if chunk:
        yield chunk


def write_backfill_output(
    store: ResultStore,
    jobs: Iterable[ExpectedJob],
    out: Path,
    fmt: str,
    id_header: str,
    tracker: JobTracker,
    on_finished: Callable[[int], None] = _ignore,
    on_written: Callable[[int], None] = _ignore,
) -> Collected:
    """Wait for and write every row's result (or why it has none) to ``out`` (``fmt``: csv, parquet or
    jsonl); ``on_finished`` hears of rows as their jobs end, ``on_written`` as they reach the file."""
    # pyarrow is the tables extra's: imported when a file is written, not when the command line is read.
    from inferq.producer.output import OutputFile, record_batch  # noqa: PLC0415

    partial = out.with_name(f".{out.name}.partial")
    collected = Collected()
    output = OutputFile(partial, fmt, id_header)
    try:
        for chunk in chunks_of_rows(jobs, CHUNK_ROWS, CHUNK_JOBS):
            results = wait_for_chunk(store, chunk, tracker, on_finished, collected)
            started = time.perf_counter()
            output.write(record_batch(id_header, [_answer(job, results, tracker, collected) for job in chunk]))
            collected.writing_s += time.perf_counter() - started
            on_written(sum(len(job.row_keys) for job in chunk))
        started = time.perf_counter()
        output.close()
        collected.writing_s += time.perf_counter() - started
        partial.replace(out)
    finally:
        output.abandon()
        partial.unlink(missing_ok=True)  # interrupted: the rerun writes the whole file again
    return collected


def _answer(job: ExpectedJob, results: dict[str, Result], tracker: JobTracker, collected: Collected) -> JobRows:
    """What the rows of ``job`` get: its result, or the reason it has none (counted in ``collected``)."""
    from inferq.producer.output import JobRows  # noqa: PLC0415 (the tables extra's, see above)

    rows = len(job.row_keys)
    collected.rows += rows
    result = results.get(job.job_id)
    if result is not None:
        error = result.error
        code, detail = (None, None) if error is None else (error.code.value, error.message)
        return JobRows(job.row_keys, code, detail, result.outputs)
    reason = tracker.reason(job.job_id)
    if reason is not None:
        collected.dead_lettered += rows
        return JobRows(job.row_keys, ErrorCode.DEAD_LETTERED.value, reason, None)
    collected.no_result += rows
    return JobRows(job.row_keys, ErrorCode.NO_RESULT.value, NO_RESULT_DETAIL, None)

"""``backfill --out``: wait for the result of every row of a backfill and write them, in input order.

The file gets the input's id column, the job's error code (empty when it succeeded) and one column per
output element. Results are read in input order, a chunk at a time, waiting on a chunk until all its jobs
have a result: memory stays bounded by the chunk, however long the input. The file is written under a
temporary name and renamed when complete, so an interrupted wait never leaves a partial file behind.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from inferq.producer.backfill import Row, chunks, derive_job_id
from inferq.producer.export import Cell, RowWriter, row_outputs
from inferq.shared.contract.messages import Result
from inferq.shared.results.base import ResultStore

CHUNK_JOBS = 2048
POLL_S = 0.5


@dataclass(frozen=True, slots=True)
class ExpectedJob:
    """A job of the backfill and the keys of its input rows (their id column values), in input order."""

    job_id: str
    row_keys: list[str]


def expected_jobs(rows: Iterator[Row], model: str, version: int, batch_rows: int) -> Iterator[ExpectedJob]:
    """The jobs a backfill of ``rows`` publishes (the same ids it derives), each with its rows' keys: the
    row's id column value, or its line in the input."""
    for chunk in chunks(rows, batch_rows):
        keys = [row.row_id if row.row_id is not None else str(row.line) for row in chunk]
        yield ExpectedJob(derive_job_id(model, version, chunk, batch_rows), keys)


def wait_for_chunk(
    store: ResultStore, chunk: list[ExpectedJob], sleep: Callable[[float], None] = time.sleep
) -> dict[str, Result]:
    """The results of every job of ``chunk``, polling the store for those not finished yet."""
    found: dict[str, Result] = {}
    pending = [job.job_id for job in chunk]
    while True:
        found.update(store.get_many(pending))
        pending = [job_id for job_id in pending if job_id not in found]
        if not pending:
            return found
        sleep(POLL_S)


def write_backfill_output(
    store: ResultStore,
    jobs: Iterable[ExpectedJob],
    out: Path,
    fmt: str,
    id_header: str,
    on_rows: Callable[[int], None],
) -> int:
    """Wait for and write every row's result to ``out``; returns the rows written."""
    partial = out.with_name(f".{out.name}.partial")
    rows = 0
    try:
        with partial.open("w", newline="") as handle:
            writer = RowWriter(handle, fmt, [id_header, "error_code"])
            for chunk in chunks(jobs, CHUNK_JOBS):
                results = wait_for_chunk(store, chunk)
                for job in chunk:
                    rows += _write_job(writer, job, results[job.job_id], id_header)
                    on_rows(len(job.row_keys))
            writer.close()
            handle.flush()
            os.fsync(handle.fileno())
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)  # interrupted: the rerun writes the whole file again
    return rows


def _write_job(writer: RowWriter, job: ExpectedJob, result: Result, id_header: str) -> int:
    error_code = result.error.code.value if result.error is not None else None
    rows = len(job.row_keys)
    for index, key in enumerate(job.row_keys):
        row: dict[str, Cell] = {id_header: key, "error_code": error_code}
        if result.outputs is not None:
            row.update(row_outputs(result.outputs, rows, index))
        writer.write(row)
    return rows

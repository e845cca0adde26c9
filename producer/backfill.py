"""Backfill: turn the rows of a file (CSV, Parquet, JSONL) into jobs of many rows for one concrete model
version, with ids derived from the model, the version and the rows' own content, so that a rerun skips
every job already finished and a job whose rows changed is scored again.

The file arrives in typed column blocks (:mod:`inferq.shared.tables.columnar`, checked as it is read: a
missing column or a value that does not fit names the file, the line and the column); :func:`check_blocks`
reads the whole file before anything is published and refuses an id given to two rows. Jobs take
``batch_rows`` consecutive rows (by default :func:`rows_per_job` picks a few hundred kilobytes' worth), and
their tensors go from the column arrays to Open Inference Protocol JSON in one orjson call each, without a
Python object per number: the message body and the job digest are built from the same encoded bytes.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import orjson

from inferq.producer.client import Encoded
from inferq.shared.contract.messages import Datatype, Result, is_valid_job_id
from inferq.shared.errors import InferqError
from inferq.shared.results.base import ResultStore
from inferq.shared.results.labels import RowId
from inferq.shared.tables.block import Block, Cell, ColumnData, reblock
from inferq.shared.tables.table import Table

T = TypeVar("T")

CONTENT_DIGEST_CHARS = 16
"""Hex digits of the job digest in a readable job id (64 bits: a collision is still caught, see
:func:`answers`)."""
SKIP_CHECK_JOBS = 500
"""At most this many jobs' stored results are read in one round trip before publishing..."""
SKIP_CHECK_ROWS = 65536
"""...and at most this many rows' worth (their encoded jobs wait in memory meanwhile)."""
TARGET_JOB_BYTES = 256 * 1024
"""What :func:`rows_per_job` aims at: big enough that a job's fixed costs (a message, a confirm, a stored
record, a model call) vanish, small enough to leave room under the broker's message limit."""
MAX_ROWS_PER_JOB = 65536
"""The most rows a worker batches (its ``max_batch_rows`` bound)."""
WIRE_BYTES_PER_VALUE: dict[Datatype, int] = {
    **dict.fromkeys(Datatype, 12),
    Datatype.FP16: 20,
    Datatype.FP32: 20,
    Datatype.FP64: 20,
    Datatype.BOOL: 6,
    Datatype.BYTES: 24,
}
"""A generous guess at one value's JSON size (a float64's shortest form, a short string quoted)."""
IN_FLIGHT_BYTES = 32 << 20
"""Encoded jobs a backfill lets wait for the broker's confirms at once (part of its bounded memory)."""
OPEN_WIDTH_GUESS = 32
"""Values per row assumed for a model that takes rows of any width."""

_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


class BackfillError(InferqError):
    """The input file cannot be turned into jobs; names the file and line."""


@dataclass(slots=True)
class BackfillPlan:
    """What a backfill will publish and what it skips."""

    jobs: int = 0
    rows: int = 0
    skipped_jobs: int = 0
    dead_lettered_jobs: int = 0
    """Jobs not published again because they wait in the dead-letter queue (``inferq dlq replay``)."""


def rows_per_job(table: Table, max_message_bytes: int) -> int:
    """Rows per job when the user names none: what fits in :data:`TARGET_JOB_BYTES` (at most a quarter of
    the broker's message limit), rounded down to a power of two. It depends on the model version alone, so
    a rerun on the same version cuts the file into the same jobs and finds them finished."""
    rows = min(TARGET_JOB_BYTES, max_message_bytes // 4) // _row_bytes(table)
    return max(1, min(MAX_ROWS_PER_JOB, 2 ** int(math.log2(rows)) if rows >= 1 else 1))


def confirm_window(table: Table, batch_rows: int, configured: int) -> int:
    """Jobs unconfirmed at once: ``configured``, or fewer when that many jobs of ``batch_rows`` rows would
    hold more than :data:`IN_FLIGHT_BYTES` (the publisher keeps each until the broker confirms it)."""
    return max(1, min(configured, IN_FLIGHT_BYTES // (batch_rows * _row_bytes(table))))


def _row_bytes(table: Table) -> int:
    if table.any_width is not None:
        return OPEN_WIDTH_GUESS * WIRE_BYTES_PER_VALUE[table.any_width.datatype]
    return sum(WIRE_BYTES_PER_VALUE[c.datatype] for c in table.columns) or 1


# -- checking the whole file --------------------------------------------------------------------------------


Place = Callable[[int], tuple[str, str]]
"""Where a row (by index) is: the start of a message and how another message names it (``data.csv:8``,
``line 8``)."""


def check_blocks(blocks: Callable[[], Iterator[Block]], place: Place, on_rows: Callable[[int], None]) -> int:
    """Read every block (which checks it) and refuse an id given to two rows, naming both rows; returns
    the number of rows. Run before publishing, so a bad file publishes nothing.

    ``blocks`` opens the file (a second time only to name a duplicate), ``place`` says where a row is.
    Memory: 8 bytes per row with an id (a hash), whatever the ids' length."""
    hashes: list[np.ndarray] = []
    count = 0
    for block in blocks():
        count += block.rows
        if block.ids is not None:
            hashes.append(_hashes(block))
        on_rows(block.rows)
    if hashes:
        every = np.concatenate(hashes)
        hashes.clear()
        every.sort()
        repeated = every[1:][every[1:] == every[:-1]]
        if repeated.size:
            _name_duplicate(blocks(), set(repeated.tolist()), place)
    return count


def _hashes(block: Block) -> np.ndarray:
    # Python's string hash (one per id, in this process): two ids that differ rarely share one, and a
    # shared one is only a suspect that _name_duplicate compares by text.
    return np.fromiter(map(hash, block.id_texts()), dtype=np.int64, count=block.rows)


def _name_duplicate(blocks: Iterator[Block], suspects: set[int], place: Place) -> None:
    first: dict[str, int] = {}
    for block in blocks:
        hashes = _hashes(block)
        texts = block.id_texts()
        for offset in np.flatnonzero(np.isin(hashes, list(suspects))).tolist():
            row = block.start + offset
            seen = first.setdefault(texts[offset], row)
            if seen != row:
                raise BackfillError(f"{place(row)[0]}: id {texts[offset]!r} is also the id of {place(seen)[1]}")


# -- jobs from blocks -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlannedJob:
    """A job of a backfill in its wire form: its id, its job digest, its rows and the message body."""

    job_id: str
    digest: str
    rows: int
    body: bytes
    row_ids: list[str] | None = None
    """The rows' ids as text, in order (``None`` without an id column)."""


def _record_row_ids(results: ResultStore, model: str, group: list[PlannedJob]) -> None:
    rows = [
        RowId(row_id, planned.job_id, index) for planned in group for index, row_id in enumerate(planned.row_ids or [])
    ]
    if rows:
        results.labels().put_row_ids(model, rows)


def derive_job_id(model: str, version: int, ids: Sequence[str], start: int, batch_rows: int, content: str) -> str:
    """A job id that depends only on the model, its concrete version and the input; ``content`` is the job's
    digest (:func:`inferq.shared.contract.messages.job_digest`: model, version and the values it feeds).

    One row with an id of its own: ``<model>:<version>:<row id>:<16 hex of the job digest>``, readable
    and joinable by humans, when it is a valid job id (characters ``[A-Za-z0-9._:-]``, at most 128),
    else ``bf-`` and a digest of model, version, row id and content. Several rows per job (or no id
    column): ``bf-`` and a digest of model, version, rows per job, the job's first row, its ids and its
    content. A rerun of the same file on the same version finds the same ids; a row whose values changed,
    another model or another version gives other ids, so it runs again."""
    if batch_rows == 1 and ids:
        row_id = ids[0]
        readable = f"{model}:{version}:{row_id}:{content[:CONTENT_DIGEST_CHARS]}"
        if is_valid_job_id(readable):
            return readable
        return "bf-" + hashlib.sha256(f"{model}|{version}|{row_id}|{content}".encode()).hexdigest()[:40]
    digest = hashlib.sha256(f"{model}|{version}|{batch_rows}|{start}|".encode())
    digest.update(orjson.dumps(list(ids)))
    digest.update(f"|{content}".encode())
    return f"bf-{digest.hexdigest()[:40]}"


def plan_job(table: Table, block: Block, batch_rows: int) -> PlannedJob:
    """The job for the rows of ``block`` (one cut of ``batch_rows``), encoded for the wire."""
    inputs = [
        (name, [block.rows, width], datatype, orjson.Fragment(data))
        for name, width, datatype, data in _inputs(table, block)
    ]
    material = [table.model, table.version, inputs, {}]
    # NOTE: the bytes job_digest hashes for the job a worker decodes from this body (same tensors, same
    # encoder, no parameters): a stored result's job_sha256 must equal this digest.
    content = hashlib.sha256(orjson.dumps(material)).hexdigest()
    ids = block.id_texts()
    job_id = derive_job_id(table.model, table.version, ids, block.start, batch_rows, content)
    tensors = [{"name": n, "shape": s, "datatype": d, "data": f} for n, s, d, f in inputs]
    body = orjson.dumps(
        {"id": job_id, "model": table.model, "version": table.version, "inputs": tensors, "parameters": {}}
    )
    return PlannedJob(job_id, content, block.rows, body, ids or None)


def _inputs(table: Table, block: Block) -> Iterator[tuple[str, int, Datatype, bytes]]:
    """Each input's name, width, datatype and data encoded as JSON (row-major), from the block's columns."""
    if table.any_width is not None:
        spec = table.any_width
        yield spec.input, len(block.columns), spec.datatype, _encoded(list(block.columns))
        return
    grouped: dict[str, list[int]] = {}
    for index, column in enumerate(table.columns):
        grouped.setdefault(column.input, []).append(index)
    for name, indexes in grouped.items():
        datatype = table.columns[indexes[0]].datatype
        yield name, len(indexes), datatype, _encoded([block.columns[i] for i in indexes])


def _encoded(columns: list[ColumnData]) -> bytes:
    data = columns[0] if len(columns) == 1 else np.column_stack(columns).ravel()
    if data.dtype == np.object_:
        return orjson.dumps(data.tolist())
    return orjson.dumps(np.ascontiguousarray(data), option=_OPTIONS)


def planned_jobs(blocks: Iterable[Block], table: Table, batch_rows: int) -> Iterator[PlannedJob]:
    """Every job of a backfill of ``blocks``, in input order, ``batch_rows`` rows each."""
    for block in reblock(blocks, batch_rows):
        yield plan_job(table, block, batch_rows)


def job_keys(block: Block, first_line: int) -> list[Cell]:
    """What ``--out`` writes for each row of ``block``: its id as given, or its line as text."""
    if block.ids is not None:
        return list(block.ids.tolist())
    return [str(first_line + block.start + i) for i in range(block.rows)]


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
    blocks: Iterable[Block],
    *,
    table: Table,
    batch_rows: int,
    results: ResultStore,
    plan: BackfillPlan,
    dead_lettered: Container[str] = frozenset(),
    on_skip: Callable[[int], None] = lambda _rows: None,
    on_publish: Callable[[str, int], None] = lambda _id, _rows: None,
) -> Iterator[Encoded]:
    """Jobs of ``batch_rows`` rows each for the table's model version, skipping those already finished
    (a stored result that answers the job) and those waiting in the dead-letter queue (``dead_lettered``).
    ``on_publish(job id, rows)`` runs as each job is handed to the publisher. Rows with an id are recorded
    in the result store's label side first (row id -> job and row), so a label given by row id finds its
    prediction."""
    group_jobs = max(1, min(SKIP_CHECK_JOBS, SKIP_CHECK_ROWS // batch_rows))
    for group in chunks(planned_jobs(blocks, table, batch_rows), group_jobs):
        _record_row_ids(results, table.model, group)
        stored = results.get_many([planned.job_id for planned in group])
        for planned in group:
            earlier = stored.get(planned.job_id)
            if earlier is not None and answers(earlier, planned.digest):
                plan.skipped_jobs += 1
                on_skip(planned.rows)
            elif planned.job_id in dead_lettered:
                plan.dead_lettered_jobs += 1
                on_skip(planned.rows)
            else:
                plan.jobs += 1
                plan.rows += planned.rows
                on_publish(planned.job_id, planned.rows)
                yield Encoded(planned.job_id, planned.body)

"""The file ``backfill --out`` writes, built from column arrays and written with pyarrow: CSV, Parquet or
JSON lines, by the file's suffix.

Each job's rows become columns at once: the id column as the input gave it, ``error_code`` and
``error_detail`` (empty where the row succeeded), then one column per output value (``label``, or
``probabilities_0``, ``probabilities_1``, … for an output with several values per row), never a Python
object per value on the way. A batch is written as soon as it is built, so memory holds one batch however
long the file. Floats keep their type: a float32 output is a float32 Parquet column, and in CSV and JSON
lines the shortest text that reads back as the same float32 (``0.8234567``, not ``0.8234567046165466``).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from inferq.producer.export import ExportError
from inferq.shared.contract.messages import NUMPY_DTYPES, Datatype, Tensor

ERROR_COLUMNS = ("error_code", "error_detail")


@dataclass(frozen=True, slots=True)
class JobRows:
    """One job's rows in the output: their keys (ids as given, or lines) and what the job came to."""

    keys: Sequence[Any]
    """A list of ids, or a pyarrow array of them."""
    error_code: str | None
    error_detail: str | None
    outputs: Sequence[Tensor] | None


def record_batch(id_header: str, jobs: Sequence[JobRows]) -> pa.RecordBatch:
    """The rows of ``jobs``, in order, as one record batch (outputs a job lacks are nulls)."""
    counts = np.fromiter((len(job.keys) for job in jobs), dtype=np.int64, count=len(jobs))
    total = int(counts.sum())
    columns: dict[str, pa.Array] = {id_header: _keys(jobs)}
    for name, field in (("error_code", "error_code"), ("error_detail", "error_detail")):
        per_job = np.array([getattr(job, field) for job in jobs], dtype=np.object_)
        columns[name] = pa.array(np.repeat(per_job, counts), type=pa.string())
    columns.update(_output_columns(jobs, total))
    return pa.RecordBatch.from_pydict(columns)


def _keys(jobs: Sequence[JobRows]) -> pa.Array:
    """The jobs' keys as one array, typed by pyarrow (ids of mixed kinds, ``17`` and ``"x"`` in JSON lines,
    as text)."""
    parts = [job.keys for job in jobs]
    if all(isinstance(part, pa.Array) for part in parts):
        return pa.concat_arrays(parts)
    if all(isinstance(part, np.ndarray) for part in parts):
        keys: Any = np.concatenate(parts) if parts else np.array([], dtype=np.object_)
    else:
        keys = [key for part in parts for key in (part.tolist() if hasattr(part, "tolist") else part)]
    try:
        return pa.array(keys)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([str(key) for key in keys], type=pa.string())


def _output_columns(jobs: Sequence[JobRows], total: int) -> dict[str, pa.Array]:
    """Each output column over every row: one numpy array per column filled job by job, nulls where a
    job has no such output."""
    filled: dict[str, tuple[npt.NDArray[Any], npt.NDArray[np.bool_]]] = {}
    start = 0
    for job in jobs:
        rows = len(job.keys)
        for name, values in _job_columns(job.outputs or (), rows):
            if name not in filled:
                empty = (
                    np.full(total, None, np.object_) if values.dtype == np.object_ else np.zeros(total, values.dtype)
                )
                filled[name] = (empty, np.ones(total, np.bool_))
            data, missing = filled[name]
            data[start : start + rows] = values
            missing[start : start + rows] = False
        start += rows
    return {name: _arrow(data, missing) for name, (data, missing) in filled.items()}


def _arrow(data: npt.NDArray[Any], missing: npt.NDArray[np.bool_]) -> pa.Array:
    if data.dtype == np.object_:
        return pa.array(data, mask=missing, type=pa.string())
    return pa.array(data, mask=missing if missing.any() else None)


def _job_columns(outputs: Sequence[Tensor], rows: int) -> Iterator[tuple[str, npt.NDArray[Any]]]:
    """The output columns of one job of ``rows`` rows: a tensor with a row per input row is split by row; a
    one-row job owns all of its tensor; a tensor of another size (no batch axis) is every row's."""
    for tensor in outputs:
        values = _values(tensor)
        if len(tensor.shape) > 0 and tensor.shape[0] == rows:
            table = values.reshape(rows, -1)
        else:
            table = np.broadcast_to(values.reshape(1, -1), (rows, values.size))
        if table.shape[1] == 1:
            yield tensor.name, table[:, 0]
        else:
            for index in range(table.shape[1]):
                yield f"{tensor.name}_{index}", table[:, index]


def _values(tensor: Tensor) -> npt.NDArray[Any]:
    """A tensor's data as a flat array of its type (float16 as float32, which holds every float16)."""
    if tensor.datatype is Datatype.BYTES:
        return np.array(tensor.data, dtype=np.object_)
    dtype = np.float32 if tensor.datatype is Datatype.FP16 else NUMPY_DTYPES[tensor.datatype]
    return np.asarray(tensor.data, dtype=dtype)


class OutputFile:
    """Writes record batches to ``path`` as CSV, Parquet or JSON lines, one set of columns per file.

    The columns are those of the first batch with outputs: batches before it (rows that all failed) wait
    for it in memory; later batches without outputs get null outputs; a later output that the first lacks
    is an :class:`ExportError` for CSV and Parquet (JSON lines take rows of any shape)."""

    def __init__(self, path: Path, fmt: str, id_header: str) -> None:
        self.path = path
        self.fmt = fmt
        self.leading = [id_header, *ERROR_COLUMNS]
        self._handle: IO[bytes] = path.open("wb")
        self._schema: pa.Schema | None = None
        self._writer: pq.ParquetWriter | None = None
        self._waiting: list[pa.RecordBatch] = []

    def write(self, batch: pa.RecordBatch) -> None:
        """Append ``batch``'s rows."""
        if self.fmt == "jsonl":
            self._handle.write(jsonl_lines(batch, len(self.leading)))
            return
        if self._schema is None:
            if batch.num_columns == len(self.leading):  # no outputs: the columns are not known yet
                self._waiting.append(batch)
                return
            self._start(batch.schema)
            for waiting in self._waiting:
                self._append(waiting)
            self._waiting = []
        self._append(batch)

    def close(self) -> None:
        """Finish the file (footer, flush) and make it durable."""
        if self.fmt != "jsonl" and self._schema is None and self._waiting:
            self._start(self._waiting[0].schema)
            for waiting in self._waiting:
                self._append(waiting)
        if self._writer is not None:
            self._writer.close()
        if self.fmt == "csv" and self._schema is None:
            self._handle.write(_csv_header(self.leading))
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()

    def abandon(self) -> None:
        """Close without finishing (the caller removes the file)."""
        self._handle.close()

    def _start(self, schema: pa.Schema) -> None:
        self._schema = schema
        if self.fmt == "parquet":
            self._writer = pq.ParquetWriter(self._handle, schema)
            return
        self._handle.write(_csv_header(schema.names))

    def _append(self, batch: pa.RecordBatch) -> None:
        assert self._schema is not None
        conformed = _conform(batch, self._schema, self.fmt)
        if self._writer is not None:
            self._writer.write_batch(conformed)
            return
        # Text is quoted only in a batch where some value needs it (a comma, a quote, a line break), so
        # ids and codes read as a spreadsheet or pandas would write them; pyarrow quotes every string or none.
        quoting = "needed" if _needs_quotes(conformed) else "none"
        pacsv.write_csv(conformed, self._handle, pacsv.WriteOptions(include_header=False, quoting_style=quoting))


def _conform(batch: pa.RecordBatch, schema: pa.Schema, fmt: str) -> pa.RecordBatch:
    """``batch`` with the file's columns: outputs it lacks as nulls, its types cast to the file's."""
    extra = [name for name in batch.schema.names if name not in schema.names]
    if extra:
        raise ExportError(
            f"rows from id {batch.column(0)[0].as_py()!r} on have outputs {extra} that earlier rows lack; "
            f"a {fmt} file has one set of columns (write a .jsonl file for results of different shapes)"
        )
    columns = []
    for field in schema:
        index = batch.schema.get_field_index(field.name)
        column = pa.nulls(batch.num_rows, field.type) if index < 0 else batch.column(index)
        if column.type != field.type:
            try:
                column = column.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise ExportError(
                    f"column {field.name!r} holds {column.type} values where earlier rows hold {field.type}"
                ) from None
        columns.append(column)
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def _needs_quotes(batch: pa.RecordBatch) -> bool:
    """True when a text value of ``batch`` holds a character CSV must quote."""
    for column in batch.columns:
        text = pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
        if text and pc.any(pc.match_substring_regex(column, r'[,"\r\n]')).as_py():
            return True
    return False


def _csv_header(names: Sequence[str]) -> bytes:
    """A header line quoted only where a name needs it, as most CSV writers do."""
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerow(names)
    return text.getvalue().encode()


def jsonl_lines(batch: pa.RecordBatch, leading: int) -> bytes:
    """``batch`` as JSON lines: the first ``leading`` columns always (``null`` where empty), the outputs only
    where the row has them, numbers in their type's shortest form (non-finite floats as ``null``)."""
    names = [orjson.dumps(name).decode() + ":" for name in batch.schema.names]
    tokens = [_json_tokens(column) for column in batch.columns]
    lines = []
    for row in range(batch.num_rows):
        fields = [names[i] + (tokens[i][row] or "null") for i in range(leading)]
        fields.extend(names[i] + token for i in range(leading, len(names)) if (token := tokens[i][row]) is not None)
        lines.append("{" + ",".join(fields) + "}\n")
    return "".join(lines).encode()


def _json_tokens(column: pa.Array) -> list[str | None]:
    """Each value of ``column`` as JSON text; ``None`` where it is null."""
    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return [None if value is None else orjson.dumps(value).decode() for value in column.to_pylist()]
    if pa.types.is_boolean(kind) or pa.types.is_integer(kind):
        return pc.cast(column, pa.string()).to_pylist()  # type: ignore[no-any-return]
    if pa.types.is_floating(kind):
        finite = pc.is_finite(column)
        return pc.if_else(finite, pc.cast(column, pa.string()), "null").to_pylist()  # type: ignore[no-any-return]
    return [None if value is None else orjson.dumps(value, default=str).decode() for value in column.to_pylist()]

"""Files and frames read a block of columns at a time with pyarrow: CSV, Parquet and JSONL files, pandas
DataFrames and pyarrow tables, each block typed for the model (see :mod:`inferq.shared.tables.block`).

pyarrow parses and casts whole columns in C++; Python sees a block, never a row. A value that does not fit
its column is found by the same casts (a column that fails one is read again value by value with the row
reader's rules, so the two accept the same files), and the error names the file, the line (CSV, JSONL) or
row (Parquet, frames) and the column, as :mod:`inferq.shared.tables.rowfile` does. JSON lines pyarrow cannot
read as one table (arrays by position, an id that is a number on one line and text on another) are read by
the row reader instead, a block at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from inferq.shared.contract.messages import NUMPY_DTYPES, Datatype
from inferq.shared.tables.block import Block, ColumnData
from inferq.shared.tables.rowfile import (
    CSV_SUFFIXES,
    JSONL_SUFFIXES,
    RowFileError,
    csv_header,
    read_records,
)
from inferq.shared.tables.table import RowError, Table, converter

PARQUET_SUFFIXES = frozenset({".parquet", ".pq"})
READ_BLOCK_BYTES = 4 << 20
"""Bytes of CSV or JSONL parsed at a time: a block of tens of thousands of rows, memory bounded by it."""
BATCH_ROWS = 65536
"""Rows per block from Parquet files, frames and the row reader."""

_FLOATS = frozenset({Datatype.FP16, Datatype.FP32, Datatype.FP64})


@dataclass(frozen=True, slots=True)
class Source:
    """Where the model's columns come from: the file's column (or key) for each, its label in messages
    (``'age'`` by name, ``2`` by position) and the type the model reads."""

    names: tuple[str, ...]
    labels: tuple[str, ...]
    datatypes: tuple[Datatype, ...]


def file_kind(path: Path) -> str:
    """``"csv"``, ``"parquet"`` or ``"jsonl"`` by the file's extension; raises :class:`RowFileError` otherwise."""
    suffix = path.suffix.lower()
    for kind, suffixes in (("csv", CSV_SUFFIXES), ("parquet", PARQUET_SUFFIXES), ("jsonl", JSONL_SUFFIXES)):
        if suffix in suffixes:
            return kind
    raise RowFileError(f"{path}: expected a .csv, .parquet or .jsonl file")


def read_blocks(path: Path, table: Table, id_column: str | None) -> Iterator[Block]:
    """Every row of the file at ``path`` in typed blocks, in file order; raises :class:`RowFileError` (file,
    line or row, column) for a missing column, a value that does not fit or an empty id."""
    kind = file_kind(path)
    if not path.is_file():
        raise RowFileError(f"{path}: no such file")
    if kind == "parquet":
        yield from _parquet_blocks(path, table, id_column)
    elif kind == "csv":
        yield from _csv_blocks(path, table, id_column)
    else:
        yield from _jsonl_blocks(path, table, id_column)


def frame_blocks(frame: Any, table: Table) -> Iterator[Block]:
    """The rows of a pandas DataFrame or a pyarrow table in typed blocks (errors name the row, from 1)."""
    arrow = frame if isinstance(frame, pa.Table) else pa.Table.from_pandas(frame, preserve_index=False)
    source = _source(table, arrow.column_names, None, "")
    start = 0
    for batch in arrow.to_batches(max_chunksize=BATCH_ROWS):
        yield _typed(batch, start, source, None, _row_locator("row"))
        start += batch.num_rows


# -- which columns, in which order -------------------------------------------------------------------------


def _source(
    table: Table, available: list[str], id_column: str | None, where: str, place: str = "", first_row: str = ""
) -> Source:
    """The columns to read for ``table`` out of ``available``; a missing one is an error starting with
    ``where`` (the file, and its line 1 for a CSV header) and saying ``place`` (`` in the header``); too
    many or too few for a model that reads by position, one starting with ``first_row`` (or ``where``)."""
    wanted = ([id_column] if id_column else []) + ([c.name for c in table.columns] if table.named else [])
    absent = next((name for name in wanted if name not in available), None)
    prefix = f"{where}: " if where else ""
    if absent is not None:
        raise RowFileError(f"{prefix}no column {absent!r}{place} ({table.label()} reads {table.describe()})")
    if table.named:
        return Source(
            tuple(c.name for c in table.columns),
            tuple(repr(c.name) for c in table.columns),
            tuple(c.datatype for c in table.columns),
        )
    positional = [name for name in available if name != id_column]
    if table.any_width is not None:
        datatypes = (table.any_width.datatype,) * len(positional)
    elif len(positional) != len(table.columns):
        count = f"{len(positional)} value" + ("" if len(positional) == 1 else "s")
        start = f"{first_row}: " if first_row else prefix
        raise RowFileError(f"{start}{count}, {table.label()} takes {len(table.columns)}")
    else:
        datatypes = tuple(c.datatype for c in table.columns)
    return Source(tuple(positional), tuple(str(i + 1) for i in range(len(positional))), datatypes)


# -- Parquet ---------------------------------------------------------------------------------------------


def _parquet_blocks(path: Path, table: Table, id_column: str | None) -> Iterator[Block]:
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise RowFileError(f"{path}: not Parquet ({_first_line(exc)})") from None
    with parquet:
        names = parquet.schema_arrow.names
        source = _source(table, names, id_column, str(path))
        start = 0
        columns = ([id_column] if id_column else []) + list(source.names)
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns):
            yield _typed(batch, start, source, id_column, _row_locator(str(path)))
            start += batch.num_rows


# -- CSV -------------------------------------------------------------------------------------------------


def _csv_blocks(path: Path, table: Table, id_column: str | None) -> Iterator[Block]:
    header = csv_header(path)  # the row reader's own reading: a header that is not UTF-8 is named as it names it
    if not header:
        return
    source = _source(table, header, id_column, f"{path}:1", " in the header", first_row=f"{path}:{line_of(path, 0)}")
    wanted = ([id_column] if id_column else []) + list(source.names)
    convert = pa_csv.ConvertOptions(
        column_types=dict.fromkeys(wanted, pa.string()), include_columns=wanted, strings_can_be_null=False
    )
    read = pa_csv.ReadOptions(block_size=READ_BLOCK_BYTES)
    # NOTE: quoted values may hold line breaks, as Python's csv module allows.
    parse = pa_csv.ParseOptions(newlines_in_values=True)
    locate = _line_locator(path, table, id_column)
    start = 0
    try:
        with pa_csv.open_csv(path, read_options=read, parse_options=parse, convert_options=convert) as reader:
            for batch in reader:
                yield _typed(batch, start, source, id_column, locate)
                start += batch.num_rows
    except pa.ArrowInvalid as exc:
        # A row pyarrow cannot parse (too many cells, not UTF-8): the row reader names its line.
        _explain(path, table, id_column, None)
        raise RowFileError(f"{path}: not CSV ({_first_line(exc)})") from None


# -- JSONL ------------------------------------------------------------------------------------------------


def _jsonl_blocks(path: Path, table: Table, id_column: str | None) -> Iterator[Block]:
    locate = _line_locator(path, table, id_column)
    start = 0
    try:
        read = pa_json.ReadOptions(block_size=READ_BLOCK_BYTES)
        with pa_json.open_json(path, read_options=read) as reader:
            for batch in reader:
                names = batch.schema.names
                wanted = ([id_column] if id_column else []) + ([c.name for c in table.columns] if table.named else [])
                if not set(wanted) <= set(names):
                    raise _NotOneTable
                source = _source(table, names, id_column, str(path), first_row=f"{path}:{line_of(path, start)}")
                yield _typed(batch, start, source, id_column, locate)
                start += batch.num_rows
        return
    except (pa.ArrowInvalid, pa.ArrowTypeError, _NotOneTable):
        # Not one table to pyarrow (arrays, a key absent from a block, an id of two types): the row reader
        # either names the line at fault or reads the rest of the file itself.
        _explain(path, table, id_column, None)
    yield from _record_blocks(path, table, id_column, skip=start)


def _record_blocks(path: Path, table: Table, id_column: str | None, skip: int) -> Iterator[Block]:
    """The rows after the first ``skip`` of a file, read by the row reader and gathered into blocks."""
    records = islice(read_records(path), skip, None)
    start = skip
    while chunk := list(islice(records, BATCH_ROWS)):
        ids: list[Any] = []
        rows = []
        for record in chunk:
            values = record.values
            if id_column is not None and isinstance(values, dict):
                ids.append(values.pop(id_column, None))
            try:
                rows.append(table.values(values))
            except RowError as exc:
                raise RowFileError(f"{path}:{record.line}: {exc.detail}") from None
        width = len(rows[0])
        datatypes = [table.any_width.datatype] * width if table.any_width else [c.datatype for c in table.columns]
        columns = tuple(_array([row[i] for row in rows], datatypes[i]) for i in range(width))
        id_array = None
        if id_column is not None:  # checked by the row reader already (see _explain)
            id_array = np.empty(len(ids), dtype=np.object_)
            id_array[:] = ids
        yield Block(start, id_array, columns)
        start += len(chunk)


# -- typing a batch ----------------------------------------------------------------------------------------


Locate = Callable[[int, str], str]
"""A full one-line error message for row ``index`` of the file (0-based) and what is wrong with it."""


def _typed(batch: pa.RecordBatch, start: int, source: Source, id_column: str | None, locate: Locate) -> Block:
    ids = _ids(batch.column(id_column) if id_column else None, start, id_column, locate)
    columns = []
    for name, label, datatype in zip(source.names, source.labels, source.datatypes, strict=True):
        try:
            columns.append(_column(batch.column(name), datatype))
        except _BadValue as bad:
            raise RowFileError(
                locate(start + bad.index, f"column {label}: {bad.problem} ({datatype} needed)")
            ) from None
    return Block(start, ids, tuple(columns))


def _ids(array: pa.Array | None, start: int, id_column: str | None, locate: Locate) -> ColumnData | None:
    """The ids as given (text or numbers), refusing a missing or empty one."""
    if array is None or id_column is None:
        return None
    values: ColumnData = array.to_numpy(zero_copy_only=False)
    if pa.types.is_boolean(array.type) or values.dtype.kind not in "iufOU":
        raise RowFileError(locate(start, f"column {id_column!r}: {values[0]!r} is not an id (text or a number)"))
    if array.null_count:
        first = int(pc.index(pc.is_null(array), True).as_py())
        raise RowFileError(locate(start + first, f"no column {id_column!r}"))
    if values.dtype.kind == "O":
        empty = np.flatnonzero(values == "")
        if empty.size:
            raise RowFileError(
                locate(start + int(empty[0]), f"column {id_column!r}: '' is not an id (text or a number)")
            )
    return values


class _NotOneTable(Exception):
    """JSON lines whose blocks do not all hold the columns the model reads."""


class _BadValue(Exception):
    def __init__(self, index: int, problem: str) -> None:
        super().__init__(problem)
        self.index = index
        self.problem = problem


def _column(array: pa.Array, datatype: Datatype) -> ColumnData:
    """``array`` as the wire carries ``datatype``; a value that does not fit raises :class:`_BadValue`."""
    try:
        fast = _cast(array, datatype)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OverflowError, ValueError):
        fast = None
    if fast is not None:
        return fast
    # The cast refused something: the row reader's rules, value by value, say what (or accept it).
    read = converter(datatype)
    values = []
    for index, value in enumerate(array.to_pylist()):
        try:
            values.append(read(value))
        except ValueError as exc:
            raise _BadValue(index, str(exc)) from None
    return _array(values, datatype)


def _cast(array: pa.Array, datatype: Datatype) -> ColumnData | None:
    """The whole column cast at once, or ``None`` when a value needs a closer look."""
    if array.null_count:
        return None
    kind = array.type
    if datatype is Datatype.BYTES:
        return (
            array.to_numpy(zero_copy_only=False) if pa.types.is_string(kind) or pa.types.is_large_string(kind) else None
        )
    if datatype is Datatype.BOOL:
        if not (pa.types.is_boolean(kind) or pa.types.is_string(kind)):
            return None
        return np.asarray(pc.cast(array, pa.bool_()).to_numpy(zero_copy_only=False), dtype=np.bool_)
    if pa.types.is_boolean(kind) or not (
        pa.types.is_string(kind) or pa.types.is_integer(kind) or pa.types.is_floating(kind)
    ):
        return None
    if datatype in _FLOATS:
        numbers = pc.cast(array, pa.float64()).to_numpy()
        return numbers if bool(np.isfinite(numbers).all()) else None
    if pa.types.is_floating(kind):
        return None  # 3.0 is an integer, 3.5 is not: the row reader's rule decides
    integers: ColumnData = pc.cast(array, pa.int64()).to_numpy()
    limits = np.iinfo(NUMPY_DTYPES[datatype])
    if integers.size and (int(integers.min()) < int(limits.min) or int(integers.max()) > int(limits.max)):
        return None
    return integers


def _array(values: list[Any], datatype: Datatype) -> ColumnData:
    """Values the row reader typed, as the wire carries ``datatype``."""
    if datatype is Datatype.BYTES:
        array = np.empty(len(values), dtype=np.object_)
        array[:] = values
        return array
    if datatype is Datatype.BOOL:
        return np.asarray(values, dtype=np.bool_)
    return np.asarray(values, dtype=np.float64 if datatype in _FLOATS else np.int64)


# -- naming the line at fault ---------------------------------------------------------------------------------


def _row_locator(where: str) -> Locate:
    """Errors of a Parquet file or a frame: ``<file>: row 7: <why>`` (rows from 1)."""

    def locate(index: int, why: str) -> str:
        return f"{where}: row {index + 1}: {why}" if where != "row" else f"row {index + 1}: {why}"

    return locate


def _line_locator(path: Path, table: Table, id_column: str | None) -> Locate:
    """Errors of a CSV or JSONL file: the row reader reads the file up to the row at fault, so the message
    is the one it gives (``<file>:<line>: <why>``, the line as an editor counts it)."""

    def locate(index: int, why: str) -> str:
        _explain(path, table, id_column, index)
        line = line_of(path, index)
        return f"{path}:{line}: {why}"

    return locate


def line_of(path: Path, index: int) -> int:
    """The line of data row ``index`` (0-based) of a CSV or JSONL file, blank lines and quoted line breaks
    counted; read row by row, so only for naming a row in a message."""
    record = next(islice(read_records(path), index, None), None)
    return record.line if record is not None else index + 1


def _explain(path: Path, table: Table, id_column: str | None, upto: int | None) -> None:
    """Read the file (up to data row ``upto``) with the row reader and raise the first error it finds."""
    for count, record in enumerate(read_records(path)):
        values = record.values
        if id_column is not None:
            if not isinstance(values, dict):
                raise RowFileError(f"{path}:{record.line}: --id-column needs objects, found an array")
            problem = id_problem(values.pop(id_column, None), id_column)
            if problem is not None:
                raise RowFileError(f"{path}:{record.line}: {problem}")
        try:
            table.values(values)
        except RowError as exc:
            raise RowFileError(f"{path}:{record.line}: {exc.detail}") from None
        if upto is not None and count >= upto:
            return


def id_problem(value: object, id_column: str) -> str | None:
    """What is wrong with ``value`` as a row's id (text or a number, not empty), or ``None``. Any text will
    do (an e-mail address, a name with spaces): an id that cannot be part of a job id makes a digest id."""
    if value is None:
        return f"no column {id_column!r}"
    if isinstance(value, bool) or not isinstance(value, str | int | float) or str(value) == "":
        return f"column {id_column!r}: {value!r} is not an id (text or a number)"
    return None


def place_of(path: Path, index: int) -> tuple[str, str]:
    """Where data row ``index`` (0-based) is, for messages: ``("data.csv:8", "line 8")``, or for Parquet
    ``("data.parquet: row 7", "row 7")``. CSV and JSONL lines are counted by reading the file."""
    if file_kind(path) == "parquet":
        return f"{path}: row {index + 1}", f"row {index + 1}"
    line = line_of(path, index)
    return f"{path}:{line}", f"line {line}"


def first_line(path: Path) -> int:
    """The line (Parquet: the row number) of the first data row: a row's key when the file gives no ids
    (the line of a file of one line per row)."""
    return 2 if file_kind(path) == "csv" else 1


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__

"""Jobs built from rows of named columns, for the :class:`~producer.client.Producer`.

The wire contract stays Open Inference Protocol tensors (one per model input); these helpers build
them from what callers hold: a list of objects (``[{"city": "rome", "age": 61}]``), rows in column
order, or a mapping of column name → values. The :class:`~inferq.shared.tables.table.Table` says how: read it from
the model store with ``inferq.model_store.base.read_table(store, model, version)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

from inferq.producer.client import new_job_id
from inferq.shared.contract.messages import Job, VersionRef
from inferq.shared.tables.table import Record, RowError, Table


def job_from_rows(
    table: Table,
    rows: Sequence[Record],
    *,
    job_id: str | None = None,
    version: VersionRef | None = None,
    parameters: dict[str, Any] | None = None,
    deadline: datetime | None = None,
) -> Job:
    """One job for ``rows`` (objects by column name, extra names ignored; or arrays in column order).

    The job runs the table's model at the table's version unless ``version`` says otherwise; raises
    :class:`inferq.shared.tables.table.RowError` naming the row and column of a value that is missing or
    does not fit."""
    return _job(table, table.rows_to_tensors(rows), job_id, version, parameters, deadline)


def job_from_columns(
    table: Table,
    columns: Mapping[str, Sequence[Any]],
    *,
    job_id: str | None = None,
    version: VersionRef | None = None,
    parameters: dict[str, Any] | None = None,
    deadline: datetime | None = None,
) -> Job:
    """One job for a mapping of column name → values, all of one length (extra columns ignored)."""
    return _job(table, table.columns_to_tensors(columns), job_id, version, parameters, deadline)


def jobs_from_rows(
    table: Table, rows: Iterable[Record], *, rows_per_job: int = 1, version: VersionRef | None = None
) -> Iterator[Job]:
    """Jobs of ``rows_per_job`` rows each (fresh ids), lazily: feed them to ``Producer.publish_many``."""
    chunk: list[Record] = []
    start = 0
    for row in rows:
        chunk.append(row)
        if len(chunk) == rows_per_job:
            yield _numbered(table, chunk, start, version)
            start += len(chunk)
            chunk = []
    if chunk:
        yield _numbered(table, chunk, start, version)


def _numbered(table: Table, chunk: list[Record], start: int, version: VersionRef | None) -> Job:
    """A job for ``chunk``, whose errors count rows from the start of the whole sequence."""
    try:
        return job_from_rows(table, chunk, version=version)
    except RowError as exc:
        raise RowError(start + exc.row, exc.column, exc.problem) from None


def _job(
    table: Table,
    inputs: list[Any],
    job_id: str | None,
    version: VersionRef | None,
    parameters: dict[str, Any] | None,
    deadline: datetime | None,
) -> Job:
    return Job(
        id=job_id or new_job_id(),
        model=table.model,
        version=table.version if version is None else version,
        inputs=inputs,
        parameters=parameters or {},
        deadline=deadline,
    )

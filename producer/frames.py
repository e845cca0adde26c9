"""Scoring a pandas DataFrame (or a pyarrow table) through the fleet, on the backfill's columnar path.

The frame is cut into blocks of typed columns (:func:`inferq.shared.tables.columnar.frame_blocks`), the
blocks into jobs of many rows with content-derived ids (:mod:`inferq.producer.backfill`): scoring the same
frame again on the same version publishes nothing and reads the stored results. The predictions come back
as a DataFrame in the frame's row order and index: ``error_code`` (``None`` where the row's job succeeded),
then one column per output value (``label``, ``probabilities_0``, ``probabilities_1``, ...).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from inferq.model_store.base import read_table
from inferq.model_store.stores import open_model_store
from inferq.producer.backfill import (
    SKIP_CHECK_JOBS,
    SKIP_CHECK_ROWS,
    answers,
    chunks,
    planned_jobs,
    rows_per_job,
)
from inferq.producer.client import Encoded
from inferq.shared.contract.messages import NUMPY_DTYPES, Datatype, Result, Status, VersionRef
from inferq.shared.extras import TABLES, needs_extra
from inferq.shared.results.base import ResultStore
from inferq.shared.results.stores import open_result_store

if TYPE_CHECKING:
    from inferq.producer.client import Producer

POLL_S = 0.2


@dataclass(frozen=True, slots=True)
class _Planned:
    job_id: str
    digest: str
    rows: int


def score_frame(
    producer: Producer,
    frame: Any,
    model: str,
    version: VersionRef = "latest",
    *,
    batch_rows: int | None = None,
    timeout_s: float = 600.0,
) -> Any:
    """The predictions of ``model`` at ``version`` for every row of ``frame`` (a pandas DataFrame or a
    pyarrow table), as a DataFrame in the frame's order; see :meth:`Producer.score_frame`."""
    with needs_extra(TABLES, "Producer.score_frame"):
        import pandas as pd  # type: ignore[import-untyped]  # noqa: PLC0415  (the tables extra)

        from inferq.shared.tables import columnar  # noqa: PLC0415
    settings = producer.settings
    table = read_table(open_model_store(settings.model_store), model, version)
    rows = batch_rows or rows_per_job(table, settings.max_message_bytes)
    results = open_result_store(settings.result_store)
    try:
        order: list[_Planned] = []
        blocks = columnar.frame_blocks(frame, table)
        producer.publish_many(_unanswered(planned_jobs(blocks, table, rows), results, rows, order))
        found = _wait(results, order, time.monotonic() + timeout_s)
    finally:
        results.close()
    index = frame.index if isinstance(frame, pd.DataFrame) else None
    return pd.DataFrame(_columns(order, found), index=index)


def _unanswered(jobs: Iterator[Any], results: ResultStore, rows: int, order: list[_Planned]) -> Iterator[Encoded]:
    """The jobs without a stored result of their own, each noted in ``order`` (all of them, in order)."""
    for group in chunks(jobs, max(1, min(SKIP_CHECK_JOBS, SKIP_CHECK_ROWS // rows))):
        stored = results.get_many([planned.job_id for planned in group])
        for planned in group:
            order.append(_Planned(planned.job_id, planned.digest, planned.rows))
            earlier = stored.get(planned.job_id)
            if earlier is None or not answers(earlier, planned.digest):
                yield Encoded(planned.job_id, planned.body)


def _wait(results: ResultStore, order: list[_Planned], deadline: float) -> dict[str, Result]:
    """Every job's own result, read from the store as workers finish them; :class:`TimeoutError` past
    ``deadline`` (the jobs stay queued: calling again waits for them without publishing them twice)."""
    digests = {planned.job_id: planned.digest for planned in order}
    found: dict[str, Result] = {}
    pending = list(digests)
    while pending:
        for group in chunks(pending, SKIP_CHECK_JOBS):
            for job_id, result in results.get_many(group).items():
                if answers(result, digests[job_id]) or (
                    result.job_sha256 is None and result.status is not Status.SUCCEEDED
                ):
                    found[job_id] = result
        pending = [job_id for job_id in pending if job_id not in found]
        if pending and time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} of {len(order)} jobs have no result yet (they stay queued)")
        if pending:
            time.sleep(POLL_S)
    return found


def _columns(order: list[_Planned], found: dict[str, Result]) -> dict[str, Any]:
    """``error_code`` and one column per output value, every job's rows in order."""
    errors: list[str | None] = []
    outputs = []
    for planned in order:
        result = found[planned.job_id]
        errors.extend([None if result.error is None else result.error.code.value] * planned.rows)
        outputs.append(_outputs(result, planned.rows))
    columns: dict[str, Any] = {"error_code": errors}
    for name in dict.fromkeys(name for arrays in outputs for name in arrays):
        pieces = [arrays.get(name, planned.rows) for arrays, planned in zip(outputs, order, strict=True)]
        columns.update(_joined(name, pieces))
    return columns


def _outputs(result: Result, rows: int) -> dict[str, npt.NDArray[Any]]:
    """Each output of a succeeded result as a 2-D array of ``rows`` rows."""
    arrays: dict[str, npt.NDArray[Any]] = {}
    for tensor in result.outputs or []:
        dtype = NUMPY_DTYPES[tensor.datatype] if tensor.datatype is not Datatype.BYTES else np.object_
        arrays[tensor.name] = np.asarray(tensor.data, dtype=dtype).reshape(rows, -1)
    return arrays


def _joined(name: str, pieces: list[npt.NDArray[Any] | int]) -> dict[str, Any]:
    """An output's pieces (an array per job, or the row count of a job without it) as columns."""
    arrays = [p for p in pieces if not isinstance(p, int)]
    width = arrays[0].shape[1]
    dtype = np.result_type(*arrays) if all(a.dtype != np.object_ for a in arrays) else np.dtype(np.object_)
    if any(isinstance(p, int) for p in pieces) and dtype.kind in "iub":
        dtype = np.dtype(np.float64)  # a failed job's rows hold NaN
    filler = None if dtype == np.object_ else np.nan
    full = np.concatenate([p if not isinstance(p, int) else np.full((p, width), filler, dtype=dtype) for p in pieces])
    if width == 1:
        return {name: full[:, 0]}
    return {f"{name}_{i}": full[:, i] for i in range(width)}

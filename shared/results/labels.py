"""Ground truth beside the results: labels, and the row ids of backfill jobs, in the same store.

A label is the true value for one prediction, named by the id its user knows: a job id (``submit``, the
HTTP API, the producer) or a backfill row's id. It is kept per ``(model, id)``, and the first label of an
id wins, as the first result of a job id does. A backfill records which job (and which row of it) scores
each row id before it publishes, so a label given by row id finds its prediction whichever arrives
first. Every result store hands out its own :class:`LabelStore` (``ResultStore.labels()``): a table
beside the results in SQLite and PostgreSQL, ``_labels/`` and ``_rows/`` files in a directory or
objects in S3.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import orjson

from inferq.shared.contract.messages import Result

LabelValue = str | int | float | bool
"""A true class (text, an integer or a boolean) or a true number."""

LABELS_PREFIX = "_labels"
ROWS_PREFIX = "_rows"


@dataclass(frozen=True, slots=True)
class RowId:
    """Row ``index`` of job ``job_id`` scores the row its user calls ``row_id``."""

    row_id: str
    job_id: str
    index: int


@dataclass(frozen=True, slots=True)
class StoredResult:
    """A stored result and when it was stored (Unix seconds)."""

    result: Result
    stored_at_s: float


class LabelStore(Protocol):
    """Labels and backfill row ids of one result store, and its results with the time they were stored."""

    time_resolution_s: float
    """How finely the store keeps the time a result was stored (0 when exactly enough to order events a
    fraction of a second apart; 1 for S3, whose object times are whole seconds)."""

    def put_labels(self, model: str, labels: Sequence[tuple[str, LabelValue]]) -> int:
        """Store each ``(id, label)`` of ``model`` unless that id has a label already (the first wins);
        returns how many were new. Atomic as a whole where the store allows (SQLite, PostgreSQL)."""

    def labels(self, model: str) -> dict[str, LabelValue]:
        """Every stored label of ``model``, by id."""

    def labeled_models(self) -> list[str]:
        """The models that have at least one label."""

    def put_row_ids(self, model: str, rows: Sequence[RowId]) -> None:
        """Record which job row scores each row id (a pair recorded before is kept)."""

    def row_ids(self, model: str, row_ids: Sequence[str]) -> dict[str, list[tuple[str, int]]]:
        """The ``(job id, row index)`` pairs recorded for those of ``row_ids`` that have any."""

    def stored_results(self, job_ids: Sequence[str]) -> dict[str, StoredResult]:
        """The stored results of those of ``job_ids`` that have one, with their time."""

    def scan_results(self, model: str, since_s: float | None = None) -> Iterator[StoredResult]:
        """Every stored result of ``model`` stored at or after ``since_s`` (Unix seconds; all when None)."""

    def close(self) -> None:
        """Release what the label store opened itself (the result store keeps its own connections)."""


def label_json(value: LabelValue) -> str:
    """A label as stored: JSON, so a number stays a number and a text a text."""
    return orjson.dumps(value).decode()


def label_of(text: str | bytes) -> LabelValue:
    """A stored label read back."""
    value: LabelValue = orjson.loads(text)
    return value


def id_key(label_id: str) -> str:
    """A file name for any id (ids of backfill rows may hold any text)."""
    return hashlib.sha256(label_id.encode()).hexdigest()[:40]

"""The result store contract: every result, one JSON document per job id. Both sides read it.

``INFERQ_RESULT_STORE`` picks the store (see :func:`inferq.shared.results.stores.open_result_store`): a
SQLite database (the default, ``./var/results.db``), PostgreSQL, ``s3://bucket/prefix/<job id>.json``
objects or ``<dir>/<job id>.json`` files. Every store keeps one contract: a result is stored atomically,
so a reader sees either no result or the whole of it; the first result stored for an id wins: a second
one (the same job run twice, by two workers racing on a duplicate) is not written, and the caller gets
the stored one back to publish instead, except over a job rejected at decode whose message differs
(:func:`replaceable`: a corrected job may reuse the id of an invalid one); a batch is one transaction (or
one round of writes), durable once ``put_many`` returns.

Failures come in three kinds, each store telling them apart: ``StoreUnreachable`` (an ``OSError``: down,
timed out, throttled, a conflict with another writer; worth retrying), :class:`ValueRefused` (the content
of particular results cannot be stored; the others can) and :class:`StoreRefused` (the store refuses us:
credentials, permission, a missing bucket or table; no retry helps).
"""

from __future__ import annotations

import errno
from collections.abc import Iterator, Sequence
from typing import Protocol

from inferq.shared.contract.messages import Result, Status, is_valid_job_id
from inferq.shared.errors import ErrorCode, ResultNotFound, StoreRefused, StoreUnreachable
from inferq.shared.results.labels import LabelStore

# File-system errors that refuse the store as a whole: a retry finds the same permissions and mounts.
_REFUSING_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


class ResultStore(Protocol):
    """Where results are kept; the source of truth for "did this job finish"."""

    def put_many(self, results: Sequence[Result]) -> list[Result]:
        """Store each result unless its id already has one; return what is stored for each id, in order
        (the earlier result where there was one; a result this call stored is returned as the very object
        passed in). Atomic per result, durable on return. Raises ``OSError`` (transient),
        :class:`ValueRefused` or :class:`StoreRefused` on failure (see the module's docstring)."""

    def get(self, job_id: str) -> Result:
        """The stored result of ``job_id``; raises :class:`ResultNotFound`."""

    def get_many(self, job_ids: Sequence[str]) -> dict[str, Result]:
        """The stored results of those of ``job_ids`` that have one (in as few round trips as the store
        allows); ids without a result are absent from the answer."""

    def exists(self, job_id: str) -> bool:
        """True when a result of ``job_id`` is stored."""

    def scan(self, model: str | None = None) -> Iterator[Result]:
        """Every stored result (of ``model``, when given), streamed."""

    def count(self, model: str | None = None) -> int:
        """How many results :meth:`scan` would give."""

    def describe(self) -> str:
        """Where the store lives, for logs and messages (never with a password)."""

    def labels(self) -> LabelStore:
        """The labels and backfill row ids kept beside these results (:mod:`inferq.shared.results.labels`)."""

    def close(self) -> None:
        """Release connections and threads; the store may not be used afterwards."""


def checked_id(job_id: str) -> str:
    """``job_id``, if it may name a stored result (a file or an object key): a store never builds a path from
    anything else; raises :class:`ResultNotFound` otherwise."""
    if not is_valid_job_id(job_id):
        raise ResultNotFound(f"{job_id!r} is not a valid job id")
    return job_id


def replaceable(stored: Result, new: Result) -> bool:
    """True when ``new`` may replace ``stored`` despite "first result wins": ``stored`` rejects a message
    that could not be decoded (``invalid_payload``) and ``new`` answers another message under that id (its
    job digest differs). The same digest is a redelivery of that message: the stored rejection stays."""
    return rejects_another(stored, new.job_sha256)


def rejects_another(stored: Result, job_sha256: str | None) -> bool:
    """True when ``stored`` rejects a message that could not be decoded and the job of digest
    ``job_sha256`` is another message: ``stored`` is no answer for it."""
    return (
        stored.status is Status.FAILED
        and stored.error is not None
        and stored.error.code is ErrorCode.INVALID_PAYLOAD
        and stored.job_sha256 != job_sha256
    )


def classified_os_error(exc: OSError, what: str) -> StoreRefused | StoreUnreachable:
    """A file-system error as :class:`StoreRefused` (permission denied, a read-only file system) or
    ``StoreUnreachable`` (a full disk, an I/O error, a vanished mount: worth retrying)."""
    text = f"{what}: {exc.strerror or exc}"
    return StoreRefused(text) if exc.errno in _REFUSING_ERRNOS else StoreUnreachable(text)

"""The result store: every result, one JSON document per job id. Both sides read it.

``<root>/<job id>.json`` on a file system. Writes are atomic
(temporary file, then rename), so a reader sees either no result or the whole of it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from shared.errors import ResultNotFound, StoreError
from shared.messages import Result, is_valid_job_id


class ResultStore(Protocol):
    """Where results are kept; the source of truth for "did this job finish"."""

    def put_many(self, results: Sequence[Result]) -> None:
        """Store every result, atomically each; raises ``OSError`` (transient) on failure."""

    def get(self, job_id: str) -> Result:
        """The stored result of ``job_id``; raises :class:`ResultNotFound`."""

    def exists(self, job_id: str) -> bool:
        """True when a result of ``job_id`` is stored."""

    def describe(self) -> str:
        """Where the store lives, for logs and messages."""


def _checked_id(job_id: str) -> str:
    if not is_valid_job_id(job_id):
        raise ResultNotFound(f"{job_id!r} is not a valid job id")
    return job_id


class FileResultStore:
    """Results as files under a directory."""

    def __init__(self, root: str | Path, *, fsync: bool = True) -> None:
        self.root = Path(root)
        self.fsync = fsync

    def describe(self) -> str:
        return str(self.root)

    def _path(self, job_id: str) -> Path:
        return self.root / f"{_checked_id(job_id)}.json"

    def put_many(self, results: Sequence[Result]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for result in results:
            self._put(result)
        if self.fsync and results:
            # NOTE: the renames are durable only once the directory itself is synced.
            fd = os.open(self.root, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _put(self, result: Result) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=".partial")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(result.to_json())
                if self.fsync:
                    handle.flush()
                    os.fsync(handle.fileno())
            os.replace(tmp, self._path(result.id))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, job_id: str) -> Result:
        path = self._path(job_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ResultNotFound(f"no result for job {job_id!r} in {self.root}") from None
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc.strerror}") from None
        return Result.model_validate_json(data)

    def exists(self, job_id: str) -> bool:
        return is_valid_job_id(job_id) and self._path(job_id).is_file()


def open_result_store(location: str, *, fsync: bool = True) -> ResultStore:
    """The result store at ``location``: a directory path."""
    if location.startswith("s3://"):
        raise StoreError("s3:// result stores are not available in this build")
    return FileResultStore(location, fsync=fsync)

"""The result store: every result, one JSON document per job id. Both sides read it.

``<root>/<job id>.json`` on a file system. Writes are atomic
(temporary file, then rename), so a reader sees either no result or the whole of it.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
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


_temporary_numbers = itertools.count()


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
        if not results:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        root = str(self.root)
        staged: list[tuple[str, str]] = []
        try:
            for result in results:
                staged.append((self._write_temporary(result), f"{root}/{_checked_id(result.id)}.json"))
            if self.fsync:
                # Data first, then the renames: a result is never visible, even after a crash, before
                # its whole content is on disk. One flush for the batch instead of one per file.
                _flush_files([tmp for tmp, _ in staged], self.root)
            while staged:
                tmp, final = staged[-1]
                os.replace(tmp, final)
                staged.pop()
        finally:
            for tmp, _ in staged:
                Path(tmp).unlink(missing_ok=True)
        if self.fsync:
            _fsync_path(self.root)  # NOTE: the renames are durable only once the directory itself is synced.

    def _write_temporary(self, result: Result) -> str:
        # A name unique to this process (the pid) and call (the counter) needs no random retries.
        tmp = f"{self.root}/.tmp-{os.getpid()}-{next(_temporary_numbers)}.json"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # left by a crashed process whose pid came back
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=".json")
        try:
            data = memoryview(result.to_json())
            while data:
                data = data[os.write(fd, data) :]
        except BaseException:
            os.unlink(tmp)
            raise
        finally:
            os.close(fd)
        return tmp

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


def _fsync_path(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_syncfs() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function: Callable[[int], int] | None = getattr(ctypes.CDLL(None, use_errno=True), "syncfs", None)
    except OSError:
        return None
    return function


_syncfs = _load_syncfs()


def _flush_files(paths: Sequence[str], directory: Path) -> None:
    """Make the content of every file in ``paths`` durable.

    On Linux one ``syncfs(2)`` of the file system holding ``directory`` does it in one journal commit;
    an ``fsync`` per file costs a commit each (about 0.5 ms per result on the benchmark machine).
    NOTE: syncfs also flushes other processes' dirty data on that file system; a store on a busy
    shared disk pays for their writes too. Elsewhere, each file is fsynced.
    """
    if _syncfs is not None:
        fd = os.open(directory, os.O_RDONLY)
        try:
            if _syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"syncfs of {directory} failed: {os.strerror(err)}")
        finally:
            os.close(fd)
        return
    for path in paths:
        _fsync_path(path)


def open_result_store(location: str, *, fsync: bool = True) -> ResultStore:
    """The result store at ``location``: a directory path."""
    if location.startswith("s3://"):
        raise StoreError("s3:// result stores are not available in this build")
    return FileResultStore(location, fsync=fsync)

"""The result store: every result, one JSON document per job id. Both sides read it.

``<root>/<job id>.json`` on a file system, or ``s3://bucket/prefix/<job id>.json``. Writes are atomic
(temporary file then link; a single S3 PUT), so a reader sees either no result or the whole of it.
The first result stored for an id wins: a second one (the same job run twice, by two workers racing
on a duplicate) is not written, and the caller gets the stored one back to publish instead.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Protocol

from shared.errors import ResultNotFound, StoreError
from shared.messages import Result, is_valid_job_id
from shared.s3 import S3Location, is_not_found, is_precondition_failed, is_s3, make_client, translate

S3_WRITE_CONCURRENCY = 16


class ResultStore(Protocol):
    """Where results are kept; the source of truth for "did this job finish"."""

    def put_many(self, results: Sequence[Result]) -> list[Result]:
        """Store each result unless its id already has one; return what is stored for each id, in order
        (the earlier result where there was one). Raises ``OSError`` (transient) on failure."""

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

    def put_many(self, results: Sequence[Result]) -> list[Result]:
        if not results:
            return []
        self.root.mkdir(parents=True, exist_ok=True)
        root = str(self.root)
        staged: list[tuple[str, str]] = []
        stored: list[Result] = []
        try:
            for result in results:
                staged.append((self._write_temporary(result), f"{root}/{_checked_id(result.id)}.json"))
            if self.fsync:
                # Data first, then the names: a result is never visible, even after a crash, before
                # its whole content is on disk. One flush for the batch instead of one per file.
                _flush_files([tmp for tmp, _ in staged], self.root)
            for result, (tmp, final) in zip(results, staged, strict=True):
                try:
                    os.link(tmp, final)  # unlike a rename, fails when the id has a result: the first wins
                    stored.append(result)
                except FileExistsError:
                    stored.append(self.get(result.id))
        finally:
            for tmp, _ in staged:
                Path(tmp).unlink(missing_ok=True)
        if self.fsync:
            _fsync_path(self.root)  # NOTE: the new names are durable only once the directory itself is synced.
        return stored

    def _write_temporary(self, result: Result) -> str:
        # A name unique to this process (the pid) and call (the counter) needs no random retries.
        tmp = f"{self.root}/.tmp-{os.getpid()}-{next(_temporary_numbers)}.partial"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # left by a crashed process whose pid came back
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=".partial")
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


class S3ResultStore:
    """Results as objects under ``s3://bucket/prefix``; a batch is written by a bounded pool of threads."""

    def __init__(self, location: S3Location, client: Any | None = None, *, concurrency: int = S3_WRITE_CONCURRENCY):
        self.location = location
        self.concurrency = concurrency
        self._client = client if client is not None else make_client(max_pool_connections=concurrency)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def describe(self) -> str:
        return str(self.location)

    def _key(self, job_id: str) -> str:
        return self.location.key(f"{_checked_id(job_id)}.json")

    def put_many(self, results: Sequence[Result]) -> list[Result]:
        """Returns only once every result is stored; raises ``StoreUnreachable`` (an ``OSError``) if any
        write failed, after all writes of the batch have finished (a retry finds its own earlier writes)."""
        if len(results) <= 1:
            return [self._put(result) for result in results]
        pool = self._executor()
        futures: list[Future[Result]] = [pool.submit(self._put, result) for result in results]
        wait(futures)
        for future in futures:
            error = future.exception()
            if error is not None:
                raise error
        return [future.result() for future in futures]

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="inferq-s3-put")
            return self._pool

    def _put(self, result: Result) -> Result:
        key = self._key(result.id)
        try:
            self._client.put_object(
                Bucket=self.location.bucket,
                Key=key,
                Body=result.to_json(),
                ContentType="application/json",
                IfNoneMatch="*",  # the first result of an id wins
            )
            return result
        except Exception as exc:  # boto3 raises ClientError, BotoCoreError and urllib3 errors
            if is_precondition_failed(exc):
                return self.get(result.id)
            # Any failed write is retried by the worker (nothing is acked meanwhile): a missing bucket
            # or a revoked key shows as a repeated warning until an operator fixes it, not as a lost job.
            raise translate(exc, f"put s3://{self.location.bucket}/{key}", always_transient=True) from None

    def get(self, job_id: str) -> Result:
        key = self._key(job_id)
        try:
            response = self._client.get_object(Bucket=self.location.bucket, Key=key)
            data = response["Body"].read()
        except Exception as exc:  # see _put
            if is_not_found(exc):
                raise ResultNotFound(f"no result for job {job_id!r} in {self.location}") from None
            raise translate(exc, f"get s3://{self.location.bucket}/{key}") from None
        return Result.model_validate_json(data)

    def exists(self, job_id: str) -> bool:
        if not is_valid_job_id(job_id):
            return False
        key = self._key(job_id)
        try:
            self._client.head_object(Bucket=self.location.bucket, Key=key)
        except Exception as exc:  # see _put
            if is_not_found(exc):
                return False
            raise translate(exc, f"head s3://{self.location.bucket}/{key}") from None
        return True

    def close(self) -> None:
        """Stop the write threads (idle ones; a running put_many finishes first)."""
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None


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
    """The result store at ``location``: ``s3://bucket/prefix`` or a directory path."""
    if is_s3(location):
        return S3ResultStore(S3Location.parse(location))
    return FileResultStore(location, fsync=fsync)

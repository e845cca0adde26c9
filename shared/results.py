"""The result store: every result, one JSON document per job id. Both sides read it.

``INFERQ_RESULT_STORE`` picks the store (see :func:`open_result_store`): a SQLite database (the default,
``./var/results.db``), PostgreSQL, ``s3://bucket/prefix/<job id>.json`` objects or ``<dir>/<job id>.json``
files. Every store keeps one contract: a result is stored atomically, so a reader sees either no result
or the whole of it; the first result stored for an id wins: a second one (the same job run twice, by two
workers racing on a duplicate) is not written, and the caller gets the stored one back to publish
instead; a batch is one transaction (or one round of writes), durable once ``put_many`` returns.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from functools import partial
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from shared.errors import ConfigError, ResultNotFound, StoreError
from shared.messages import Result, is_valid_job_id
from shared.s3 import S3Location, is_not_found, is_precondition_failed, is_s3, make_client, translate
from shared.s3_put import SignedPutter

S3_WRITE_CONCURRENCY = 16
S3_SCAN_PAGE = 256


class ResultStore(Protocol):
    """Where results are kept; the source of truth for "did this job finish"."""

    def put_many(self, results: Sequence[Result]) -> list[Result]:
        """Store each result unless its id already has one; return what is stored for each id, in order
        (the earlier result where there was one; a result this call stored is returned as the very object
        passed in). Atomic per result, durable on return. Raises ``OSError`` (transient) on failure."""

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

    def close(self) -> None:
        """Release connections and threads; the store may not be used afterwards."""


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

    def get_many(self, job_ids: Sequence[str]) -> dict[str, Result]:
        found: dict[str, Result] = {}
        for job_id in job_ids:
            if is_valid_job_id(job_id):
                try:
                    found[job_id] = Result.model_validate_json(self._path(job_id).read_bytes())
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    raise StoreError(f"cannot read {self._path(job_id)}: {exc.strerror}") from None
        return found

    def exists(self, job_id: str) -> bool:
        return is_valid_job_id(job_id) and self._path(job_id).is_file()

    def _names(self) -> Iterator[str]:
        if not self.root.is_dir():
            return
        with os.scandir(self.root) as entries:
            for entry in entries:
                if entry.name.endswith(".json") and not entry.name.startswith("."):
                    yield entry.name

    def scan(self, model: str | None = None) -> Iterator[Result]:
        for name in sorted(self._names()):
            result = Result.model_validate_json((self.root / name).read_bytes())
            if model is None or result.model == model:
                yield result

    def count(self, model: str | None = None) -> int:
        if model is None:
            return sum(1 for _ in self._names())
        return sum(1 for _ in self.scan(model))

    def close(self) -> None:
        """Nothing to release: every call opens and closes its own files."""


class S3ResultStore:
    """Results as objects under ``s3://bucket/prefix``; a batch is written by a bounded pool of threads.

    Writes go through :class:`SignedPutter` (hand-signed PUTs on kept-alive connections) unless ``lean``
    is off or the client has no credentials it can use; reads go through boto3."""

    def __init__(
        self,
        location: S3Location,
        client: Any | None = None,
        *,
        concurrency: int = S3_WRITE_CONCURRENCY,
        lean: bool = True,
    ) -> None:
        self.location = location
        self.concurrency = concurrency
        self._client = client if client is not None else make_client(max_pool_connections=concurrency)
        self._putter = (
            SignedPutter(self._client, location.bucket, concurrency)
            if lean and SignedPutter.usable(self._client)
            else None
        )
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def describe(self) -> str:
        return str(self.location)

    def _key(self, job_id: str) -> str:
        return self.location.key(f"{_checked_id(job_id)}.json")

    def put_many(self, results: Sequence[Result]) -> list[Result]:
        """Returns only once every result is stored; raises ``StoreUnreachable`` (an ``OSError``) if any
        write failed, after all writes of the batch have finished (a retry finds its own earlier writes)."""
        put = self._put if self._putter is None else partial(self._put_lean, self._putter, self._putter.credentials())
        if len(results) <= 1:
            return [put(result) for result in results]
        # NOTE: concurrent conditional PUTs of one key race each other: only the first result of an id in
        # the batch is written, and a later one gets whatever that write left stored.
        firsts: dict[str, Result] = {}
        for result in results:
            firsts.setdefault(result.id, result)
        pool = self._executor()
        futures: dict[str, Future[Result]] = {job_id: pool.submit(put, first) for job_id, first in firsts.items()}
        wait(futures.values())
        for future in futures.values():
            error = future.exception()
            if error is not None:
                raise error
        return [futures[result.id].result() for result in results]

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="inferq-s3-put")
            return self._pool

    def _put_lean(self, putter: SignedPutter, credentials: Any, result: Result) -> Result:
        if putter.put(self._key(result.id), result.to_json(), credentials).stored:
            return result
        return self.get(result.id)  # the first result of an id wins

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

    def get_many(self, job_ids: Sequence[str]) -> dict[str, Result]:
        valid = [i for i in job_ids if is_valid_job_id(i)]
        if not valid:
            return {}
        futures = [self._executor().submit(self._get_or_none, job_id) for job_id in valid]
        found = (future.result() for future in futures)
        return {result.id: result for result in found if result is not None}

    def _get_or_none(self, job_id: str) -> Result | None:
        try:
            return self.get(job_id)
        except ResultNotFound:
            return None

    def _ids(self) -> Iterator[str]:
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.location.bucket, Prefix=self.location.prefix):
                for item in page.get("Contents", []):
                    name = item["Key"][len(self.location.prefix) :]
                    if name.endswith(".json") and "/" not in name:
                        yield name[: -len(".json")]
        except Exception as exc:  # see _put
            raise translate(exc, f"list {self.location}") from None

    def scan(self, model: str | None = None) -> Iterator[Result]:
        page: list[str] = []
        for job_id in self._ids():
            page.append(job_id)
            if len(page) == S3_SCAN_PAGE:
                yield from self._of_model(page, model)
                page = []
        yield from self._of_model(page, model)

    def _of_model(self, job_ids: list[str], model: str | None) -> Iterator[Result]:
        # Read concurrently, a page at a time; keep the listing's order.
        found = self.get_many(job_ids)
        for job_id in job_ids:
            result = found.get(job_id)
            if result is not None and (model is None or result.model == model):
                yield result

    def count(self, model: str | None = None) -> int:
        if model is None:
            return sum(1 for _ in self._ids())
        return sum(1 for _ in self.scan(model))

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
            if self._putter is not None:
                self._putter.close()


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


DEFAULT_LOCATION = "sqlite:var/results.db"
SETTING = "INFERQ_RESULT_STORE"


def open_result_store(location: str, *, fsync: bool = True, setting: str = SETTING) -> ResultStore:
    """The result store at ``location``:

    ``sqlite:relative/path.db`` or ``sqlite:///absolute/path.db``, ``postgresql://user@host:port/db``
    (a libpq URL; the password from the URL or ``PGPASSWORD``), ``s3://bucket/prefix``, ``file:///abs/dir``
    or a directory path. A malformed location raises :class:`ConfigError` naming ``setting``.
    Nothing is connected yet: the first operation does that (and creates a database schema)."""
    kind, target = parse_location(location, setting)
    if kind == "sqlite":
        from shared.results_sqlite import SQLiteResultStore  # noqa: PLC0415  (sqlite3 only when used)

        return SQLiteResultStore(target)
    if kind == "postgresql":
        from shared.results_postgres import PostgresResultStore  # noqa: PLC0415  (psycopg only when used)

        return PostgresResultStore(target)
    if kind == "s3":
        return S3ResultStore(S3Location.parse(target))
    return FileResultStore(target, fsync=fsync)


def parse_location(location: str, setting: str = SETTING) -> tuple[str, str]:
    """``(kind, target)`` of a result-store location: kind ``sqlite`` (target a path), ``postgresql``
    (a libpq URL), ``s3`` (the location) or ``file`` (a directory path)."""

    def bad(why: str) -> ConfigError:
        return ConfigError(f"{setting}: {why} (use sqlite:PATH, postgresql://…, s3://bucket/prefix or a directory)")

    if not location.strip():
        raise bad("empty")
    if location.startswith("sqlite:"):
        return "sqlite", _sqlite_path(location, bad)
    if location.startswith(("postgresql://", "postgres://")):
        _check_postgres_url(location, bad)
        return "postgresql", location
    if is_s3(location):
        try:
            S3Location.parse(location)
        except StoreError as exc:
            raise bad(str(exc)) from None
        return "s3", location
    if location.startswith("file:"):
        if not location.startswith("file:///") or len(location) == len("file:///"):
            raise bad(f"{location!r} is not file:///absolute/dir")
        return "file", location[len("file://") :]
    if "://" in location:
        raise bad(f"unknown scheme {location.split('://', 1)[0]!r}")
    return "file", location


def _sqlite_path(location: str, bad: Callable[[str], ConfigError]) -> str:
    rest = location[len("sqlite:") :]
    if rest.startswith("//"):
        if not rest.startswith("///") or len(rest) == 3:
            raise bad(f"{location!r} is not sqlite:///absolute/path.db or sqlite:relative/path.db")
        return rest[2:]
    if not rest:
        raise bad("sqlite: names no database file")
    return rest


def _check_postgres_url(location: str, bad: Callable[[str], ConfigError]) -> None:
    try:
        parts = urlsplit(location)
        _ = parts.port  # raises on a port that is not a number
    except ValueError:
        raise bad("a postgresql:// URL that cannot be parsed") from None
    if not parts.path.strip("/"):
        raise bad("the postgresql:// URL names no database: postgresql://user@host:port/db")

"""Results as ``<dir>/<job id>.json`` files: written under a temporary name, linked into place (the first
result of an id wins) and made durable with one ``syncfs`` per batch on Linux."""

from __future__ import annotations

import ctypes
import fcntl
import itertools
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import orjson

from inferq.shared.contract.messages import Result, is_valid_job_id
from inferq.shared.errors import ResultNotFound
from inferq.shared.results.base import checked_id, classified_os_error, replaceable
from inferq.shared.results.labels import (
    LABELS_PREFIX,
    ROWS_PREFIX,
    LabelStore,
    LabelValue,
    RowId,
    StoredResult,
    id_key,
    label_json,
)

_temporary_numbers = itertools.count()
REPLACE_LOCK = ".replace.lock"
"""Held while a rejection is replaced (``.``-names are no results)."""


class FileResultStore:
    """Results as files under a directory."""

    def __init__(self, root: str | Path, *, fsync: bool = True) -> None:
        self.root = Path(root)
        self.fsync = fsync

    def describe(self) -> str:
        return str(self.root)

    def _path(self, job_id: str) -> Path:
        return self.root / f"{checked_id(job_id)}.json"

    def put_many(self, results: Sequence[Result]) -> list[Result]:
        if not results:
            return []
        try:
            return self._put_many(results)
        except OSError as exc:  # a full disk, a read-only mount, a vanished directory
            raise classified_os_error(exc, f"write to {self.root} failed") from None

    def _put_many(self, results: Sequence[Result]) -> list[Result]:
        self.root.mkdir(parents=True, exist_ok=True)
        root = str(self.root)
        staged: list[tuple[str, str]] = []
        stored: list[Result] = []
        try:
            for result in results:
                staged.append((self._write_temporary(result), f"{root}/{checked_id(result.id)}.json"))
            if self.fsync:
                # Data first, then the names: a result is never visible, even after a crash, before
                # its whole content is on disk. One flush for the batch instead of one per file.
                _flush_files([tmp for tmp, _ in staged], self.root)
            for result, (tmp, final) in zip(results, staged, strict=True):
                try:
                    os.link(tmp, final)  # unlike a rename, fails when the id has a result: the first wins
                    stored.append(result)
                except FileExistsError:
                    stored.append(self._stored_or_replaced(result, tmp, final))
        finally:
            for tmp, _ in staged:
                Path(tmp).unlink(missing_ok=True)
        if self.fsync:
            _fsync_path(self.root)  # NOTE: the new names are durable only once the directory itself is synced.
        return stored

    def _stored_or_replaced(self, result: Result, tmp: str, final: str) -> Result:
        """What is stored under ``result``'s id, once ``result`` replaced it if it may (a rejection of
        another message). Replacing takes the store's lock file: two writers never both replace one file."""
        earlier = self.get(result.id)
        if not replaceable(earlier, result):
            return earlier
        fd = os.open(self.root / REPLACE_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            earlier = self.get(result.id)  # again, under the lock: another writer may have replaced it
            if not replaceable(earlier, result):
                return earlier
            os.rename(tmp, final)  # the rejection gives way at once: a reader sees one or the other
            return result
        finally:
            os.close(fd)

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
            raise classified_os_error(exc, f"cannot read {path}") from None
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
                    raise classified_os_error(exc, f"cannot read {self._path(job_id)}") from None
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

    def labels(self) -> LabelStore:
        """Labels as ``_labels/<model>/`` files, backfill row ids as ``_rows/<model>/<job id>.json``."""
        return FileLabelStore(self)

    def close(self) -> None:
        """Nothing to release: every call opens and closes its own files."""


class FileLabelStore:
    """One file per label, ``<dir>/_labels/<model>/<digest of the id>.json`` (linked into place: the first
    wins), and one file per backfill job, ``<dir>/_rows/<model>/<job id>.json``, listing its rows' ids."""

    time_resolution_s = 0.0

    def __init__(self, results: FileResultStore) -> None:
        self._results = results
        self.root = results.root

    def _write_new(self, directory: Path, name: str, data: bytes) -> bool:
        """``data`` as ``directory/name`` unless that file exists; True when written."""
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{name}.{os.getpid()}.{next(_temporary_numbers)}.partial"
        tmp.write_bytes(data)
        try:
            os.link(tmp, directory / name)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def put_labels(self, model: str, labels: Sequence[tuple[str, LabelValue]]) -> int:
        directory = self.root / LABELS_PREFIX / model
        try:
            new = 0
            for label_id, value in labels:
                document = f'{{"id": {label_json(label_id)}, "label": {label_json(value)}}}'.encode()
                new += self._write_new(directory, f"{id_key(label_id)}.json", document)
        except OSError as exc:
            raise classified_os_error(exc, f"write to {directory} failed") from None
        return new

    def labels(self, model: str) -> dict[str, LabelValue]:
        found: dict[str, LabelValue] = {}
        for data in _documents(self.root / LABELS_PREFIX / model):
            document = orjson.loads(data)
            found[document["id"]] = document["label"]
        return found

    def labeled_models(self) -> list[str]:
        directory = self.root / LABELS_PREFIX
        return sorted(p.name for p in directory.iterdir() if p.is_dir()) if directory.is_dir() else []

    def put_row_ids(self, model: str, rows: Sequence[RowId]) -> None:
        by_job: dict[str, list[tuple[str, int]]] = {}
        for row in rows:
            by_job.setdefault(row.job_id, []).append((row.row_id, row.index))
        directory = self.root / ROWS_PREFIX / model
        try:
            for job_id, pairs in by_job.items():
                self._write_new(directory, f"{checked_id(job_id)}.json", orjson.dumps(pairs))
        except OSError as exc:
            raise classified_os_error(exc, f"write to {directory} failed") from None

    def row_ids(self, model: str, row_ids: Sequence[str]) -> dict[str, list[tuple[str, int]]]:
        wanted = set(row_ids)
        found: dict[str, list[tuple[str, int]]] = {}
        directory = self.root / ROWS_PREFIX / model
        if not directory.is_dir():
            return found
        for path in sorted(directory.glob("*.json")):
            for row_id, index in orjson.loads(path.read_bytes()):
                if row_id in wanted:
                    found.setdefault(row_id, []).append((path.name[: -len(".json")], index))
        return found

    def stored_results(self, job_ids: Sequence[str]) -> dict[str, StoredResult]:
        found: dict[str, StoredResult] = {}
        for job_id in job_ids:
            if is_valid_job_id(job_id):
                stored = self._stored(self.root / f"{job_id}.json")
                if stored is not None:
                    found[job_id] = stored
        return found

    @staticmethod
    def _stored(path: Path) -> StoredResult | None:
        try:
            return StoredResult(Result.model_validate_json(path.read_bytes()), path.stat().st_mtime)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise classified_os_error(exc, f"cannot read {path}") from None

    def scan_results(self, model: str, since_s: float | None = None) -> Iterator[StoredResult]:
        for name in sorted(self._results._names()):
            stored = self._stored(self.root / name)
            if stored is not None and stored.result.model == model and stored.stored_at_s >= (since_s or 0):
                yield stored

    def close(self) -> None:
        """Nothing to release."""


def _documents(directory: Path) -> Iterator[bytes]:
    if directory.is_dir():
        for path in sorted(directory.glob("*.json")):
            yield path.read_bytes()


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

"""Monitoring counts beside the results: per (model, version, window, worker) bin counts of inputs and outputs.

Kept in the same place as the results (``INFERQ_RESULT_STORE``), apart from them: a table
``monitor_counts`` in SQLite, ``inferq_monitor_counts`` in PostgreSQL, and one JSON object per window
and worker under ``_monitor/<model>/<version>/`` for a directory or S3 (result listings skip that
prefix). Counts merge exactly by adding, whichever worker or window they came from; writing the same
window twice adds to it, so a writer drops what it wrote once the write returned.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson

from inferq.shared.config.logging import redact_text
from inferq.shared.errors import StoreError, StoreUnreachable
from inferq.shared.extras import POSTGRES, S3, needs_extra
from inferq.shared.results.stores import parse_location
from inferq.shared.s3.location import S3Location

MONITOR_PREFIX = "_monitor"
INPUT = "input"
OUTPUT = "output"
ROWS = "rows"
SHADOW_SKIPPED = "shadow_skipped"
SHADOW_PREFIX = "_shadow"
BUSY_TIMEOUT_S = 10.0

CountRow = tuple[str, int, int, int]
"""``(kind, index, bin, count)``: kind ``input``, ``output`` or ``rows`` (index and bin 0)."""


@dataclass(slots=True)
class WindowCounts:
    """One worker's counts of one model version over one tumbling window."""

    model: str
    version: int
    window_start: int
    """Unix seconds, a multiple of ``window_s``."""
    window_s: int
    worker: str
    rows: int = 0
    inputs: dict[int, list[int]] = field(default_factory=dict)
    outputs: dict[int, list[int]] = field(default_factory=dict)
    shadow_skipped: int = 0
    """Jobs sampled for shadow traffic but not shadowed (the jobs queue was too deep)."""

    def count_rows(self) -> Iterator[CountRow]:
        """The counts as flat rows (zero counts left out)."""
        if self.rows or not self.shadow_skipped:
            yield ROWS, 0, 0, self.rows
        if self.shadow_skipped:
            yield SHADOW_SKIPPED, 0, 0, self.shadow_skipped
        for kind, columns in ((INPUT, self.inputs), (OUTPUT, self.outputs)):
            for index, counts in columns.items():
                yield from ((kind, index, b, c) for b, c in enumerate(counts) if c)


@dataclass(slots=True)
class Totals:
    """Counts of a model version summed over windows and workers."""

    rows: int = 0
    windows: int = 0
    inputs: dict[int, list[int]] = field(default_factory=dict)
    outputs: dict[int, list[int]] = field(default_factory=dict)
    shadow_skipped: int = 0

    def add(self, kind: str, index: int, bin_: int, count: int) -> None:
        """Add one flat count row."""
        if kind == ROWS:
            self.rows += count
            return
        if kind == SHADOW_SKIPPED:
            self.shadow_skipped += count
            return
        columns = self.inputs if kind == INPUT else self.outputs
        counts = columns.setdefault(index, [])
        if len(counts) <= bin_:
            counts.extend([0] * (bin_ + 1 - len(counts)))
        counts[bin_] += count


@dataclass(frozen=True, slots=True)
class ShadowPair:
    """One sampled job run by its own version and by the shadow version: both outputs (or errors), both
    inference times. ``error`` is the answering version's error when it failed the job (its ``outputs``
    are then empty, and ``inference_ms`` is ``None`` when it refused the inputs before running)."""

    job_id: str
    model: str
    version: int
    shadow_version: int
    outputs: list[dict[str, Any]]
    shadow_outputs: list[dict[str, Any]] | None
    inference_ms: float | None
    shadow_inference_ms: float | None
    shadow_error: str | None
    worker: str
    error: str | None = None

    def to_json(self) -> bytes:
        """The stored document."""
        return orjson.dumps({name: getattr(self, name) for name in self.__slots__})

    @classmethod
    def from_json(cls, data: bytes | str) -> ShadowPair:
        """Read a stored document back."""
        return cls(**orjson.loads(data))


class MonitorStore(Protocol):
    """Where workers write window counts and shadow pairs, and ``inferq monitor`` reads them."""

    def put_pairs(self, pairs: list[ShadowPair]) -> None:
        """Store shadow pairs (a job's pair stored before is kept); raises ``OSError`` when it cannot now."""

    def pairs(self, model: str) -> list[ShadowPair]:
        """Every stored shadow pair of ``model``."""

    def put_window(self, window: WindowCounts) -> None:
        """Add ``window``'s counts; raises ``OSError`` (transient) when the store cannot take them now."""

    def totals(self, model: str, version: int, since_s: float | None = None) -> Totals:
        """Counts of ``model`` ``version`` summed over windows starting at or after ``since_s``."""

    def close(self) -> None:
        """Release connections."""


def _window_document(window: WindowCounts) -> bytes:
    return orjson.dumps({"window_s": window.window_s, "worker": window.worker, "counts": list(window.count_rows())})


def _add_document(totals: Totals, data: bytes) -> None:
    document = orjson.loads(data)
    totals.windows += 1
    for kind, index, bin_, count in document["counts"]:
        totals.add(kind, index, bin_, count)


def _object_name(window: WindowCounts) -> str:
    worker = "".join(c if c.isalnum() or c in "._-" else "_" for c in window.worker)
    return f"{window.window_start:012d}-{worker}-{uuid.uuid4().hex[:12]}.json"


def _start_of(name: str) -> int:
    return int(name.split("-", 1)[0])


class FileMonitorStore:
    """Window counts as JSON files under ``<results dir>/_monitor/<model>/<version>/``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root) / MONITOR_PREFIX

    def put_window(self, window: WindowCounts) -> None:
        directory = self.root / window.model / str(window.version)
        directory.mkdir(parents=True, exist_ok=True)
        final = directory / _object_name(window)
        tmp = directory / f".{final.name}.partial"
        tmp.write_bytes(_window_document(window))
        os.replace(tmp, final)  # whole or absent, never half a window

    def totals(self, model: str, version: int, since_s: float | None = None) -> Totals:
        totals = Totals()
        directory = self.root / model / str(version)
        if not directory.is_dir():
            return totals
        for path in sorted(directory.glob("*.json")):
            if since_s is None or _start_of(path.name) >= since_s:
                _add_document(totals, path.read_bytes())
        return totals

    def put_pairs(self, pairs: list[ShadowPair]) -> None:
        for pair in pairs:
            directory = self.root.parent / SHADOW_PREFIX / pair.model
            directory.mkdir(parents=True, exist_ok=True)
            tmp = directory / f".{pair.job_id}-v{pair.shadow_version}.partial"
            tmp.write_bytes(pair.to_json())
            os.replace(tmp, directory / f"{pair.job_id}-v{pair.shadow_version}.json")

    def pairs(self, model: str) -> list[ShadowPair]:
        directory = self.root.parent / SHADOW_PREFIX / model
        return [ShadowPair.from_json(p.read_bytes()) for p in sorted(directory.glob("*.json"))]

    def close(self) -> None:
        """Nothing to release."""


class S3MonitorStore:
    """Window counts as objects under ``s3://bucket/prefix/_monitor/<model>/<version>/``."""

    def __init__(self, location: S3Location, client: Any | None = None) -> None:
        # boto3 only for an S3 store (the s3 extra): imported here, when the store is opened.
        with needs_extra(S3, "an s3:// monitoring store"):
            from inferq.shared.s3.client import make_client, translate  # noqa: PLC0415

        self.location = location
        self._translate = translate
        self._client = client if client is not None else make_client()

    def put_window(self, window: WindowCounts) -> None:
        key = self.location.key(MONITOR_PREFIX, window.model, str(window.version), _object_name(window))
        try:
            self._client.put_object(Bucket=self.location.bucket, Key=key, Body=_window_document(window))
        except Exception as exc:  # boto3 raises ClientError, BotoCoreError and urllib3 errors
            raise self._translate(exc, f"put s3://{self.location.bucket}/{key}", always_transient=True) from None

    def totals(self, model: str, version: int, since_s: float | None = None) -> Totals:
        totals = Totals()
        prefix = self.location.key(MONITOR_PREFIX, model, str(version), "")
        try:
            paginator = self._client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.location.bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    name = item["Key"][len(prefix) :]
                    if name.endswith(".json") and (since_s is None or _start_of(name) >= since_s):
                        body = self._client.get_object(Bucket=self.location.bucket, Key=item["Key"])["Body"].read()
                        _add_document(totals, body)
        except Exception as exc:  # see put_window
            raise self._translate(exc, f"read s3://{self.location.bucket}/{prefix}") from None
        return totals

    def put_pairs(self, pairs: list[ShadowPair]) -> None:
        for pair in pairs:
            key = self.location.key(SHADOW_PREFIX, pair.model, f"{pair.job_id}-v{pair.shadow_version}.json")
            try:
                self._client.put_object(Bucket=self.location.bucket, Key=key, Body=pair.to_json())
            except Exception as exc:  # see put_window
                raise self._translate(exc, f"put s3://{self.location.bucket}/{key}", always_transient=True) from None

    def pairs(self, model: str) -> list[ShadowPair]:
        prefix = self.location.key(SHADOW_PREFIX, model, "")
        found = []
        try:
            for page in self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.location.bucket, Prefix=prefix
            ):
                for item in page.get("Contents", []):
                    body = self._client.get_object(Bucket=self.location.bucket, Key=item["Key"])["Body"].read()
                    found.append(ShadowPair.from_json(body))
        except Exception as exc:  # see put_window
            raise self._translate(exc, f"read s3://{self.location.bucket}/{prefix}") from None
        return found

    def close(self) -> None:
        """Nothing to release: the client's pool closes with the process."""


_SQLITE_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS monitor_counts ("
    " model TEXT NOT NULL, version INTEGER NOT NULL, window_start INTEGER NOT NULL, window_s INTEGER NOT NULL,"
    " worker TEXT NOT NULL, kind TEXT NOT NULL, feature INTEGER NOT NULL, bin INTEGER NOT NULL,"
    " count INTEGER NOT NULL,"
    " PRIMARY KEY (model, version, window_start, worker, kind, feature, bin))"
)
_SQLITE_PAIRS = (
    "CREATE TABLE IF NOT EXISTS shadow_pairs ("
    " job_id TEXT NOT NULL, shadow_version INTEGER NOT NULL, model TEXT NOT NULL, version INTEGER NOT NULL,"
    " pair TEXT NOT NULL, PRIMARY KEY (job_id, shadow_version))"
)
_SQLITE_UPSERT = (
    "INSERT INTO monitor_counts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (model, version, window_start, worker, kind, feature, bin)"
    " DO UPDATE SET count = count + excluded.count"
)
_TOTALS_SQL = (
    "SELECT kind, feature, bin, SUM(count), COUNT(DISTINCT window_start || worker) FROM {table}"
    " WHERE model = {p} AND version = {p} AND window_start >= {p} GROUP BY kind, feature, bin"
)


def _rows(window: WindowCounts) -> list[tuple[Any, ...]]:
    head = (window.model, window.version, window.window_start, window.window_s, window.worker)
    return [(*head, *row) for row in window.count_rows()]


def _totals_of(rows: Iterable[tuple[Any, ...]]) -> Totals:
    totals = Totals()
    for kind, index, bin_, count, windows in rows:
        totals.add(str(kind), int(index), int(bin_), int(count))
        if kind == ROWS:
            totals.windows = int(windows)
    return totals


class SQLiteMonitorStore:
    """Window counts in the ``monitor_counts`` table of the results database file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._connection is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute(_SQLITE_SCHEMA)
            connection.execute(_SQLITE_PAIRS)
            self._connection = connection
        return self._connection

    def put_pairs(self, pairs: list[ShadowPair]) -> None:
        rows = [(p.job_id, p.shadow_version, p.model, p.version, p.to_json().decode()) for p in pairs]
        self._write("shadow pairs", "INSERT OR IGNORE INTO shadow_pairs VALUES (?, ?, ?, ?, ?)", rows)

    def pairs(self, model: str) -> list[ShadowPair]:
        with self._lock:
            try:
                rows = self._connect().execute("SELECT pair FROM shadow_pairs WHERE model = ?", (model,)).fetchall()
            except sqlite3.Error as exc:
                self._drop()
                raise StoreUnreachable(f"read of shadow pairs from sqlite:{self.path} failed: {exc}") from None
        return [ShadowPair.from_json(row[0]) for row in rows]

    def put_window(self, window: WindowCounts) -> None:
        self._write("monitor counts", _SQLITE_UPSERT, _rows(window))

    def _write(self, what: str, sql: str, rows: list[tuple[Any, ...]]) -> None:
        """``sql`` for every row, in one transaction that holds the write lock from its start."""
        with self._lock:
            try:
                connection = self._connect()
                connection.execute("BEGIN IMMEDIATE")
                try:
                    connection.executemany(sql, rows)
                    connection.execute("COMMIT")
                except BaseException:
                    if connection.in_transaction:
                        connection.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                self._drop()
                raise StoreUnreachable(f"write of {what} to sqlite:{self.path} failed: {exc}") from None

    def totals(self, model: str, version: int, since_s: float | None = None) -> Totals:
        sql = _TOTALS_SQL.format(table="monitor_counts", p="?")
        with self._lock:
            try:
                rows = self._connect().execute(sql, (model, version, int(since_s or 0))).fetchall()
            except sqlite3.Error as exc:
                self._drop()
                raise StoreUnreachable(f"read of monitor counts from sqlite:{self.path} failed: {exc}") from None
        return _totals_of(rows)

    def _drop(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(sqlite3.Error):
                self._connection.close()
            self._connection = None

    def close(self) -> None:
        with self._lock:
            self._drop()


_PG_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS inferq_monitor_counts ("
    " model text NOT NULL, version integer NOT NULL, window_start bigint NOT NULL, window_s integer NOT NULL,"
    " worker text NOT NULL, kind text NOT NULL, feature integer NOT NULL, bin integer NOT NULL,"
    " count bigint NOT NULL,"
    " PRIMARY KEY (model, version, window_start, worker, kind, feature, bin))"
)
_PG_UPSERT = (
    "INSERT INTO inferq_monitor_counts AS c SELECT * FROM unnest(%s::text[], %s::integer[], %s::bigint[],"
    " %s::integer[], %s::text[], %s::text[], %s::integer[], %s::integer[], %s::bigint[])"
    " ON CONFLICT (model, version, window_start, worker, kind, feature, bin)"
    " DO UPDATE SET count = c.count + excluded.count"
)
_PG_PAIRS = (
    "CREATE TABLE IF NOT EXISTS inferq_shadow_pairs ("
    " job_id text NOT NULL, shadow_version integer NOT NULL, model text NOT NULL, version integer NOT NULL,"
    " created_at timestamptz NOT NULL DEFAULT now(), pair jsonb NOT NULL, PRIMARY KEY (job_id, shadow_version))"
)
_PG_INSERT_PAIRS = (
    "INSERT INTO inferq_shadow_pairs (job_id, shadow_version, model, version, pair)"
    " SELECT * FROM unnest(%s::text[], %s::integer[], %s::text[], %s::integer[], %s::text[]::jsonb[])"
    " ON CONFLICT (job_id, shadow_version) DO NOTHING"
)
_PG_SCHEMA_LOCK = 0x1F3E_9A7D


class PostgresMonitorStore:
    """Window counts in the ``inferq_monitor_counts`` table beside ``inferq_results``."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._lock = threading.Lock()
        self._connection: Any = None

    def _connect(self) -> Any:
        import psycopg  # noqa: PLC0415  (psycopg only when used)

        if self._connection is None or self._connection.closed:
            connection = psycopg.connect(self.url, connect_timeout=5, autocommit=True)
            with connection.transaction(), connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_SCHEMA_LOCK,))
                cursor.execute(_PG_SCHEMA)
                cursor.execute(_PG_PAIRS)
            self._connection = connection
        return self._connection

    def _run(self, action: str, sql: str, parameters: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        import psycopg  # noqa: PLC0415

        from inferq.shared.results.postgres import without_password  # noqa: PLC0415  (imports psycopg)

        with self._lock:
            try:
                connection = self._connect()
                with connection.transaction(), connection.cursor() as cursor:
                    cursor.execute(sql, parameters)
                    return list(cursor.fetchall()) if cursor.description else []
            except psycopg.Error as exc:
                if self._connection is not None:
                    self._connection.close()
                self._connection = None
                first = (str(exc).strip().splitlines() or [""])[0]
                where = without_password(self.url).split("?", 1)[0]
                raise StoreUnreachable(redact_text(f"{action} monitoring data in {where} failed: {first}")) from None

    def put_window(self, window: WindowCounts) -> None:
        columns = tuple(list(column) for column in zip(*_rows(window), strict=True))
        self._run("write of", _PG_UPSERT, columns)

    def put_pairs(self, pairs: list[ShadowPair]) -> None:
        columns = (
            [p.job_id for p in pairs],
            [p.shadow_version for p in pairs],
            [p.model for p in pairs],
            [p.version for p in pairs],
            [p.to_json().decode() for p in pairs],
        )
        self._run("write of", _PG_INSERT_PAIRS, columns)

    def pairs(self, model: str) -> list[ShadowPair]:
        rows = self._run("read of", "SELECT pair::text FROM inferq_shadow_pairs WHERE model = %s", (model,))
        return [ShadowPair.from_json(row[0]) for row in rows]

    def totals(self, model: str, version: int, since_s: float | None = None) -> Totals:
        sql = _TOTALS_SQL.format(table="inferq_monitor_counts", p="%s").replace(
            "window_start || worker", "window_start::text || worker"
        )
        return _totals_of(self._run("read of", sql, (model, version, int(since_s or 0))))

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None


def open_monitor_store(location: str) -> MonitorStore:
    """The monitoring side of the result store at ``location`` (see ``open_result_store``)."""
    kind, target = parse_location(location)
    if kind == "sqlite":
        return SQLiteMonitorStore(target)
    if kind == "postgresql":
        # The store connects on first use, on the worker's counting thread: find the driver here instead.
        with needs_extra(POSTGRES, "a postgresql:// monitoring store"):
            import psycopg  # noqa: F401, PLC0415
        return PostgresMonitorStore(target)
    if kind == "s3":
        return S3MonitorStore(S3Location.parse(target))
    if kind != "file":
        raise StoreError(f"no monitoring store for {kind}")
    return FileMonitorStore(target)

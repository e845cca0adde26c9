"""The SQLite result store: one database file on one host, shared by every worker process there.

WAL journal with ``synchronous=FULL``: a batch is one transaction, durable (it survives power loss) when
it commits, and readers never block the writer. Several processes share the file; a writer waits up to
the busy timeout for another one's transaction. The table has columns a user can query with ``sqlite3``
(``id``, ``model``, ``version``, ``status``, ``error_code``, ``created_at``) next to the full result
JSON, so fields added to :class:`Result` later flow through unchanged.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import orjson

from inferq.shared.contract.messages import Result, is_valid_job_id
from inferq.shared.errors import ResultNotFound, StoreError, StoreRefused, StoreUnreachable, ValueRefused
from inferq.shared.results.base import classified_os_error
from inferq.shared.results.labels import LabelStore, LabelValue, RowId, StoredResult, label_json, label_of

SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 10.0
WAL_RETRY_S = 0.005
_READ_CHUNK = 10_000  # ids per lookup query
_SCAN_PAGE = 1_000  # results per page of a scan
# SQLite's primary result codes by what they say about a failed statement (the rest, like a busy or
# locked database, a full disk or an I/O error, are worth retrying).
_STORE_REFUSED_CODES = frozenset(
    {
        sqlite3.SQLITE_PERM,
        sqlite3.SQLITE_READONLY,  # the file, its directory or its file system is read-only
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_CORRUPT,
        sqlite3.SQLITE_NOTADB,
        sqlite3.SQLITE_AUTH,
    }
)
_VALUE_REFUSED_CODES = frozenset({sqlite3.SQLITE_TOOBIG, sqlite3.SQLITE_CONSTRAINT})
_INSERT = (
    "INSERT INTO results (id, model, version, status, error_code, created_at, result) VALUES (?, ?, ?, ?, ?, ?, ?) "
    # The first result of an id wins, except over a rejection of another message (base.replaceable).
    "ON CONFLICT (id) DO UPDATE SET model = excluded.model, version = excluded.version, status = excluded.status, "
    "error_code = excluded.error_code, created_at = excluded.created_at, result = excluded.result "
    "WHERE results.status = 'failed' AND results.error_code = 'invalid_payload' "
    "AND json_extract(results.result, '$.job_sha256') IS NOT json_extract(excluded.result, '$.job_sha256')"
)

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS results ("
    " id TEXT PRIMARY KEY NOT NULL, model TEXT, version INTEGER, status TEXT NOT NULL,"
    " error_code TEXT, created_at TEXT NOT NULL, result TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS results_by_model_time ON results (model, created_at)",
)


def row_of(result: Result, created_at: str) -> tuple[str, str | None, int | None, str, str | None, str, str]:
    """The table row of ``result``: its queryable columns and its full JSON."""
    error_code = result.error.code.value if result.error is not None else None
    return (
        result.id,
        result.model,
        result.version,
        result.status.value,
        error_code,
        created_at,
        result.to_json().decode(),
    )


def _use_wal(connection: sqlite3.Connection) -> None:
    """Switch the database to WAL (a no-op once it is).

    NOTE: the switch takes an exclusive lock, and SQLite reports a busy database at once instead of
    waiting for it: workers starting together on a new file collide here, and the loser's first batch
    would fail. It tries again, up to the busy timeout."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(WAL_RETRY_S)


def utc_now_text() -> str:
    """Now, as ISO-8601 UTC with milliseconds: sorts as text and reads as a time."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class SQLiteResultStore:
    """Results as rows of one SQLite database file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()  # one connection, used by the worker's store thread and readers alike
        self._connection: sqlite3.Connection | None = None

    def describe(self) -> str:
        return f"sqlite:{self.path}"

    def _connect(self) -> sqlite3.Connection:
        """The connection, opened (and the schema created) on first use; called with the lock held."""
        if self._connection is not None:
            return self._connection
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise self._classified(exc, f"cannot open {self.describe()}") from None
        except OSError as exc:
            raise classified_os_error(exc, f"cannot open {self.describe()}") from None
        try:
            _use_wal(connection)
            # FULL: the WAL is synced at every commit, so a stored result survives a power loss.
            connection.execute("PRAGMA synchronous=FULL")
            self._ensure_schema(connection)
        except BaseException:
            connection.close()
            raise
        self._connection = connection
        return connection

    def _ensure_schema(self, connection: sqlite3.Connection) -> None:
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.describe()} has schema version {version}; this inferq knows up to {SCHEMA_VERSION}: upgrade it"
            )
        # IMMEDIATE takes the write lock first: two processes starting at once create the table once.
        connection.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA:  # not executescript: it would commit the open transaction first
                connection.execute(statement)
            connection.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise

    def put_many(self, results: Sequence[Result]) -> list[Result]:
        if not results:
            return []
        created_at = utc_now_text()
        with self._lock:
            try:
                return self._put_locked(self._connect(), results, created_at)
            except sqlite3.Error as exc:
                # Locked, disk full, I/O error: the worker retries with backoff and acks nothing. Read-only,
                # no table: the worker stops. The next try opens a new connection: SQLite keeps a file it
                # could only open read-only read-only for the life of the connection.
                self._drop_connection()
                ids = (results[0].id,) if len({r.id for r in results}) == 1 else ()
                raise self._classified(exc, f"write to {self.describe()} failed", ids) from None

    @staticmethod
    def _classified(exc: sqlite3.Error, what: str, ids: tuple[str, ...] = ()) -> Exception:
        """``exc`` as :class:`StoreUnreachable`, :class:`ValueRefused` (of ``ids``, when known) or
        :class:`StoreRefused`."""
        text = f"{what}: {exc}"
        code = getattr(exc, "sqlite_errorcode", sqlite3.SQLITE_ERROR) & 0xFF  # the primary code
        if code in _STORE_REFUSED_CODES or "no such table" in str(exc):  # NOTE: SQLITE_ERROR says no more
            return StoreRefused(text)
        if code in _VALUE_REFUSED_CODES:
            return ValueRefused(text, ids)
        return StoreUnreachable(text)

    def _drop_connection(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(sqlite3.Error):  # a broken connection may fail to close; dropped anyway
                self._connection.close()
            self._connection = None

    def _put_locked(self, connection: sqlite3.Connection, results: Sequence[Result], created_at: str) -> list[Result]:
        winners: dict[str, Result] = {}
        for result in results:
            winners.setdefault(result.id, result)  # the same id twice in one batch: the first is stored
        connection.execute("BEGIN IMMEDIATE")  # the write lock: nobody inserts between ours and the lookup
        try:
            before = connection.total_changes
            connection.executemany(_INSERT, [row_of(r, created_at) for r in winners.values()])
            earlier: dict[str, Result] = {}
            if connection.total_changes - before < len(winners):
                # Some ids had a result already (rare: a job run twice): find which, in the same
                # transaction. Ours are the rows whose text is the one just written.
                ours = {r.id: r.to_json().decode() for r in winners.values()}
                for job_id, text in self._lookup_text(connection, list(winners)):
                    if text != ours[job_id]:
                        earlier[job_id] = Result.model_validate_json(text)
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
        return [earlier[r.id] if r.id in earlier else winners[r.id] for r in results]

    @staticmethod
    def _lookup_text(connection: sqlite3.Connection, job_ids: list[str]) -> Iterator[tuple[str, str]]:
        for start in range(0, len(job_ids), _READ_CHUNK):
            chunk = orjson.dumps(job_ids[start : start + _READ_CHUNK]).decode()
            yield from connection.execute(
                "SELECT id, result FROM results WHERE id IN (SELECT value FROM json_each(?))", (chunk,)
            )

    @classmethod
    def _lookup(cls, connection: sqlite3.Connection, job_ids: list[str]) -> dict[str, Result]:
        return {job_id: Result.model_validate_json(text) for job_id, text in cls._lookup_text(connection, job_ids)}

    def _read(self, sql: str, parameters: tuple[object, ...]) -> list[tuple[object, ...]]:
        try:
            with self._lock:
                return self._connect().execute(sql, parameters).fetchall()
        except sqlite3.Error as exc:
            raise self._read_error(exc) from None

    def _read_error(self, exc: sqlite3.Error) -> Exception:
        error = self._classified(exc, f"read from {self.describe()} failed")
        return StoreError(str(error)) if isinstance(error, ValueRefused) else error

    def get(self, job_id: str) -> Result:
        rows = self._read("SELECT result FROM results WHERE id = ?", (job_id,))
        if not rows:
            raise ResultNotFound(f"no result for job {job_id!r} in {self.describe()}")
        return Result.model_validate_json(str(rows[0][0]))

    def get_many(self, job_ids: Sequence[str]) -> dict[str, Result]:
        try:
            with self._lock:
                return self._lookup(self._connect(), [i for i in job_ids if is_valid_job_id(i)])
        except sqlite3.Error as exc:
            raise self._read_error(exc) from None

    def exists(self, job_id: str) -> bool:
        return bool(self._read("SELECT 1 FROM results WHERE id = ?", (job_id,)))

    def scan(self, model: str | None = None) -> Iterator[Result]:
        # Pages by rowid (insertion order) instead of one long read: no transaction stays open while
        # the caller writes its file, so the workers' WAL can still be checkpointed.
        after = 0
        where = "rowid > ?" + (" AND model = ?" if model is not None else "")
        while True:
            parameters: tuple[object, ...] = (after, model) if model is not None else (after,)
            rows = self._read(
                f"SELECT rowid, result FROM results WHERE {where} ORDER BY rowid LIMIT {_SCAN_PAGE}", parameters
            )
            for rowid, text in rows:
                after = int(str(rowid))
                yield Result.model_validate_json(str(text))
            if len(rows) < _SCAN_PAGE:
                return

    def count(self, model: str | None = None) -> int:
        if model is None:
            rows = self._read("SELECT count(*) FROM results", ())
        else:
            rows = self._read("SELECT count(*) FROM results WHERE model = ?", (model,))
        return int(str(rows[0][0]))

    def labels(self) -> LabelStore:
        """Labels and backfill row ids in tables beside ``results``, on this store's connection."""
        return SQLiteLabelStore(self)

    def close(self) -> None:
        with self._lock:
            self._drop_connection()


_LABEL_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS labels (model TEXT NOT NULL, id TEXT NOT NULL, label TEXT NOT NULL,"
    " created_at TEXT NOT NULL, PRIMARY KEY (model, id))",
    "CREATE TABLE IF NOT EXISTS row_ids (model TEXT NOT NULL, row_id TEXT NOT NULL, job_id TEXT NOT NULL,"
    " row_index INTEGER NOT NULL, PRIMARY KEY (model, row_id, job_id, row_index))",
)


def _unix_s(created_at: str) -> float:
    return datetime.fromisoformat(created_at.replace("Z", "+00:00")).timestamp()


def _since_text(since_s: float | None) -> str:
    """``since_s`` in the ``created_at`` format (text that sorts as time)."""
    moment = datetime.fromtimestamp(since_s or 0, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class SQLiteLabelStore:
    """Labels (table ``labels``) and backfill row ids (``row_ids``) in the results database file."""

    time_resolution_s = 0.0

    def __init__(self, results: SQLiteResultStore) -> None:
        self._results = results
        self._schema_ready = False

    def _connection(self) -> sqlite3.Connection:
        """The result store's connection (called with its lock held), with the label tables created."""
        connection = self._results._connect()
        if not self._schema_ready:
            for statement in _LABEL_SCHEMA:
                connection.execute(statement)
            self._schema_ready = True
        return connection

    def _write(self, sql: str, rows: list[tuple[object, ...]]) -> int:
        with self._results._lock:
            try:
                connection = self._connection()
                connection.execute("BEGIN IMMEDIATE")
                try:
                    before = connection.total_changes
                    connection.executemany(sql, rows)
                    connection.execute("COMMIT")
                except BaseException:
                    if connection.in_transaction:
                        connection.execute("ROLLBACK")
                    raise
                return connection.total_changes - before
            except sqlite3.Error as exc:
                self._results._drop_connection()
                raise self._results._read_error(exc) from None

    def _read(self, sql: str, parameters: tuple[object, ...]) -> list[tuple[object, ...]]:
        with self._results._lock:
            try:
                return self._connection().execute(sql, parameters).fetchall()
            except sqlite3.Error as exc:
                raise self._results._read_error(exc) from None

    def put_labels(self, model: str, labels: Sequence[tuple[str, LabelValue]]) -> int:
        now = utc_now_text()
        rows: list[tuple[object, ...]] = [(model, i, label_json(v), now) for i, v in labels]
        return self._write("INSERT OR IGNORE INTO labels VALUES (?, ?, ?, ?)", rows)

    def labels(self, model: str) -> dict[str, LabelValue]:
        rows = self._read("SELECT id, label FROM labels WHERE model = ?", (model,))
        return {str(i): label_of(str(v)) for i, v in rows}

    def labeled_models(self) -> list[str]:
        return [str(row[0]) for row in self._read("SELECT DISTINCT model FROM labels ORDER BY 1", ())]

    def put_row_ids(self, model: str, rows: Sequence[RowId]) -> None:
        values: list[tuple[object, ...]] = [(model, r.row_id, r.job_id, r.index) for r in rows]
        self._write("INSERT OR IGNORE INTO row_ids VALUES (?, ?, ?, ?)", values)

    def row_ids(self, model: str, row_ids: Sequence[str]) -> dict[str, list[tuple[str, int]]]:
        found: dict[str, list[tuple[str, int]]] = {}
        for start in range(0, len(row_ids), _READ_CHUNK):
            chunk = orjson.dumps(list(row_ids[start : start + _READ_CHUNK])).decode()
            rows = self._read(
                "SELECT row_id, job_id, row_index FROM row_ids WHERE model = ?"
                " AND row_id IN (SELECT value FROM json_each(?))",
                (model, chunk),
            )
            for row_id, job_id, index in rows:
                found.setdefault(str(row_id), []).append((str(job_id), int(str(index))))
        return found

    def stored_results(self, job_ids: Sequence[str]) -> dict[str, StoredResult]:
        found: dict[str, StoredResult] = {}
        valid = [i for i in job_ids if is_valid_job_id(i)]
        for start in range(0, len(valid), _READ_CHUNK):
            chunk = orjson.dumps(valid[start : start + _READ_CHUNK]).decode()
            rows = self._read(
                "SELECT id, result, created_at FROM results WHERE id IN (SELECT value FROM json_each(?))", (chunk,)
            )
            for job_id, text, created_at in rows:
                found[str(job_id)] = StoredResult(Result.model_validate_json(str(text)), _unix_s(str(created_at)))
        return found

    def scan_results(self, model: str, since_s: float | None = None) -> Iterator[StoredResult]:
        after, since = 0, _since_text(since_s)
        while True:
            rows = self._read(
                "SELECT rowid, result, created_at FROM results WHERE rowid > ? AND model = ? AND created_at >= ?"
                f" ORDER BY rowid LIMIT {_SCAN_PAGE}",
                (after, model, since),
            )
            for rowid, text, created_at in rows:
                after = int(str(rowid))
                yield StoredResult(Result.model_validate_json(str(text)), _unix_s(str(created_at)))
            if len(rows) < _SCAN_PAGE:
                return

    def close(self) -> None:
        """The connection is the result store's: it closes it."""

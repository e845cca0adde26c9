"""The operation record: which job ids the gateway accepted, shared by every gateway replica.

A record is claimed *before* its job is published and marked confirmed once the broker confirmed it:
- the claim is what makes a job id mean one body: the same id with another body is refused (409), even
  when the first publish's fate is unknown (a crash between publish and confirm), so a client can never
  turn one id into two different jobs;
- the confirmed mark is what "queued" means: an id whose publish was refused or never confirmed was
  not accepted, and its status is 404 until a resubmission (same body) publishes it again. Publishing
  the same body twice is harmless: a worker stores the first result of an id and republishes it;
- the job digest (:func:`inferq.shared.contract.messages.job_digest`, which every stored result carries)
  is what a result must show to be answered as this operation's: a result stored under the id for
  another job (sent without the API) is never handed out as this one's;
- the dead letter, once a replica heard of it (every replica listens), is what "failed, dead_lettered"
  means, whichever replica is asked.

SQLite (one host, several processes: WAL and a busy timeout) or PostgreSQL (a fleet of replicas),
chosen by ``INFERQ_OPERATIONS_STORE``, by default beside the result store.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import orjson

from inferq.gateway.dead_letters import DeadLetter
from inferq.shared.broker.amqp import Backoff
from inferq.shared.config.logging import get_logger, redact_text
from inferq.shared.errors import ConfigError, StoreUnreachable
from inferq.shared.extras import POSTGRES, needs_extra

log = get_logger(__name__)

TABLE = "inferq_operations"
SQLITE_BUSY_TIMEOUT_MS = 10_000
POSTGRES_CONNECT_TIMEOUT_S = 5
T = TypeVar("T")

ADDED_COLUMNS = (("job_sha256", "text"), ("dead_letter", "text"))
"""Columns added after the first release of the table: a table created before is extended at start."""


@dataclass(frozen=True, slots=True)
class OperationRecord:
    """One accepted (or being accepted) job id and what it was accepted for."""

    id: str
    model: str
    requested_version: str
    digest: str
    """sha256 of the job's content (model, version, inputs, parameters, requested outputs), not its id."""
    outputs: tuple[str, ...] | None
    accepted_at: float
    confirmed: bool = False
    job_sha256: str | None = None
    """The job digest its result must carry (``None`` on records written before digests were kept)."""
    dead_letter: str | None = None
    """Why the job was dead-lettered, once a replica heard of it; ``None`` otherwise."""


class OperationStore(Protocol):
    """Where operation records live; every method raises :class:`StoreUnreachable` when it cannot."""

    def claim(self, record: OperationRecord) -> OperationRecord:
        """Insert ``record`` unless its id has one; return the record stored for the id (this one or
        the earlier one), atomically with respect to every other gateway."""

    def confirm(self, job_id: str) -> None:
        """The broker confirmed the job: the operation is queued."""

    def write(self, claims: list[OperationRecord], confirms: list[str]) -> list[OperationRecord]:
        """:meth:`claim` each of ``claims`` and :meth:`confirm` each of ``confirms``, in one transaction;
        the record stored for each claim, in order."""

    def mark_dead_lettered(self, letters: list[DeadLetter]) -> None:
        """Note each dead letter on the record of exactly its job (same id and job digest; the first
        reason stays); dead letters of other jobs change nothing."""

    def get(self, job_id: str) -> OperationRecord | None:
        """The record of ``job_id``, if any."""

    def describe(self) -> str:
        """Where the store lives, for logs and messages (no password)."""

    def close(self) -> None:
        """Release connections."""


def _outputs_json(outputs: tuple[str, ...] | None) -> str | None:
    return None if outputs is None else orjson.dumps(list(outputs)).decode()


def _record(row: tuple[Any, ...]) -> OperationRecord:
    job_id, model, version, digest, outputs, accepted_at, confirmed, job_sha256, dead_letter = row
    if isinstance(outputs, str):
        outputs = orjson.loads(outputs)
    return OperationRecord(
        id=job_id,
        model=model,
        requested_version=version,
        digest=digest,
        outputs=None if outputs is None else tuple(outputs),
        accepted_at=float(accepted_at),
        confirmed=bool(confirmed),
        job_sha256=job_sha256,
        dead_letter=dead_letter,
    )


def _values(record: OperationRecord) -> tuple[Any, ...]:
    """The values a claim inserts (every column but ``confirmed`` and ``dead_letter``)."""
    outputs = _outputs_json(record.outputs)
    return (
        record.id,
        record.model,
        record.requested_version,
        record.digest,
        outputs,
        record.accepted_at,
        record.job_sha256,
    )


_COLUMNS = "id, model, requested_version, digest, outputs, accepted_at, confirmed, job_sha256, dead_letter"
_CLAIMED = "id, model, requested_version, digest, outputs, accepted_at, job_sha256"
_IN_CHUNK = 500
"""Ids per ``IN (...)`` list (SQLite allows 999 parameters by default)."""
_MARK_DEAD = f"UPDATE {TABLE} SET dead_letter = {{0}} WHERE id = {{0}} AND job_sha256 = {{0}} AND dead_letter IS NULL"


class _Write:
    """One caller's write, waiting for the group it joins to commit."""

    __slots__ = ("action", "done", "error", "result")

    def __init__(self, action: Callable[[Any], Any]) -> None:
        self.action = action
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None


class GroupCommit:
    """Writes from many threads share transactions: while one group commits (a flush to disk), the
    writes that arrive queue up and commit together in the next. One flush per group instead of one
    per request: the difference between tens and thousands of requests per second on a real disk."""

    def __init__(self, transaction: Callable[[list[Callable[[Any], Any]]], list[Any]]) -> None:
        self._transaction = transaction
        self._pending: list[_Write] = []
        self._pending_lock = threading.Lock()
        self._commit_lock = threading.Lock()

    def run(self, action: Callable[[Any], T]) -> T:
        """Run ``action(connection)`` in a transaction shared with whatever else is waiting."""
        write = _Write(action)
        with self._pending_lock:
            self._pending.append(write)
        with self._commit_lock:
            if not write.done:  # nobody took it along: commit everything waiting, ours included
                with self._pending_lock:
                    group, self._pending = self._pending, []
                try:
                    results = self._transaction([w.action for w in group])
                except BaseException as exc:
                    for w in group:
                        w.error, w.done = exc, True
                else:
                    for w, value in zip(group, results, strict=True):
                        w.result, w.done = value, True
        if write.error is not None:
            raise write.error
        return cast(T, write.result)


def _sqlite_busy(error: sqlite3.Error) -> bool:
    """The file is locked by another process (SQLITE_BUSY or SQLITE_LOCKED)."""
    code = getattr(error, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(error) or "busy" in str(error)


def _sqlite_schema(db: sqlite3.Connection) -> None:
    """Create the table, or extend one created by an earlier release; idempotent, so replicas starting
    together may all run it."""
    db.execute(
        f"CREATE TABLE IF NOT EXISTS {TABLE} (id TEXT PRIMARY KEY, model TEXT NOT NULL, "
        "requested_version TEXT NOT NULL, digest TEXT NOT NULL, outputs TEXT, "
        "accepted_at REAL NOT NULL, confirmed INTEGER NOT NULL DEFAULT 0, job_sha256 TEXT, dead_letter TEXT) "
        "WITHOUT ROWID"
    )
    present = {row[1] for row in db.execute(f"PRAGMA table_info({TABLE})")}
    for column, kind in ADDED_COLUMNS:
        if column in present:
            continue
        try:
            db.execute(f"ALTER TABLE {TABLE} ADD COLUMN {column} {kind}")
        except sqlite3.OperationalError as exc:
            if "duplicate column" not in str(exc):  # else another replica added it first
                raise


def _open_sqlite(path: Path) -> sqlite3.Connection:
    """A connection to the operations file, the file created and its schema up to date.

    NOTE: replicas that create the file together collide where SQLite's busy timeout does not help (the
    switch to WAL takes the file's lock without waiting for it): the whole start is retried while the
    file is busy, within the same time a busy statement is given."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    backoff = Backoff(base_s=0.01, cap_s=0.5)
    while True:
        db = sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # A claim is what stops a second body under one id: it must survive a power loss.
            db.execute("PRAGMA synchronous=FULL")
            with db:
                _sqlite_schema(db)
            return db
        except sqlite3.Error as exc:
            db.close()
            delay = backoff.next_delay()
            if not _sqlite_busy(exc) or time.monotonic() + delay > deadline:
                raise
            log.info("operations_database_busy_at_start", path=str(path), retry_in_s=round(delay, 3))
            time.sleep(delay)


class SqliteOperationStore:
    """Operation records in a SQLite file: gateways on one host share it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # One connection, used under a lock: each statement is short and the file is the
            # serialisation point anyway.
            self._db = _open_sqlite(self.path)
        except sqlite3.Error as exc:
            raise StoreUnreachable(f"cannot open the operations database {self.path}: {exc}") from None
        self._writes = GroupCommit(self._transaction)

    def describe(self) -> str:
        return f"sqlite:{self.path}"

    def _run(self, action: Callable[[sqlite3.Connection], T], *, flush: bool = True) -> T:
        """``action`` in one transaction; without ``flush``, committed without waiting for the disk
        (kept through a crash of the process, not through a power loss)."""
        with self._lock:
            try:
                if not flush:
                    self._db.execute("PRAGMA synchronous=NORMAL")
                try:
                    with self._db:
                        return action(self._db)
                finally:
                    if not flush:
                        self._db.execute("PRAGMA synchronous=FULL")
            except sqlite3.Error as exc:
                raise StoreUnreachable(f"operations database {self.path}: {exc}") from None

    def _transaction(self, actions: list[Callable[[sqlite3.Connection], Any]]) -> list[Any]:
        return self._run(lambda db: [action(db) for action in actions])

    def claim(self, record: OperationRecord) -> OperationRecord:
        def action(db: sqlite3.Connection) -> OperationRecord:
            db.execute(f"INSERT OR IGNORE INTO {TABLE} ({_CLAIMED}) VALUES (?, ?, ?, ?, ?, ?, ?)", _values(record))
            row = db.execute(f"SELECT {_COLUMNS} FROM {TABLE} WHERE id = ?", (record.id,)).fetchone()
            return _record(row)

        return self._writes.run(action)

    def confirm(self, job_id: str) -> None:
        self._writes.run(lambda db: db.execute(f"UPDATE {TABLE} SET confirmed = 1 WHERE id = ?", (job_id,)))

    def write(self, claims: list[OperationRecord], confirms: list[str]) -> list[OperationRecord]:
        def action(db: sqlite3.Connection) -> list[OperationRecord]:
            before = db.total_changes
            insert = f"INSERT OR IGNORE INTO {TABLE} ({_CLAIMED}) VALUES (?, ?, ?, ?, ?, ?, ?)"
            db.executemany(insert, map(_values, claims))
            inserted = db.total_changes - before
            db.executemany(f"UPDATE {TABLE} SET confirmed = 1 WHERE id = ?", [(job_id,) for job_id in confirms])
            if inserted == len(claims):  # every id was free: each record stored is the one claimed
                return claims
            stored: dict[str, OperationRecord] = {}
            ids = [record.id for record in claims]
            for start in range(0, len(ids), _IN_CHUNK):
                chunk = ids[start : start + _IN_CHUNK]
                marks = ", ".join("?" * len(chunk))
                for row in db.execute(f"SELECT {_COLUMNS} FROM {TABLE} WHERE id IN ({marks})", chunk):
                    stored[row[0]] = _record(row)
            return [stored[record.id] for record in claims]

        # NOTE: confirms alone are not flushed to disk (claims are: a claim is what stops a second body
        # under an id). A power loss may forget a confirm: the operation then reads 404 until its result
        # is stored (the job itself is in the broker), never a wrong answer; the flush is a disk round
        # trip on the path of every request.
        return self._writes.run(action) if claims else self._run(action, flush=False)

    def mark_dead_lettered(self, letters: list[DeadLetter]) -> None:
        rows = [(letter.reason, letter.job_id, letter.job_sha256) for letter in letters]
        if rows:
            self._writes.run(lambda db: db.executemany(_MARK_DEAD.format("?"), rows))

    def get(self, job_id: str) -> OperationRecord | None:
        row = self._run(lambda db: db.execute(f"SELECT {_COLUMNS} FROM {TABLE} WHERE id = ?", (job_id,)).fetchone())
        return None if row is None else _record(row)

    def close(self) -> None:
        with self._lock:
            self._db.close()


class PostgresOperationStore:
    """Operation records in PostgreSQL: every gateway replica of a fleet sees every claim."""

    def __init__(self, url: str) -> None:
        import psycopg  # noqa: PLC0415  (only deployments on PostgreSQL load the driver)

        self._psycopg = psycopg
        self._url = url
        self._lock = threading.Lock()
        self._conn: Any = None
        self._writes = GroupCommit(self._transaction)
        self._create_schema()

    def _create_schema(self) -> None:
        """Create the table, or extend one created by an earlier release.

        NOTE: ``CREATE TABLE IF NOT EXISTS`` is not safe against itself: two replicas starting together can
        both find the table missing, and the second fails on a unique index of the catalog. Once is enough
        to retry: the table exists then."""
        statements = [
            f"CREATE TABLE IF NOT EXISTS {TABLE} (id text PRIMARY KEY, model text NOT NULL, "
            "requested_version text NOT NULL, digest text NOT NULL, outputs jsonb, "
            "accepted_at double precision NOT NULL, confirmed boolean NOT NULL DEFAULT false)",
            *(f"ALTER TABLE {TABLE} ADD COLUMN IF NOT EXISTS {column} {kind}" for column, kind in ADDED_COLUMNS),
        ]
        for attempt in (1, 2):
            try:
                with self._connection() as conn:
                    for statement in statements:
                        conn.execute(statement)
                return
            except StoreUnreachable:
                if attempt == 2:
                    raise

    def describe(self) -> str:
        return redact_text(self._url)

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        """The connection, under the lock; a broken one is dropped and opened again on next use."""
        with self._lock:
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = self._psycopg.connect(
                        self._url, autocommit=True, connect_timeout=POSTGRES_CONNECT_TIMEOUT_S
                    )
                yield self._conn
            except self._psycopg.Error as exc:
                if self._conn is not None and self._conn.broken:
                    self._conn.close()
                    self._conn = None
                raise StoreUnreachable(f"operations database {self.describe()}: {redact_text(str(exc))}") from None

    def _transaction(self, actions: list[Callable[[Any], Any]]) -> list[Any]:
        with self._connection() as conn, conn.transaction():
            return [action(conn) for action in actions]

    def claim(self, record: OperationRecord) -> OperationRecord:
        def action(conn: Any) -> OperationRecord:
            row = conn.execute(
                f"INSERT INTO {TABLE} ({_CLAIMED}) VALUES (%s, %s, %s, %s, %s, %s, %s) "
                f"ON CONFLICT (id) DO NOTHING RETURNING {_COLUMNS}",
                _values(record),
            ).fetchone()
            if row is None:  # the id was claimed before: ours was not inserted
                row = conn.execute(f"SELECT {_COLUMNS} FROM {TABLE} WHERE id = %s", (record.id,)).fetchone()
            return _record(row)

        return self._writes.run(action)

    def confirm(self, job_id: str) -> None:
        self._writes.run(lambda conn: conn.execute(f"UPDATE {TABLE} SET confirmed = true WHERE id = %s", (job_id,)))

    def write(self, claims: list[OperationRecord], confirms: list[str]) -> list[OperationRecord]:
        def action(conn: Any) -> list[OperationRecord]:
            if confirms:
                if not claims:  # as on SQLite: confirms alone do not wait for the disk
                    conn.execute("SET LOCAL synchronous_commit = off")
                conn.execute(f"UPDATE {TABLE} SET confirmed = true WHERE id = ANY(%s)", (confirms,))
            if not claims:
                return []
            cursor = conn.cursor()
            cursor.executemany(
                f"INSERT INTO {TABLE} ({_CLAIMED}) VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING",
                [_values(record) for record in claims],
            )
            if cursor.rowcount == len(claims):  # every id was free: each record stored is the one claimed
                return claims
            ids = [record.id for record in claims]
            rows = conn.execute(f"SELECT {_COLUMNS} FROM {TABLE} WHERE id = ANY(%s)", (ids,)).fetchall()
            stored = {row[0]: _record(row) for row in rows}
            return [stored[record.id] for record in claims]

        return self._writes.run(action)

    def mark_dead_lettered(self, letters: list[DeadLetter]) -> None:
        rows = [(letter.reason, letter.job_id, letter.job_sha256) for letter in letters]
        if rows:
            self._writes.run(lambda conn: conn.cursor().executemany(_MARK_DEAD.format("%s"), rows))

    def get(self, job_id: str) -> OperationRecord | None:
        with self._connection() as conn:
            row = conn.execute(f"SELECT {_COLUMNS} FROM {TABLE} WHERE id = %s", (job_id,)).fetchone()
        return None if row is None else _record(row)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def _is_postgres(location: str) -> bool:
    return location.startswith(("postgresql://", "postgres://"))


def _sqlite_path(location: str) -> Path:
    """``sqlite:///abs/path.db`` or ``sqlite:relative/path.db`` (or a bare path)."""
    path = location.removeprefix("sqlite:")
    if path.startswith("//"):  # sqlite:///abs → /abs
        path = path[2:]
    if not path:
        raise ConfigError("INFERQ_OPERATIONS_STORE: a sqlite: location needs a path, e.g. sqlite:var/operations.db")
    return Path(path)


def default_location(result_store: str) -> str:
    """Where operation records go when ``INFERQ_OPERATIONS_STORE`` is unset: the result store's PostgreSQL
    database, or a SQLite file beside the results (``<results>-operations.db``)."""
    if _is_postgres(result_store):
        return result_store
    if result_store.startswith("s3://"):
        raise ConfigError(
            "INFERQ_OPERATIONS_STORE must be set when results are in S3: the gateway records accepted job ids "
            "in a database every replica shares (postgresql://…), or sqlite:PATH for a single replica"
        )
    results = result_store.removeprefix("file://") if result_store.startswith("file://") else result_store
    if results.startswith("sqlite:"):
        results = str(_sqlite_path(results))
    base = Path(results)
    stem = (base.name[: -len(".db")] if base.name.endswith(".db") else base.name) or "results"
    return f"sqlite:{base.with_name(stem + '-operations.db')}"


def open_operation_store(location: str) -> OperationStore:
    """The operation store at ``location`` (``postgresql://…`` or ``sqlite:PATH``)."""
    if _is_postgres(location):
        with needs_extra(POSTGRES, "a postgresql:// operations store"):
            return PostgresOperationStore(location)
    if location.startswith("s3://"):
        raise ConfigError("INFERQ_OPERATIONS_STORE: operation records need a database, not S3")
    return SqliteOperationStore(_sqlite_path(location))

"""The PostgreSQL result store: for a fleet of workers on many hosts, and results a user can query.

One table, ``inferq_results`` (in the schema the URL's ``search_path`` names, ``public`` by default):
``id`` (primary key), ``model``, ``version``, ``status``, ``error_code``, ``created_at`` and the full
result as ``jsonb`` in ``result``, indexed by id and by ``(model, created_at)``. A batch is one
transaction: one ``INSERT … ON CONFLICT (id) DO UPDATE … WHERE`` (only over a replaceable rejection)
``RETURNING id`` of the whole batch as arrays (sent in binary: no quoting of the JSON) and, only when some
ids already had a result, one ``SELECT`` reading those earlier results back; it is committed when
``put_many`` returns.

NOTE: ``jsonb`` cannot hold a NUL character (``\u0000``), so a result with one in a string is refused
(:class:`ValueRefused`; the worker stores a ``result_refused`` failure for that job instead). Keeping it
faithfully would take a ``json`` or ``text`` column, a schema change for every installation.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg_pool import ConnectionPool

from inferq.shared.config.logging import redact_text
from inferq.shared.contract.messages import Result, is_valid_job_id
from inferq.shared.errors import ResultNotFound, StoreError, StoreRefused, StoreUnreachable, ValueRefused
from inferq.shared.results.labels import LabelStore, LabelValue, RowId, StoredResult, label_json, label_of

SCHEMA_VERSION = 1
POOL_MAX_SIZE = 4
POOL_TIMEOUT_S = 3.0
CONNECT_TIMEOUT_S = 5
_READ_CHUNK = 10_000
_SCHEMA_LOCK = 0x1F3E_9A7C  # pg_advisory_xact_lock key: concurrent first uses create the schema once

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS inferq_results ("
    " id text PRIMARY KEY, model text, version integer, status text NOT NULL, error_code text,"
    " created_at timestamptz NOT NULL DEFAULT now(), result jsonb NOT NULL)",
    "CREATE INDEX IF NOT EXISTS inferq_results_by_model_time ON inferq_results (model, created_at)",
)
_INSERT = (
    "INSERT INTO inferq_results (id, model, version, status, error_code, result) "
    "SELECT * FROM unnest(%b::text[], %b::text[], %b::integer[], %b::text[], %b::text[], %b::text[]::jsonb[]) "
    # The first result of an id wins, except over a rejection of another message (base.replaceable).
    "ON CONFLICT (id) DO UPDATE SET model = EXCLUDED.model, version = EXCLUDED.version, "
    "status = EXCLUDED.status, error_code = EXCLUDED.error_code, created_at = now(), result = EXCLUDED.result "
    "WHERE inferq_results.status = 'failed' AND inferq_results.error_code = 'invalid_payload' "
    "AND inferq_results.result ->> 'job_sha256' IS DISTINCT FROM EXCLUDED.result ->> 'job_sha256' "
    "RETURNING id"
)
_SELECT_MANY = "SELECT id, result::text FROM inferq_results WHERE id = ANY(%s::text[])"
# SQLSTATE classes (and codes) by what they say about a failed statement. Worth retrying: connection
# (08), transaction rollback (40: serialization failures, deadlocks), insufficient resources (53),
# operator intervention (57: shutdown, statement timeout), system errors (58), lock not available.
# One result's content: data exceptions (22: a NUL in jsonb is 22P05), integrity (23), limits (54).
# The store refuses us: authorization (28), invalid catalog or schema (3D, 3F), and syntax or access
# rule violations (42: no privilege, no table).
_VALUE_REFUSED = ("22", "23", "54")
_STORE_REFUSED = ("28", "3D", "3F", "42")
# What libpq says when the server turns a new connection away for good (its SQLSTATE is not kept).
# NOTE: the server's messages in English; in another lc_messages such a refusal is retried as transient.
_REFUSED_AT_CONNECT = ("authentication failed", "does not exist", "no pg_hba.conf entry", "permission denied")


def without_password(url: str) -> str:
    """``url`` with any password removed, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}@{host}" if parts.username else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


class PostgresResultStore:
    """Results as rows of a PostgreSQL table, written through a small connection pool."""

    def __init__(self, url: str, *, pool_size: int = POOL_MAX_SIZE) -> None:
        self.url = url
        self.pool_size = pool_size
        self._pool: ConnectionPool[psycopg.Connection[Any]] | None = None
        self._lock = threading.Lock()
        self._schema_ready = False

    def describe(self) -> str:
        return without_password(self.url).split("?", 1)[0]

    def _connections(self) -> ConnectionPool[psycopg.Connection[Any]]:
        with self._lock:
            if self._pool is None:
                # Connections are opened in the background: a database that is down at start makes the
                # first operation fail (the worker retries it) instead of the process.
                self._pool = ConnectionPool(
                    self.url,
                    min_size=1,
                    max_size=self.pool_size,
                    timeout=POOL_TIMEOUT_S,
                    kwargs={"connect_timeout": CONNECT_TIMEOUT_S},
                    # No check on checkout (a round trip per batch): a connection that fails is in a bad
                    # state when it comes back, the pool replaces it, and the worker retries the batch.
                    name="inferq-results",
                    open=False,
                )
                # The pool logs every failed connection attempt (several a second while the server is
                # down); the store reports a failure once, as the error of the operation that met it.
                logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
                self._pool.open(wait=False)
            return self._pool

    def _ensure_schema(self, connection: psycopg.Connection[Any]) -> None:
        if self._schema_ready:
            return
        with connection.transaction(), connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            cursor.execute(
                "CREATE TABLE IF NOT EXISTS inferq_schema (component text PRIMARY KEY, version integer NOT NULL)"
            )
            cursor.execute("SELECT version FROM inferq_schema WHERE component = 'results'")
            row = cursor.fetchone()
            if row is not None and row[0] > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.describe()} has results schema version {row[0]}; this inferq knows up to "
                    f"{SCHEMA_VERSION}: upgrade it"
                )
            if row is None:
                for statement in _SCHEMA:
                    cursor.execute(statement)
                cursor.execute("INSERT INTO inferq_schema VALUES ('results', %s)", (SCHEMA_VERSION,))
        self._schema_ready = True

    def put_many(self, results: Sequence[Result]) -> list[Result]:
        if not results:
            return []
        firsts: dict[str, Result] = {}
        for result in results:
            firsts.setdefault(result.id, result)
        # Rows in id order: two writers whose batches share ids then wait on each other's keys in the
        # same order, instead of each holding one the other needs (a deadlock PostgreSQL would break by
        # failing one of the batches).
        columns = _columns(sorted(firsts.values(), key=lambda r: r.id))
        try:
            with self._connections().connection() as connection:
                self._ensure_schema(connection)
                with connection.transaction(), connection.cursor() as cursor:
                    cursor.execute(_INSERT, columns, prepare=True)
                    inserted = {row[0] for row in cursor.fetchall()}
                    lost = [job_id for job_id in firsts if job_id not in inserted]
                    earlier = self._select(cursor, lost) if lost else {}
        except psycopg.Error as exc:
            # Down, restarting or failing over: the worker retries and acks nothing meanwhile. A refused
            # value or a refused store: the worker finds the refused results, or stops.
            ids = tuple(firsts) if len(firsts) == 1 else ()
            raise self._classified(exc, "write", ids) from None
        return [earlier.get(r.id) or firsts[r.id] for r in results]

    def _classified(self, exc: psycopg.Error, what: str, ids: tuple[str, ...] = ()) -> Exception:
        """``exc`` as :class:`StoreUnreachable`, :class:`ValueRefused` (a write's ``ids``, when known) or
        :class:`StoreRefused`, with a one-line message naming the store and never its password."""
        text = redact_text(f"{what} {'to' if what == 'write' else 'from'} {self.describe()} failed: {_reason(exc)}")
        state = exc.sqlstate or ""
        if state.startswith(_STORE_REFUSED) or (not state and self._refused_at_connect()):
            return StoreRefused(text)
        if state.startswith(_VALUE_REFUSED):
            return ValueRefused(text, ids) if what == "write" else StoreError(text)
        return StoreUnreachable(text)

    def _refused_at_connect(self) -> bool:
        """Whether a new connection is turned away for good (a wrong password, an unknown role or database):
        the pool only says it got none in time, so one connection is tried here, on a failure path only."""
        try:
            psycopg.connect(self.url, connect_timeout=CONNECT_TIMEOUT_S).close()
        except psycopg.OperationalError as exc:
            return any(marker in str(exc) for marker in _REFUSED_AT_CONNECT)
        return False

    @staticmethod
    def _select(cursor: psycopg.Cursor[Any], job_ids: list[str]) -> dict[str, Result]:
        found: dict[str, Result] = {}
        for start in range(0, len(job_ids), _READ_CHUNK):
            cursor.execute(_SELECT_MANY, (job_ids[start : start + _READ_CHUNK],))
            for job_id, text in cursor.fetchall():
                found[job_id] = Result.model_validate_json(text)
        return found

    def _query(self, sql: str, parameters: Sequence[object]) -> list[tuple[Any, ...]]:
        try:
            with self._connections().connection() as connection:
                self._ensure_schema(connection)
                with connection.cursor() as cursor:
                    cursor.execute(sql, parameters)
                    return cursor.fetchall()
        except psycopg.Error as exc:
            raise self._classified(exc, "read") from None

    def get(self, job_id: str) -> Result:
        rows = self._query("SELECT result::text FROM inferq_results WHERE id = %s", (job_id,))
        if not rows:
            raise ResultNotFound(f"no result for job {job_id!r} in {self.describe()}")
        return Result.model_validate_json(rows[0][0])

    def get_many(self, job_ids: Sequence[str]) -> dict[str, Result]:
        valid = [i for i in job_ids if is_valid_job_id(i)]
        found: dict[str, Result] = {}
        for start in range(0, len(valid), _READ_CHUNK):
            for job_id, text in self._query(_SELECT_MANY, (valid[start : start + _READ_CHUNK],)):
                found[job_id] = Result.model_validate_json(text)
        return found

    def exists(self, job_id: str) -> bool:
        return bool(self._query("SELECT 1 FROM inferq_results WHERE id = %s", (job_id,)))

    def scan(self, model: str | None = None) -> Iterator[Result]:
        # Keyset pages by id: no transaction or cursor stays open while the caller writes its file.
        after = ""
        where = "id > %s" + (" AND model = %s" if model is not None else "")
        while True:
            parameters = (after, model) if model is not None else (after,)
            sql = f"SELECT id, result::text FROM inferq_results WHERE {where} ORDER BY id LIMIT 1000"
            rows = self._query(sql, parameters)
            for job_id, text in rows:
                after = job_id
                yield Result.model_validate_json(text)
            if len(rows) < 1000:
                return

    def count(self, model: str | None = None) -> int:
        if model is None:
            return int(self._query("SELECT count(*) FROM inferq_results", ())[0][0])
        return int(self._query("SELECT count(*) FROM inferq_results WHERE model = %s", (model,))[0][0])

    def labels(self) -> LabelStore:
        """Labels and backfill row ids in tables beside ``inferq_results``, through this store's pool."""
        return PostgresLabelStore(self)

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.close()
                self._pool = None


_LABEL_SCHEMA_LOCK = 0x1F3E_9A7E
_LABEL_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS inferq_labels (model text NOT NULL, id text NOT NULL, label jsonb NOT NULL,"
    " created_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (model, id))",
    "CREATE TABLE IF NOT EXISTS inferq_row_ids (model text NOT NULL, row_id text NOT NULL, job_id text NOT NULL,"
    " row_index integer NOT NULL, PRIMARY KEY (model, row_id, job_id, row_index))",
)
_STORED = "SELECT id, result::text, extract(epoch FROM created_at)::float8 FROM inferq_results"


class PostgresLabelStore:
    """Labels (``inferq_labels``) and backfill row ids (``inferq_row_ids``) beside ``inferq_results``."""

    time_resolution_s = 0.0

    def __init__(self, results: PostgresResultStore) -> None:
        self._results = results
        self._schema_ready = False

    def _run(self, what: str, sql: str, parameters: Sequence[object]) -> list[tuple[Any, ...]]:
        """``sql`` in one transaction (the label tables created first, once); its rows, if any."""
        try:
            with self._results._connections().connection() as connection:
                self._results._ensure_schema(connection)
                with connection.transaction(), connection.cursor() as cursor:
                    if not self._schema_ready:
                        cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_LABEL_SCHEMA_LOCK,))
                        for statement in _LABEL_SCHEMA:
                            cursor.execute(statement)
                    cursor.execute(sql, parameters)
                    rows = cursor.fetchall() if cursor.description else []
                self._schema_ready = True
                return rows
        except psycopg.Error as exc:
            raise self._results._classified(exc, what) from None

    def put_labels(self, model: str, labels: Sequence[tuple[str, LabelValue]]) -> int:
        rows = self._run(
            "write",
            "INSERT INTO inferq_labels (model, id, label) SELECT %s, * FROM unnest(%s::text[], %s::text[]::jsonb[])"
            " ON CONFLICT (model, id) DO NOTHING RETURNING id",
            (model, [i for i, _ in labels], [label_json(v) for _, v in labels]),
        )
        return len(rows)

    def labels(self, model: str) -> dict[str, LabelValue]:
        rows = self._run("read", "SELECT id, label::text FROM inferq_labels WHERE model = %s", (model,))
        return {i: label_of(v) for i, v in rows}

    def labeled_models(self) -> list[str]:
        return [row[0] for row in self._run("read", "SELECT DISTINCT model FROM inferq_labels ORDER BY 1", ())]

    def put_row_ids(self, model: str, rows: Sequence[RowId]) -> None:
        self._run(
            "write",
            "INSERT INTO inferq_row_ids SELECT %s, * FROM unnest(%s::text[], %s::text[], %s::integer[])"
            " ON CONFLICT DO NOTHING",
            (model, [r.row_id for r in rows], [r.job_id for r in rows], [r.index for r in rows]),
        )

    def row_ids(self, model: str, row_ids: Sequence[str]) -> dict[str, list[tuple[str, int]]]:
        found: dict[str, list[tuple[str, int]]] = {}
        for start in range(0, len(row_ids), _READ_CHUNK):
            rows = self._run(
                "read",
                "SELECT row_id, job_id, row_index FROM inferq_row_ids WHERE model = %s AND row_id = ANY(%s::text[])",
                (model, list(row_ids[start : start + _READ_CHUNK])),
            )
            for row_id, job_id, index in rows:
                found.setdefault(row_id, []).append((job_id, index))
        return found

    def stored_results(self, job_ids: Sequence[str]) -> dict[str, StoredResult]:
        valid = [i for i in job_ids if is_valid_job_id(i)]
        found: dict[str, StoredResult] = {}
        for start in range(0, len(valid), _READ_CHUNK):
            sql = f"{_STORED} WHERE id = ANY(%s::text[])"
            for job_id, text, at in self._run("read", sql, (valid[start : start + _READ_CHUNK],)):
                found[job_id] = StoredResult(Result.model_validate_json(text), float(at))
        return found

    def scan_results(self, model: str, since_s: float | None = None) -> Iterator[StoredResult]:
        after = ""
        while True:
            sql = f"{_STORED} WHERE id > %s AND model = %s AND created_at >= to_timestamp(%s) ORDER BY id LIMIT 1000"
            rows = self._run("read", sql, (after, model, since_s or 0))
            for job_id, text, at in rows:
                after = job_id
                yield StoredResult(Result.model_validate_json(text), float(at))
            if len(rows) < 1000:
                return

    def close(self) -> None:
        """The pool is the result store's: it closes it."""


def _columns(results: list[Result]) -> tuple[list[Any], ...]:
    """The batch as one array per column, for ``unnest``: one statement however large the batch."""
    return (
        [r.id for r in results],
        [r.model for r in results],
        [r.version for r in results],
        [r.status.value for r in results],
        [r.error.code.value if r.error is not None else None for r in results],
        [r.to_json().decode() for r in results],
    )


def _reason(exc: psycopg.Error) -> str:
    # The first line of the server's or libpq's message: enough to act on, no multi-line detail.
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"

"""Each result store tells its failures apart: worth retrying (``StoreUnreachable``), one result's content
refused (``ValueRefused``), or the whole store refusing us (``StoreRefused``); and a rejection of an
undecodable message gives way to a corrected job that reuses its id."""

from __future__ import annotations

import sqlite3
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from postgres_support import SHARED_URL, schema_url
from seaweedfs import SeaweedFS
from support import S3_BUCKET

from inferq.shared.contract.messages import ErrorInfo, Result, Status, Tensor
from inferq.shared.errors import ErrorCode, StoreRefused, StoreUnreachable, ValueRefused
from inferq.shared.results import sqlite as sqlite_store
from inferq.shared.results.base import ResultStore
from inferq.shared.results.stores import open_result_store

STORES = [
    "file",
    "sqlite",
    pytest.param("postgresql", marks=pytest.mark.postgres),
    pytest.param("s3", marks=pytest.mark.s3),
]


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ResultStore]:
    kind = request.param
    if kind == "file":
        location = f"file://{tmp_path / 'results'}"
    elif kind == "sqlite":
        location = f"sqlite://{tmp_path / 'results.db'}"
    elif kind == "postgresql":
        location = str(request.getfixturevalue("postgres_url"))
    else:
        request.getfixturevalue("seaweedfs")
        location = f"s3://{S3_BUCKET}/refusals-{uuid.uuid4().hex[:8]}/results"
    opened = open_result_store(location)
    yield opened
    opened.close()


def text_result(job_id: str, text: str, digest: str = "d" * 64) -> Result:
    output = Tensor(name="label", shape=[1], datatype="BYTES", data=[text])
    return Result(
        id=job_id,
        model="echo",
        requested_version=1,
        version=1,
        job_sha256=digest,
        status=Status.SUCCEEDED,
        outputs=[output],
        worker="host:1",
    )


def rejection(job_id: str, digest: str | None, worker: str = "host:1") -> Result:
    error = ErrorInfo(code=ErrorCode.INVALID_PAYLOAD, message="field 'inputs' required")
    return Result(
        id=job_id, model="iris", requested_version="latest", job_sha256=digest, status=Status.FAILED, error=error,
        worker=worker,
    )  # fmt: skip


# -- a corrected job reuses the id of a rejected one ---------------------------------------------


def test_a_corrected_job_replaces_the_rejection_of_an_invalid_message_under_its_id(store: ResultStore) -> None:
    # Given the rejection of an undecodable message (a digest of its raw bytes), and one stored before
    # rejections carried a digest
    store.put_many([rejection("order-1", "r" * 64), rejection("order-2", None)])
    # When corrected jobs reuse those ids
    corrected = [text_result("order-1", "ok", "c" * 64), text_result("order-2", "ok", "e" * 64)]
    # Then their results replace the rejections, and are what is stored
    assert store.put_many(corrected) == corrected
    assert [store.get(r.id) for r in corrected] == corrected
    # And the invalid message, redelivered, now finds the corrected job's result (first wins again)
    assert store.put_many([rejection("order-1", "r" * 64, worker="host:2")]) == [corrected[0]]
    assert store.count() == 2


def test_a_redelivered_invalid_message_keeps_its_stored_rejection(store: ResultStore) -> None:
    first = rejection("order-3", "r" * 64)
    store.put_many([first])
    assert store.put_many([rejection("order-3", "r" * 64, worker="host:2")]) == [first]
    assert store.get("order-3").worker == "host:1"


def test_a_stored_success_is_never_replaced_by_another_job(store: ResultStore) -> None:
    first = text_result("order-4", "first", "a" * 64)
    store.put_many([first])
    assert store.put_many([text_result("order-4", "second", "b" * 64)]) == [first]
    assert store.put_many([rejection("order-4", "r" * 64)]) == [first]


# -- PostgreSQL -----------------------------------------------------------------------------------


@pytest.mark.postgres
def test_postgresql_refuses_a_nul_in_a_string_output_and_names_it_when_alone(postgres_url: str) -> None:
    store = open_result_store(postgres_url)
    try:
        # jsonb holds no NUL character: a batch with one is refused as a value, not retried as transient
        with pytest.raises(ValueRefused) as batch:
            store.put_many([text_result("fine", "ok"), text_result("nul", "a\u0000b")])
        assert "UntranslatableCharacter" in str(batch.value) and "\n" not in str(batch.value)
        with pytest.raises(ValueRefused) as alone:
            store.put_many([text_result("nul", "a\u0000b")])
        assert alone.value.ids == ("nul",)
        # and nothing of the refused batch was stored: the rest goes on in a put of its own
        assert store.count() == 0
        assert store.put_many([text_result("fine", "ok")])[0].id == "fine"
    finally:
        store.close()


@pytest.fixture
def limited_role(postgres_url: str) -> Iterator[tuple[str, str]]:
    """A login role that may read the store's tables but not write them, and the admin URL."""
    schema = postgres_url.rsplit("search_path%3D", 1)[1]
    opened = open_result_store(postgres_url)
    opened.count()  # creates the tables
    opened.close()
    role = f"r_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(SHARED_URL, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN")
        admin.execute(f"GRANT USAGE, CREATE ON SCHEMA {schema} TO {role}")
        admin.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA {schema} TO {role}")
        admin.execute(f"REVOKE INSERT, UPDATE ON {schema}.inferq_results FROM {role}")
        try:
            yield schema_url(SHARED_URL.replace("postgres@", f"{role}@"), schema), schema
        finally:
            admin.execute(f"DROP OWNED BY {role}")
            admin.execute(f"DROP ROLE {role}")


@pytest.mark.postgres
def test_postgresql_without_the_insert_privilege_refuses_the_store(limited_role: tuple[str, str]) -> None:
    url, _schema = limited_role
    store = open_result_store(url)
    try:
        assert store.count() == 0  # reading is allowed
        with pytest.raises(StoreRefused) as caught:
            store.put_many([text_result("a", "ok")])
        assert "InsufficientPrivilege" in str(caught.value) and "\n" not in str(caught.value)
    finally:
        store.close()


@pytest.mark.postgres
def test_postgresql_with_its_table_dropped_refuses_the_store(postgres_url: str) -> None:
    store = open_result_store(postgres_url)
    try:
        store.put_many([text_result("a", "ok")])
        schema = postgres_url.rsplit("search_path%3D", 1)[1]
        with psycopg.connect(SHARED_URL, autocommit=True) as admin:
            admin.execute(f"DROP TABLE {schema}.inferq_results")
        with pytest.raises(StoreRefused):
            store.put_many([text_result("b", "ok")])
        with pytest.raises(StoreRefused):
            store.get_many(["a"])
    finally:
        store.close()


@pytest.mark.postgres
def test_postgresql_with_an_unknown_role_refuses_the_store(postgres_url: str) -> None:
    store = open_result_store(postgres_url.replace("postgres@", f"nobody_{uuid.uuid4().hex[:6]}:pw-secret@"))
    try:
        with pytest.raises(StoreRefused) as caught:
            store.put_many([text_result("a", "ok")])
        assert "pw-secret" not in str(caught.value)
    finally:
        store.close()


@pytest.mark.postgres
def test_an_unreachable_postgresql_is_worth_retrying() -> None:
    store = open_result_store("postgresql://postgres@127.0.0.1:9/test")
    try:
        with pytest.raises(StoreUnreachable):
            store.put_many([text_result("a", "ok")])
    finally:
        store.close()


# -- SQLite ---------------------------------------------------------------------------------------


def _chattr(flag: str, *paths: Path) -> None:
    subprocess.run(["chattr", flag, *(str(p) for p in paths if p.exists())], check=True)


def test_a_read_only_sqlite_file_refuses_the_store(tmp_path: Path) -> None:
    db = tmp_path / "results.db"
    store = open_result_store(f"sqlite:{db}")
    store.put_many([text_result("a", "ok")])
    store.close()
    files = [db, db.with_name("results.db-wal")]
    # NOTE: the tests run as root, whom file modes do not stop: the immutable attribute does.
    _chattr("+i", *files)
    try:
        store = open_result_store(f"sqlite:{db}")
        with pytest.raises(StoreRefused) as caught:
            store.put_many([text_result("b", "ok")])
        assert str(db) in str(caught.value)
        store.close()
    finally:
        _chattr("-i", *files)


def test_a_locked_sqlite_file_is_worth_retrying(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "results.db"
    store = open_result_store(f"sqlite:{db}")
    store.put_many([text_result("a", "ok")])
    store.close()
    monkeypatch.setattr(sqlite_store, "BUSY_TIMEOUT_S", 0.2)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process's long write transaction
    try:
        store = open_result_store(f"sqlite:{db}")
        with pytest.raises(StoreUnreachable):
            store.put_many([text_result("b", "ok")])
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert store.put_many([text_result("b", "ok")])[0].id == "b"  # and the retry works
    store.close()


def test_a_sqlite_file_without_its_table_refuses_the_store(tmp_path: Path) -> None:
    db = tmp_path / "results.db"
    store = open_result_store(f"sqlite:{db}")
    store.put_many([text_result("a", "ok")])
    with sqlite3.connect(db) as other:
        other.execute("DROP TABLE results")
    with pytest.raises(StoreRefused):
        store.put_many([text_result("b", "ok")])
    with pytest.raises(StoreRefused):
        store.get_many(["a"])
    store.close()


def test_sqlite_keeps_a_nul_in_a_string_output_faithfully(tmp_path: Path) -> None:
    store = open_result_store(f"sqlite:{tmp_path / 'results.db'}")
    result = text_result("nul", "a\u0000b")
    store.put_many([result])
    assert store.get("nul") == result
    store.close()


# -- files ----------------------------------------------------------------------------------------


def test_a_read_only_result_directory_refuses_the_store(tmp_path: Path) -> None:
    root = tmp_path / "results"
    store = open_result_store(str(root))
    store.put_many([text_result("a", "ok")])
    _chattr("+i", root)
    try:
        with pytest.raises(StoreRefused) as caught:
            store.put_many([text_result("b", "ok")])
        assert str(root) in str(caught.value)
    finally:
        _chattr("-i", root)


# -- S3 -------------------------------------------------------------------------------------------


@pytest.mark.s3
def test_a_missing_bucket_refuses_the_store(seaweedfs: SeaweedFS) -> None:
    del seaweedfs
    store = open_result_store(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/results")
    try:
        with pytest.raises(StoreRefused):
            store.put_many([text_result("a", "ok"), text_result("b", "ok")])
        with pytest.raises(StoreRefused):
            store.get_many(["a"])
    finally:
        store.close()


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        ("AccessDenied", StoreRefused),
        ("InvalidAccessKeyId", StoreRefused),
        ("SignatureDoesNotMatch", StoreRefused),
        ("NoSuchBucket", StoreRefused),
        ("PermanentRedirect", StoreRefused),
        ("301", StoreRefused),
        ("403", StoreRefused),
        ("EntityTooLarge", ValueRefused),
    ],
)
def test_s3_answers_that_no_retry_fixes_are_told_apart(code: str, kind: type[Exception]) -> None:
    from inferq.shared.s3.client import refusal  # noqa: PLC0415

    assert type(refusal(code, f"put s3://b/k: {code}")) is kind

"""The grouped record write of admission, on SQLite and on the real PostgreSQL: the claims and confirms of
many requests in one transaction, with the same rules as one claim at a time (the first body of an id
wins, a confirm marks only its own record)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from inferq.gateway.records import OperationRecord, OperationStore, open_operation_store

POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
GROUP = 1200
"""More ids than one ``IN (...)`` list holds."""


@pytest.fixture
def postgres_schema() -> Iterator[str]:
    schema = f"test_ops_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{POSTGRES}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(POSTGRES, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OperationStore]:
    location = f"sqlite:{tmp_path}/ops.db" if request.param == "sqlite" else request.getfixturevalue("postgres_schema")
    opened = open_operation_store(location)
    yield opened
    opened.close()


def record(job_id: str, body_digest: str = "d1") -> OperationRecord:
    return OperationRecord(job_id, "iris", "latest", body_digest, None, 1.5, job_sha256=f"job-{job_id}")


def test_a_group_of_claims_is_written_at_once_and_the_first_body_of_each_id_wins(store: OperationStore) -> None:
    # Given an id claimed before
    store.claim(record("taken", "first"))
    # When a group claims it again with another body, beside new ids
    claims = [record(f"new-{i}") for i in range(GROUP)] + [record("taken", "second")]
    stored = store.write(claims, [])
    # Then each claim gets the record stored for its id, in order: its own, or the earlier one
    assert stored[:GROUP] == claims[:GROUP]
    assert stored[GROUP] == record("taken", "first")
    assert not any(r.confirmed for r in stored)


def test_confirms_mark_only_their_own_records_with_or_without_claims(store: OperationStore) -> None:
    store.write([record("a"), record("b")], [])
    # When "a" is confirmed alone, then "b" beside a new claim
    assert store.write([], ["a"]) == []
    assert store.write([record("c")], ["b"]) == [record("c")]
    # Then "a" and "b" are queued, "c" is claimed only, and an id never claimed has no record
    assert [store.get(i).confirmed for i in ("a", "b", "c")] == [True, True, False]  # type: ignore[union-attr]
    store.write([], ["never-claimed"])
    assert store.get("never-claimed") is None

"""The grouped record write of admission, on SQLite and on the real PostgreSQL: the claims and confirms of
many requests in one transaction, with the same rules as one claim at a time (the first body of an id
wins, a confirm marks only its own record)."""

from __future__ import annotations

from inferq.gateway.records import OperationRecord, OperationStore

GROUP = 1200
"""More ids than one ``IN (...)`` list holds."""


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

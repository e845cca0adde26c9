"""The operation record, on SQLite and on the real PostgreSQL: one body per job id, whoever claims it,
and the pure pieces of admission (where records go by default, the content digest)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from inferq.gateway.dead_letters import DeadLetter
from inferq.gateway.jobs import digest
from inferq.gateway.protocol import InferenceRequest
from inferq.gateway.records import (
    OperationRecord,
    OperationStore,
    PostgresOperationStore,
    SqliteOperationStore,
    default_location,
    open_operation_store,
)
from inferq.shared.contract.messages import Job
from inferq.shared.errors import ConfigError, StoreUnreachable


def record(job_id: str, body_digest: str = "d1") -> OperationRecord:
    return OperationRecord(job_id, "iris", "latest", body_digest, ("label",), 1.5)


def test_the_first_claim_of_an_id_wins_and_confirm_marks_it_queued(store: OperationStore) -> None:
    assert store.claim(record("a")) == record("a")
    assert store.claim(record("a", "other")) == record("a")  # the earlier body is what the id means
    assert store.get("a") is not None and not store.get("a").confirmed  # type: ignore[union-attr]
    store.confirm("a")
    assert store.get("a") == OperationRecord("a", "iris", "latest", "d1", ("label",), 1.5, confirmed=True)
    assert store.get("never") is None


def test_racing_claims_of_one_id_all_see_the_same_winner(store: OperationStore) -> None:
    # Given 16 threads claiming 50 ids, each with a body of its own
    winners: dict[str, set[str]] = {}
    lock = threading.Lock()

    def claim(n: int) -> None:
        for i in range(50):
            won = store.claim(record(f"id-{i}", f"body-{n}"))
            with lock:
                winners.setdefault(won.id, set()).add(won.digest)

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Then every claimer of an id was told the same body
    assert len(winners) == 50 and all(len(bodies) == 1 for bodies in winners.values())


@pytest.mark.postgres
def test_two_stores_on_one_database_share_claims(tmp_path: Path, postgres_url: str) -> None:
    for location in (f"sqlite:{tmp_path}/shared.db", postgres_url):
        first, second = open_operation_store(location), open_operation_store(location)
        first.claim(record("shared"))
        assert second.claim(record("shared", "different")).digest == "d1"
        first.close()
        second.close()


def test_an_unreachable_postgres_is_a_store_error_without_the_password() -> None:
    with pytest.raises(StoreUnreachable) as caught:
        PostgresOperationStore("postgresql://inferq:hunter2-secret@127.0.0.1:1/none")
    assert "hunter2-secret" not in str(caught.value)


def test_records_go_beside_the_results_by_default() -> None:
    assert default_location("./var/results") == "sqlite:var/results-operations.db"
    assert default_location("sqlite:///srv/inferq/results.db") == "sqlite:/srv/inferq/results-operations.db"
    assert default_location("sqlite:var/results.db") == "sqlite:var/results-operations.db"
    assert default_location("file:///data/results") == "sqlite:/data/results-operations.db"
    assert default_location("postgresql://postgres@db:5432/inferq") == "postgresql://postgres@db:5432/inferq"
    with pytest.raises(ConfigError, match="INFERQ_OPERATIONS_STORE"):
        default_location("s3://bucket/results")
    assert isinstance(open_operation_store("sqlite:/tmp/inferq-test-ops.db"), SqliteOperationStore)


def test_the_digest_covers_what_the_job_asks_for_not_its_id() -> None:
    tensor = {"name": "X", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}
    request = InferenceRequest.model_validate({"inputs": [tensor], "parameters": {"b": 1, "a": 2}})
    reordered = InferenceRequest.model_validate({"inputs": [tensor], "parameters": {"a": 2, "b": 1}})
    inputs = [t.tensor() for t in request.inputs]
    job = Job(id="one", model="iris", version="latest", inputs=inputs, parameters=request.parameters)
    same_under_other_id = job.model_copy(update={"id": "two"})
    other_version = job.model_copy(update={"version": 2})
    assert digest(job, request) == digest(same_under_other_id, reordered)
    assert digest(job, request) != digest(other_version, request)


def _open_at(path: str, start_at: float) -> str | None:
    """Open (and so create) the operation store at ``path`` at the moment ``start_at``; the error, if any."""
    import time  # noqa: PLC0415

    time.sleep(max(0.0, start_at - time.time()))
    try:
        SqliteOperationStore(path).close()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


RACE_ROUNDS = 60
RACE_PROCESSES = 8


def test_replicas_creating_the_sqlite_file_together_all_start(tmp_path: Path) -> None:
    # Given eight processes that open one new SQLite file at the same moment, sixty times over
    import multiprocessing  # noqa: PLC0415
    import time  # noqa: PLC0415

    failures: list[str] = []
    with multiprocessing.get_context("spawn").Pool(RACE_PROCESSES) as pool:
        pool.map(abs, range(RACE_PROCESSES))  # every process started and idle
        for round_ in range(RACE_ROUNDS):
            path, start_at = str(tmp_path / f"ops-{round_}.db"), time.time() + 0.1
            failures += [e for e in pool.starmap(_open_at, [(path, start_at)] * RACE_PROCESSES) if e]
    # Then every one of them started, each round
    assert not failures, f"{len(failures)} of {RACE_ROUNDS * RACE_PROCESSES} starts failed, e.g. {failures[0]}"


def test_a_dead_letter_marks_only_the_record_of_the_same_job(store: OperationStore) -> None:
    # Given two admitted jobs
    store.claim(OperationRecord("a", "iris", "latest", "d1", None, 1.0, job_sha256="job-a"))
    store.claim(OperationRecord("b", "iris", "latest", "d2", None, 1.0, job_sha256="job-b"))
    # When dead letters arrive: one of job a, one of another job under id b, one of an id never admitted
    store.mark_dead_lettered(
        [DeadLetter("a", "job-a", "delivery_limit"), DeadLetter("b", "other", "x"), DeadLetter("c", "job-c", "y")]
    )
    # Then only a's record says so, and a later dead letter of it does not change the first reason
    store.mark_dead_lettered([DeadLetter("a", "job-a", "later")])
    assert store.get("a").dead_letter == "delivery_limit"  # type: ignore[union-attr]
    assert store.get("b").dead_letter is None  # type: ignore[union-attr]
    assert store.get("c") is None


def test_records_written_before_job_digests_are_read_and_extended(tmp_path: Path) -> None:
    # Given an operations file from a release whose records had no job digest
    import sqlite3  # noqa: PLC0415

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE inferq_operations (id TEXT PRIMARY KEY, model TEXT NOT NULL, "
            "requested_version TEXT NOT NULL, digest TEXT NOT NULL, outputs TEXT, "
            "accepted_at REAL NOT NULL, confirmed INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID"
        )
        db.execute("INSERT INTO inferq_operations VALUES ('old', 'iris', 'latest', 'd0', NULL, 1.0, 1)")
    db.close()
    # When it is opened by this release (twice: the upgrade is idempotent)
    SqliteOperationStore(path).close()
    store = SqliteOperationStore(path)
    # Then the old record reads as before, and new ones carry their job digest
    assert store.get("old") == OperationRecord("old", "iris", "latest", "d0", None, 1.0, confirmed=True)
    store.claim(record("new"))
    store.close()

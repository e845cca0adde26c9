"""One contract, every result store: file, SQLite, PostgreSQL and S3 answer the same way.

Round trip, the first result for an id wins (within a batch, across batches and between two processes
racing on the same ids), lookups of many ids, scans, and one-line errors for malformed locations."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from seaweedfs import SeaweedFS
from support import S3_BUCKET

from inferq.shared.contract.messages import ErrorInfo, Result, Status, Tensor
from inferq.shared.errors import ConfigError, ErrorCode, ResultNotFound
from inferq.shared.results.base import ResultStore
from inferq.shared.results.stores import open_result_store, parse_location

STORES = [
    "file",
    "sqlite",
    pytest.param("postgresql", marks=pytest.mark.postgres),
    pytest.param("s3", marks=pytest.mark.s3),
]


@pytest.fixture(params=STORES)
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    kind = request.param
    if kind == "file":
        return f"file://{tmp_path / 'results'}"
    if kind == "sqlite":
        return f"sqlite://{tmp_path / 'results.db'}"
    if kind == "postgresql":
        return str(request.getfixturevalue("postgres_url"))
    request.getfixturevalue("seaweedfs")
    return f"s3://{S3_BUCKET}/contract-{uuid.uuid4().hex[:8]}/results"


@pytest.fixture
def store(location: str) -> Iterator[ResultStore]:
    opened = open_result_store(location)
    yield opened
    opened.close()


def succeeded(job_id: str, worker: str = "host:1", model: str = "iris", value: float = 0.25) -> Result:
    output = Tensor(name="probabilities", shape=[1, 3], datatype="FP32", data=[value, 0.5, 0.25])
    return Result(
        id=job_id,
        model=model,
        requested_version="latest",
        version=2,
        model_sha256="ab" * 32,
        status=Status.SUCCEEDED,
        outputs=[output],
        worker=worker,
    )


def failed(job_id: str, worker: str = "host:1") -> Result:
    error = ErrorInfo(code=ErrorCode.INPUT_MISMATCH, message="4 features expected, 3 given")
    return Result(id=job_id, model="iris", requested_version=7, status=Status.FAILED, error=error, worker=worker)


def test_stored_results_read_back_whole(store: ResultStore) -> None:
    # Given a batch with a success, a failure and a value that must survive JSON exactly
    batch = [succeeded("job-1", value=0.1 + 0.2), failed("job-2"), succeeded("job-3", model="other")]
    # When it is stored
    assert store.put_many(batch) == batch
    # Then every way of reading it gives the same results back
    assert [store.get(r.id) for r in batch] == batch
    assert store.get_many(["job-1", "job-2", "job-3", "job-4", "../x"]) == {r.id: r for r in batch}
    assert store.exists("job-2") and not store.exists("job-4") and not store.exists("../etc/passwd")
    assert sorted(r.id for r in store.scan()) == ["job-1", "job-2", "job-3"]
    assert [r.id for r in store.scan("other")] == ["job-3"]
    assert store.count() == 3 and store.count("iris") == 2
    with pytest.raises(ResultNotFound):
        store.get("job-4")


def test_the_first_result_for_an_id_wins_within_and_across_batches(store: ResultStore) -> None:
    first = store.put_many([succeeded("a", worker="w1"), succeeded("a", worker="w2"), failed("b", worker="w1")])
    assert [r.worker for r in first] == ["w1", "w1", "w1"]
    again = store.put_many([failed("a", worker="w3"), succeeded("c", worker="w3"), succeeded("b", worker="w3")])
    assert [(r.id, r.worker, r.status) for r in again] == [
        ("a", "w1", Status.SUCCEEDED),
        ("c", "w3", Status.SUCCEEDED),
        ("b", "w1", Status.FAILED),
    ]
    assert store.get("a").worker == "w1" and store.count() == 3


def test_an_empty_batch_stores_nothing(store: ResultStore) -> None:
    assert store.put_many([]) == []
    assert store.count() == 0 and list(store.scan()) == []


RACER = """
import json, random, sys
from inferq.shared.results.stores import open_result_store
from inferq.shared.contract.messages import Result, Status, Tensor
location, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
ids = [f"race-{i}" for i in range(count)]
random.Random(name).shuffle(ids)
store = open_result_store(location)
seen = {}
for start in range(0, count, 100):
    batch = [
        Result(id=i, model="iris", requested_version=1, version=1, status=Status.SUCCEEDED, worker=name,
               outputs=[Tensor(name="y", shape=[1], datatype="INT64", data=[1])])
        for i in ids[start:start + 100]
    ]
    for mine, stored in zip(batch, store.put_many(batch)):
        seen[mine.id] = stored.worker
store.close()
print(json.dumps(seen))
"""


def test_two_processes_racing_on_the_same_ids_agree_on_one_result_each(location: str) -> None:
    count = 1500
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, location, name, str(count)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        for name in ("racer-a", "racer-b")
    ]
    views = []
    for racer in racers:
        out, err = racer.communicate(timeout=120)
        assert racer.returncode == 0, err
        views.append(json.loads(out))
    store = open_result_store(location)
    try:
        stored = {r.id: r.worker for r in store.scan()}
    finally:
        store.close()
    # Each id has exactly one stored result, and both racers were told that same one.
    assert len(stored) == count
    assert views[0] == stored and views[1] == stored
    winners = set(stored.values())
    print(f"race over {count} ids: racer-a won {sum(w == 'racer-a' for w in stored.values())}, winners {winners}")


@pytest.mark.parametrize(
    "location",
    [
        "",
        "sqlite:",
        "sqlite://host/db",
        "file://relative",
        "file:///",
        "s3://",
        "redis://127.0.0.1/0",
        "postgresql://user:hunter2@db:notaport/results",
        "postgresql://user:hunter2@db:5432",
    ],
)
def test_a_malformed_location_is_one_error_naming_the_setting(location: str) -> None:
    with pytest.raises(ConfigError) as caught:
        open_result_store(location)
    message = str(caught.value)
    assert message.startswith("INFERQ_RESULT_STORE: ") and "\n" not in message
    assert "hunter2" not in message


def test_locations_name_their_store() -> None:
    assert parse_location("sqlite:var/results.db") == ("sqlite", "var/results.db")
    assert parse_location("sqlite:///srv/results.db") == ("sqlite", "/srv/results.db")
    assert parse_location("file:///srv/results") == ("file", "/srv/results")
    assert parse_location("./var/results") == ("file", "./var/results")
    assert parse_location("s3://bucket/prefix") == ("s3", "s3://bucket/prefix")
    assert parse_location("postgresql://u@h:5432/db")[0] == "postgresql"


def test_the_cli_reports_a_bad_store_in_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "inferq", "results", "get", "x"],
        env={"PATH": "/usr/bin:/bin", "INFERQ_RESULT_STORE": "mysql://u:secret@h/db", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 2
    assert done.stderr.startswith("inferq: error: INFERQ_RESULT_STORE: unknown scheme 'mysql'")
    assert done.stderr.count("\n") == 1 and "secret" not in done.stderr


@pytest.mark.s3
def test_a_default_store_is_sqlite_under_var(tmp_path: Path, seaweedfs: SeaweedFS) -> None:
    del seaweedfs  # (only to share the session's server with the other tests of this file)
    from inferq.shared.config.settings import InferqSettings  # noqa: PLC0415

    assert parse_location(InferqSettings().result_store) == ("sqlite", "var/results.db")


def test_an_unreachable_postgresql_is_one_line_without_its_password(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "inferq", "results", "get", "some-job"],
        env={
            "PATH": "/usr/bin:/bin",
            "HOME": str(tmp_path),
            "INFERQ_RESULT_STORE": "postgresql://inferq:hunter2@127.0.0.1:9/results",
            "PGPASSWORD": "pg-secret-value",
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 1
    assert done.stderr.startswith("inferq: error: read from postgresql://inferq@127.0.0.1:9/results failed")
    assert "hunter2" not in done.stderr and "pg-secret-value" not in done.stderr


OPENER = """
import sys, time
from pathlib import Path
from inferq.shared.results.stores import open_result_store
from inferq.shared.contract.messages import Result, Status, Tensor
root, name, count, openers = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
for n in range(count):
    (root / f"{n}.{name}.ready").touch()  # all start on database n together (unless one has died)
    deadline = time.monotonic() + 0.5
    while len(list(root.glob(f"{n}.*.ready"))) < openers and time.monotonic() < deadline:
        time.sleep(0.0005)
    store = open_result_store(f"sqlite:{root}/{n}.db")
    result = Result(id="job-1", model="iris", requested_version=1, version=1, status=Status.SUCCEEDED, worker=name,
                    outputs=[Tensor(name="y", shape=[1], datatype="INT64", data=[1])])
    try:
        store.put_many([result])
    except Exception as exc:
        print(f"database {n}: {exc}", flush=True)
    store.close()
"""


def test_workers_opening_a_new_sqlite_database_at_once_all_get_in(tmp_path: Path) -> None:
    """A fleet starting on a new database file: each process switches it to WAL on first use, and the
    one that loses that race waits for the other instead of failing its first batch."""
    count = 300
    openers = [
        subprocess.Popen(
            [sys.executable, "-c", OPENER, str(tmp_path), f"opener-{n}", str(count), "3"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        for n in range(3)
    ]
    try:
        outputs = [opener.communicate(timeout=120) for opener in openers]
    finally:
        for opener in openers:
            opener.kill()
            opener.wait()
    assert [opener.returncode for opener in openers] == [0, 0, 0], "\n".join(err for _, err in outputs)
    failed = [line for out, _ in outputs for line in out.splitlines()]
    assert not failed, f"{len(failed)} first batches failed, e.g. {failed[:3]}"
    for n in range(count):
        store = open_result_store(f"sqlite:{tmp_path}/{n}.db")
        try:
            assert store.count() == 1
        finally:
            store.close()

"""The file result store: atomic writes, the first result of an id wins, typed misses."""

from __future__ import annotations

from pathlib import Path

import pytest

from inferq.shared.contract.messages import ErrorInfo, Result, Status
from inferq.shared.errors import ErrorCode, ResultNotFound
from inferq.shared.results.files import FileResultStore


def failed(job_id: str, worker: str) -> Result:
    error = ErrorInfo(code=ErrorCode.INFERENCE_ERROR, message="boom")
    return Result(id=job_id, model="m", requested_version=1, status=Status.FAILED, error=error, worker=worker)


def test_results_round_trip_and_leave_no_temporary_files(tmp_path: Path) -> None:
    store = FileResultStore(tmp_path)
    results = [failed(f"job-{i}", "w:1") for i in range(5)]
    assert store.put_many(results) == results
    assert [store.get(r.id) for r in results] == results
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"job-{i}.json" for i in range(5)]


def test_the_first_result_of_an_id_wins(tmp_path: Path) -> None:
    store = FileResultStore(tmp_path)
    first, second = failed("twice", "w:1"), failed("twice", "w:2")
    store.put_many([first])
    assert store.put_many([second, failed("other", "w:2")]) == [first, failed("other", "w:2")]
    assert store.get("twice") == first


def test_a_missing_or_invalid_id_is_a_typed_miss(tmp_path: Path) -> None:
    store = FileResultStore(tmp_path)
    with pytest.raises(ResultNotFound, match="no result for job 'nope'"):
        store.get("nope")
    with pytest.raises(ResultNotFound, match="not a valid job id"):
        store.get("../etc/passwd")
    assert not store.exists("../etc/passwd")

"""The file result store writes a batch durably and atomically, with one flush for the whole batch."""

from __future__ import annotations

from pathlib import Path

import pytest

from inferq.shared.contract.messages import ErrorInfo, Result, Status
from inferq.shared.errors import ErrorCode
from inferq.shared.results import files
from inferq.shared.results.files import FileResultStore


def _failed(job_id: str) -> Result:
    return Result(
        id=job_id,
        model="m",
        requested_version="latest",
        status=Status.FAILED,
        error=ErrorInfo(code=ErrorCode.INVALID_PAYLOAD, message="bad"),
        worker="host:1",
    )


@pytest.mark.parametrize("syncfs", [True, False], ids=["syncfs", "fsync-each"])
def test_a_stored_batch_reads_back_and_leaves_no_temporary_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, syncfs: bool
) -> None:
    if not syncfs:
        monkeypatch.setattr(files, "_syncfs", None)
    store = FileResultStore(tmp_path)
    batch = [_failed(f"job-{i}") for i in range(5)]
    store.put_many(batch)
    assert [store.get(r.id) for r in batch] == batch
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{r.id}.json" for r in batch)


def test_a_failing_flush_stores_nothing_and_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(_paths: object, _directory: object) -> None:
        raise OSError(5, "I/O error")

    monkeypatch.setattr(files, "_flush_files", broken)
    store = FileResultStore(tmp_path)
    with pytest.raises(OSError, match="I/O error"):
        store.put_many([_failed("job-1"), _failed("job-2")])
    assert not store.exists("job-1")
    assert list(tmp_path.iterdir()) == []


def test_a_result_is_encoded_once_and_the_cache_does_not_change_equality() -> None:
    result = _failed("job-1")
    first = result.to_json()
    assert result.to_json() is first
    assert result == _failed("job-1")
    assert Result.model_validate_json(first) == result

"""Every monitoring store keeps the same contract: window counts of many workers add up exactly."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import S3_BUCKET

from inferq.monitoring.store import MonitorStore, ShadowPair, WindowCounts, open_monitor_store


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgresql", marks=pytest.mark.postgres),
        "file",
        pytest.param("s3", marks=pytest.mark.s3),
    ]
)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MonitorStore]:
    kind = request.param
    if kind == "sqlite":
        location = f"sqlite:{tmp_path}/results.db"
    elif kind == "postgresql":
        location = request.getfixturevalue("postgres_url")
    elif kind == "s3":
        request.getfixturevalue("seaweedfs")
        location = f"s3://{S3_BUCKET}/monitor-{tmp_path.name}"
    else:
        location = str(tmp_path / "results")
    opened = open_monitor_store(location)
    yield opened
    opened.close()


def window(start: int, worker: str, rows: int, inputs: dict[int, list[int]]) -> WindowCounts:
    return WindowCounts("m", 1, start, 60, worker, rows, inputs, {0: [rows, 0, 0]})


def test_windows_of_two_workers_and_two_windows_add_up(store: MonitorStore) -> None:
    now = int(time.time()) // 60 * 60
    store.put_window(window(now - 120, "a:1", 10, {0: [5, 5, 0], 1: [10, 0, 0]}))
    store.put_window(window(now - 120, "b:2", 4, {0: [1, 3], 1: [0, 0, 4]}))
    store.put_window(window(now, "a:1", 6, {0: [0, 0, 6], 1: [3, 3, 0]}))
    store.put_window(WindowCounts("m", 2, now, 60, "a:1", 99, {0: [99]}, {}))  # another version: apart

    totals = store.totals("m", 1)

    assert (totals.rows, totals.windows) == (20, 3)
    assert totals.inputs == {0: [6, 8, 6], 1: [13, 3, 4]}
    assert totals.outputs == {0: [20]}
    recent = store.totals("m", 1, since_s=now - 60)
    assert (recent.rows, recent.inputs[0]) == (6, [0, 0, 6])
    assert store.totals("other", 1).rows == 0


def test_the_same_window_written_twice_adds_both(store: MonitorStore) -> None:
    store.put_window(window(600, "a:1", 2, {0: [2]}))
    store.put_window(window(600, "a:1", 3, {0: [0, 3]}))
    totals = store.totals("m", 1)
    assert totals.rows == 5 and totals.inputs[0] == [2, 3]


def pair(job_id: str, model: str = "m", shadow_version: int = 2) -> ShadowPair:
    tensor = {"name": "label", "shape": [1], "datatype": "INT64", "data": [1]}
    return ShadowPair(job_id, model, 1, shadow_version, [tensor], [tensor], 1.5, 0.5, None, "a:1")


def test_shadow_pairs_are_kept_once_per_job_and_shadow_version(store: MonitorStore) -> None:
    store.put_pairs([pair("j1"), pair("j2"), pair("j1", model="other")])
    store.put_pairs([pair("j1"), pair("j3")])  # j1 again: a redelivered job makes the same pair

    pairs = sorted(store.pairs("m"), key=lambda p: p.job_id)

    assert [p.job_id for p in pairs] == ["j1", "j2", "j3"]
    assert pairs[0] == pair("j1")
    assert store.pairs("nothing") == []


def test_skipped_shadow_jobs_add_up(store: MonitorStore) -> None:
    store.put_window(WindowCounts("m", 1, 0, 0, "a:1", shadow_skipped=5))
    store.put_window(WindowCounts("m", 1, 60, 0, "b:2", shadow_skipped=2))
    assert store.totals("m", 1).shadow_skipped == 7

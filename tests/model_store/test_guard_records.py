"""The guard record and the alias history under concurrency, on the file store and on S3 (SeaweedFS):
counts from many writers add up, exactly one of them decides, and a rollback happens once."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import ValidationError
from support import S3_BUCKET, Models

from inferq.model_store.base import ModelStore, publish, set_alias
from inferq.model_store.guard import GuardRecord, GuardState, contribute, observe_accuracy, read_guards, roll_back
from inferq.model_store.history import GuardSpec, now, read_history
from inferq.model_store.local import LocalModelStore
from inferq.model_store.s3 import S3ModelStore
from inferq.shared.errors import InvalidName, NotGuardable
from inferq.shared.s3.location import S3Location

WRITERS = 6
EACH = 5  # failures each writer adds, one at a time


def race(stores: list[ModelStore], guard_id: str) -> list[GuardRecord]:
    """Every store adds EACH failures one by one, all at once; returns the decisions they got."""
    barrier = threading.Barrier(len(stores))
    decided: list[GuardRecord] = []

    def add(store: ModelStore) -> None:
        barrier.wait()
        for _ in range(EACH):
            _, decision = contribute(store, "iris", "champion", guard_id, 0, 1)
            if decision is not None:
                decided.append(decision)

    threads = [threading.Thread(target=add, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return decided


def guarded(store: ModelStore, models: Models, window: int) -> str:
    publish(store, "iris", models.forest_onnx, alias="champion")
    publish(store, "iris", models.logistic_onnx)
    return set_alias(store, "iris", "champion", 2, guard=GuardSpec(error_rate=0.5, window=window)).id


def check_one_decision_and_one_rollback(stores: list[ModelStore], models: Models) -> None:
    # Given a guard whose window is reached half-way through many writers' counts
    guard_id = guarded(stores[0], models, window=WRITERS * EACH // 2)
    # When they all count at once
    decided = race(stores, guard_id)
    # Then exactly one writer decided, and only counts up to its decision were taken
    assert len(decided) == 1 and decided[0].state is GuardState.ROLLING_BACK
    record = read_guards(stores[0], "iris")["champion"]
    assert record.failed == WRITERS * EACH // 2
    # And carrying the rollback out from every writer at once moves the alias back once
    moved = []
    threads = [threading.Thread(target=lambda s=s: moved.append(roll_back(s, "iris", decided[0]))) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert moved.count(True) == 1
    assert stores[0].read_aliases("iris")["champion"] == 1
    assert read_guards(stores[0], "iris")["champion"].state is GuardState.ROLLED_BACK
    assert [m.by.startswith("guard") for m in read_history(stores[0], "iris")] == [False, False, True]


def test_many_writers_on_the_file_store_decide_once(tmp_path: Path, models: Models) -> None:
    check_one_decision_and_one_rollback([LocalModelStore(tmp_path) for _ in range(WRITERS)], models)


@pytest.mark.s3
def test_many_writers_on_s3_decide_once(seaweedfs: object, models: Models) -> None:
    location = S3Location.parse(f"s3://{S3_BUCKET}/guards-{uuid.uuid4().hex[:12]}/models")
    check_one_decision_and_one_rollback([S3ModelStore(location) for _ in range(WRITERS)], models)


def test_a_later_move_replaces_the_guard_and_its_counts_go_nowhere(tmp_path: Path, models: Models) -> None:
    store = LocalModelStore(tmp_path)
    guard_id = guarded(store, models, window=3)
    set_alias(store, "iris", "champion", 1)  # a person moves it back by hand
    assert contribute(store, "iris", "champion", guard_id, 0, 5) == (False, None)
    assert "champion" not in read_guards(store, "iris")
    assert store.read_aliases("iris")["champion"] == 1


def test_a_rollback_leaves_an_alias_moved_since_alone(tmp_path: Path, models: Models) -> None:
    store = LocalModelStore(tmp_path)
    guard_id = guarded(store, models, window=1)
    _, decided = contribute(store, "iris", "champion", guard_id, 0, 1)
    assert decided is not None
    set_alias(store, "iris", "champion", 1, reason="by hand first")
    assert roll_back(store, "iris", decided) is False
    assert [m.reason for m in read_history(store, "iris")][-1] == "by hand first"


def test_a_guard_needs_an_alias_that_exists_and_points_elsewhere(tmp_path: Path, models: Models) -> None:
    store = LocalModelStore(tmp_path)
    publish(store, "iris", models.forest_onnx, alias="champion")
    spec = GuardSpec(error_rate=0.1, window=5)
    with pytest.raises(NotGuardable, match="does not exist yet"):
        set_alias(store, "iris", "canary", 1, guard=spec)
    with pytest.raises(NotGuardable, match="already points at version 1"):
        set_alias(store, "iris", "champion", 1, guard=spec)


@pytest.mark.parametrize("document", ["../aliases.json", "aliases.json", "x/guards.json"])
def test_only_known_documents_can_be_read_or_written(tmp_path: Path, document: str) -> None:
    store = LocalModelStore(tmp_path)
    write: Callable[[bytes | None], bytes | None] = lambda _: b"{}"  # noqa: E731
    with pytest.raises(InvalidName):
        store.read_document("iris", document)
    with pytest.raises(InvalidName):
        store.update_document("iris", document, write)


def _record(spec: GuardSpec) -> GuardRecord:
    return GuardRecord(
        id="m", alias="champion", from_version=1, to_version=2, spec=spec, by="me@here", started_at=now()
    )


def test_a_guard_on_accuracy_waits_for_its_window_then_rolls_back_below_the_minimum_or_passes() -> None:
    guard = _record(GuardSpec(min_accuracy=0.8, window=10))

    assert guard.observe(9, 0).state is GuardState.WATCHING  # too few labeled to judge
    low = guard.observe(10, 7)
    assert low.state is GuardState.ROLLING_BACK
    assert low.reason == "accuracy 70.0% on 10 labeled predictions of version 2 (< 80.0%)"
    assert guard.observe(10, 8).state is GuardState.PASSED
    assert guard.add(0, 50).state is GuardState.WATCHING  # failures do not count: the error rate is not watched


def test_a_guard_on_both_rolls_back_on_either_and_passes_only_once_both_are_judged() -> None:
    guard = _record(GuardSpec(error_rate=0.2, min_accuracy=0.8, window=10))

    jobs_fine = guard.add(10, 0)
    assert jobs_fine.state is GuardState.WATCHING  # the accuracy has no full window yet
    assert jobs_fine.observe(10, 10).state is GuardState.PASSED
    assert jobs_fine.observe(10, 5).state is GuardState.ROLLING_BACK
    assert guard.add(5, 5).state is GuardState.ROLLING_BACK  # failures alone are enough
    assert GuardSpec(error_rate=0.2, min_accuracy=0.8, window=10).describe() == (
        "error rate > 20% over 10 jobs or accuracy < 80% over 10 labeled predictions"
    )


def test_a_guard_watches_something() -> None:
    with pytest.raises(ValidationError, match="an error rate, an accuracy, or both"):
        GuardSpec(window=10)


def test_many_workers_observing_the_same_accuracy_decide_once(tmp_path: Path, models: Models) -> None:
    store = LocalModelStore(tmp_path)
    publish(store, "iris", models.forest_onnx, alias="champion")
    publish(store, "iris", models.logistic_onnx)
    guard_id = set_alias(store, "iris", "champion", 2, guard=GuardSpec(min_accuracy=0.9, window=20)).id
    barrier = threading.Barrier(WRITERS)
    decided: list[GuardRecord] = []

    def observe(writer: ModelStore) -> None:
        barrier.wait()
        decision = observe_accuracy(writer, "iris", "champion", guard_id, 20, 3)
        if decision is not None:
            decided.append(decision)

    threads = [threading.Thread(target=observe, args=(LocalModelStore(tmp_path),)) for _ in range(WRITERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(decided) == 1 and decided[0].state is GuardState.ROLLING_BACK
    assert observe_accuracy(store, "iris", "champion", guard_id, 21, 3) is None  # decided: no more counting

"""The batcher: grouping and timing, pure logic on a fake clock."""

from __future__ import annotations

import pytest

from inferq.worker.batcher import Batcher


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_items_are_grouped_by_key_in_arrival_order(clock: Clock) -> None:
    batcher: Batcher[str, int] = Batcher(max_batch_rows=10, max_wait_ms=2, clock=clock)
    for item, key in enumerate("abab"):
        batcher.add(key, item, rows=1)
    batches = {b.key: b.items for b in batcher.take_all()}
    assert batches == {"a": [0, 2], "b": [1, 3]}
    assert len(batcher) == 0


def test_a_batch_closes_when_the_next_item_would_overflow_it(clock: Clock) -> None:
    batcher: Batcher[str, str] = Batcher(max_batch_rows=4, max_wait_ms=2, clock=clock)
    batcher.add("m", "x", rows=3)
    batcher.add("m", "y", rows=2)
    assert batcher.due_in() == 0.0  # the first batch is full
    assert [(b.items, b.rows) for b in batcher.take_all()] == [(["x"], 3), (["y"], 2)]


def test_an_item_larger_than_a_batch_runs_alone(clock: Clock) -> None:
    batcher: Batcher[str, str] = Batcher(max_batch_rows=4, max_wait_ms=2, clock=clock)
    batcher.add("m", "huge", rows=50)
    batcher.add("m", "small", rows=1)
    assert [b.items for b in batcher.take_all()] == [["huge"], ["small"]]


def test_a_job_after_a_quiet_period_is_due_at_once(clock: Clock) -> None:
    batcher: Batcher[str, str] = Batcher(max_batch_rows=256, max_wait_ms=2, clock=clock)
    assert batcher.due_in() is None
    batcher.add("m", "first", rows=1)
    assert batcher.due_in() == 0.0


def test_a_sustained_stream_is_held_for_at_most_max_wait(clock: Clock) -> None:
    batcher: Batcher[str, str] = Batcher(max_batch_rows=256, max_wait_ms=2, clock=clock)
    batcher.add("m", "a", rows=1)
    batcher.take_all()
    clock.now += 0.0005
    batcher.add("m", "b", rows=1)
    assert batcher.due_in() == pytest.approx(0.0015)
    clock.now += 0.0015
    assert batcher.due_in() == 0.0


def test_a_full_batch_does_not_wait(clock: Clock) -> None:
    batcher: Batcher[str, int] = Batcher(max_batch_rows=3, max_wait_ms=1000, clock=clock)
    batcher.take_all()
    for i in range(3):
        batcher.add("m", i, rows=1)
    assert batcher.due_in() == 0.0


def test_with_no_wait_a_stream_is_due_at_once_and_what_arrived_together_is_one_batch(clock: Clock) -> None:
    batcher: Batcher[str, str] = Batcher(max_batch_rows=256, max_wait_ms=0, clock=clock)
    batcher.add("m", "a", rows=1)
    batcher.take_all()
    clock.now += 0.0001
    batcher.add("m", "b", rows=1)
    batcher.add("m", "c", rows=1)
    assert batcher.due_in() == 0.0
    assert [b.items for b in batcher.take_all()] == [["b", "c"]]

"""Micro-batching, pure logic and no I/O: items grouped by key into batches of bounded rows, and the
rule for *when* to take them.

The rule: take everything as soon as the stream pauses, unless the previous take was less than
``max_wait_ms`` ago, in which case hold the batches until then (or until one is full). So a job that
arrives alone runs at once, and a sustained stream is coalesced into fewer, larger batches, each job
waiting at most ``max_wait_ms``. With 0 (the worker's default) nothing waits: a batch is what arrived
together, or while the previous batch ran, which is how batches grow under load.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


@dataclass(slots=True)
class Batch(Generic[K, T]):
    """Items sharing one key, in arrival order."""

    key: K
    items: list[T] = field(default_factory=list)
    rows: int = 0


class Batcher(Generic[K, T]):
    """Groups items by key into batches of at most ``max_batch_rows`` rows (a single larger item
    forms a batch of its own) and says when they are due."""

    def __init__(self, max_batch_rows: int, max_wait_ms: float, clock: Callable[[], float]) -> None:
        self.max_batch_rows = max_batch_rows
        self.max_wait_s = max_wait_ms / 1000
        self._clock = clock
        self._open: dict[K, Batch[K, T]] = {}
        self._full: list[Batch[K, T]] = []
        self._last_take = float("-inf")

    def __len__(self) -> int:
        """Items waiting, in open and full batches."""
        return sum(len(b.items) for b in self._open.values()) + sum(len(b.items) for b in self._full)

    def add(self, key: K, item: T, rows: int) -> None:
        """Queue ``item``; closes the key's open batch first if the item would overflow it."""
        batch = self._open.get(key)
        if batch is not None and batch.rows + rows > self.max_batch_rows:
            self._full.append(self._open.pop(key))
            batch = None
        if batch is None:
            batch = self._open[key] = Batch(key)
        batch.items.append(item)
        batch.rows += rows
        if batch.rows >= self.max_batch_rows:
            self._full.append(self._open.pop(key))

    def due_in(self) -> float | None:
        """Seconds until the waiting batches are due (0: take them now), ``None`` when empty."""
        if self._full:
            return 0.0
        if not self._open:
            return None
        return max(0.0, self._last_take + self.max_wait_s - self._clock())

    def take_all(self) -> list[Batch[K, T]]:
        """Every batch, full ones first."""
        batches = self._full + list(self._open.values())
        self._full, self._open = [], {}
        self._last_take = self._clock()
        return batches

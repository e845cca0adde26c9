"""Deliveries that wait for something outside the worker, without being lost or stalling the acks.

A job whose model or stored result cannot be read now, and a result the broker refused to take, wait
the same way. The delivery is *held* in the ack window, so the deliveries after it are still acked; what
was being done for it is tried again after a delay (or at once, when what it waits for is back); a stop
hands it back to the queue (as a copy, which spends none of its delivery attempts); a lost connection
forgets it, because the broker redelivers every unacked delivery. One held longer than the broker lets a
delivery go unacked is handed back by the worker (see ``Worker._hand_back_overdue``), and is dropped
here when its turn comes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from inferq.worker.acks import AckWindow
from inferq.worker.consumer import Delivery

T = TypeVar("T")


class Loop(Protocol):
    """What waiting needs of the consumer: its timers, and whether a delivery may still be acked."""

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> object: ...
    def cancel_timer(self, handle: object) -> None: ...
    def is_current(self, delivery: Delivery) -> bool: ...


class Waiting(Generic[T]):
    """Held deliveries, each with the work to try again: ``retry(item)`` after ``delay_s()``
    (I/O thread only)."""

    def __init__(
        self,
        loop: Loop,
        acks: AckWindow[Delivery],
        retry: Callable[[T], None],
        delay_s: Callable[[], float],
        hand_back: Callable[[Delivery], None],
        stopping: Callable[[], bool],
    ) -> None:
        self._loop = loop
        self._acks = acks
        self._retry = retry
        self._delay_s = delay_s
        self._hand_back = hand_back
        self._stopping = stopping
        self._items: list[tuple[Delivery, T]] = []
        self._timer: object | None = None

    def __len__(self) -> int:
        """Deliveries held now."""
        return len(self._items)

    def add(self, delivery: Delivery, item: T) -> bool:
        """Hold ``delivery`` and try ``item`` again later (``True``). While stopping it is handed back at
        once; one of an earlier channel is left alone, since the broker redelivers it (``False``)."""
        if not self._loop.is_current(delivery):
            return False
        if self._stopping():
            self._hand_back(delivery)
            return False
        self._acks.hold(delivery.epoch, delivery.tag)
        self._items.append((delivery, item))
        if self._timer is None:
            self._timer = self._loop.call_later(self._delay_s(), self.retry_now)
        return True

    def retry_now(self) -> None:
        """Try every held item again (what they wait for is back, or the delay passed); while
        stopping, hand them back instead. One handed back meanwhile (held too long) is dropped."""
        self._cancel_timer()
        items, self._items = self._items, []
        for delivery, item in items:
            if not self._loop.is_current(delivery) or not self._acks.working(delivery.epoch, delivery.tag):
                continue
            if self._stopping():
                self._hand_back(delivery)
            else:
                self._acks.release(delivery.epoch, delivery.tag)
                self._retry(item)

    def hand_back(self) -> None:
        """Stopping: every held delivery goes back to the queue, for another worker to finish."""
        self._cancel_timer()
        items, self._items = self._items, []
        for delivery, _item in items:
            self._hand_back(delivery)

    def forget(self) -> None:
        """The connection was lost: the broker redelivers every unacked delivery, these included."""
        self._cancel_timer()
        self._items = []

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._loop.cancel_timer(self._timer)
            self._timer = None

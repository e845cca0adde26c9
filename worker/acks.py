"""Which deliveries may be acked, and how: pure logic, no I/O.

The broker's rules, in one place: a delivery tag means something only on the channel that delivered
it (a tag from an earlier connection is never acked: the broker redelivers those); one ``multiple`` ack
covers every outstanding tag up to it, so it may only be sent through a prefix of deliveries that are
all finished. A delivery *held* for a while (its model store is unreachable) must not stop the acks of
the deliveries after it: those are acked one by one until it is released.

A delivery the worker hands back itself is *handed over*: a copy of it is being published, and only the
copy's confirm decides what happens to it (acked once the copy is in its queue, nacked if the copy was
refused). Nothing else may finish it meanwhile, and nothing finishes a delivery twice: one tag is acked or
nacked once, or the broker closes the channel.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Acks:
    """What to send: one ``multiple`` ack through ``through`` (if set), then single acks of ``singles``."""

    through: int | None = None
    singles: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.through is not None or bool(self.singles)


class AckWindow(Generic[T]):
    """The deliveries of the current channel that are not acked yet, in delivery order, each with the
    item it was received with (the delivery itself, for the worker)."""

    def __init__(self) -> None:
        self.epoch = 0
        self._open: deque[int] = deque()
        self._items: dict[int, T] = {}
        self._finished: dict[int, bool] = {}
        self._held: set[int] = set()
        self._handing_over: set[int] = set()

    def __len__(self) -> int:
        """Deliveries received on this channel and not yet acked or handed back."""
        return len(self._open)

    def reset(self, epoch: int) -> None:
        """A new channel: every outstanding tag is dead (the broker redelivers those deliveries)."""
        self.epoch = epoch
        self._open.clear()
        self._items.clear()
        self._finished.clear()
        self._held.clear()
        self._handing_over.clear()

    def received(self, epoch: int, tag: int, item: T) -> None:
        """A delivery arrived (tags grow on one channel)."""
        if epoch == self.epoch:
            self._open.append(tag)
            self._items[tag] = item

    def finished(self, epoch: int, tag: int, ok: bool) -> bool:
        """A delivery is done: ``ok`` when it may be acked, ``False`` when it was handed back (nacked).
        Returns ``False`` when it must be left alone: a tag of an earlier channel, one finished already,
        or one being handed over (its copy's confirm finishes it, :meth:`handed_over`)."""
        if epoch != self.epoch or tag not in self._items or tag in self._finished or tag in self._handing_over:
            return False
        self._held.discard(tag)
        self._finished[tag] = ok
        return True

    def working(self, epoch: int, tag: int) -> bool:
        """True while the delivery is still this worker's to finish: current, not finished, not handed over."""
        return (
            epoch == self.epoch and tag in self._items and tag not in self._finished and tag not in self._handing_over
        )

    def hold(self, epoch: int, tag: int) -> None:
        """A delivery waits for something outside the worker; the ones after it are acked meanwhile."""
        if epoch == self.epoch:
            self._held.add(tag)

    def release(self, epoch: int, tag: int) -> None:
        """A held delivery is being worked on again."""
        if epoch == self.epoch and tag not in self._handing_over:
            self._held.discard(tag)

    def hand_over(self, epoch: int, tag: int) -> bool:
        """A copy of the delivery is about to be published: from now on only :meth:`handed_over` finishes
        it; the ones after it are acked meanwhile. ``False`` when it is not this worker's to hand back."""
        if not self.working(epoch, tag):
            return False
        self._handing_over.add(tag)
        self._held.add(tag)
        return True

    def handed_over(self, epoch: int, tag: int, ok: bool) -> bool:
        """The copy's confirm: ``ok`` (the copy is queued) acks the delivery; ``False`` returns it with a
        nack. Returns ``False`` when the tag is of an earlier channel and must be left alone."""
        if epoch != self.epoch or tag not in self._handing_over:
            return False
        self._handing_over.discard(tag)
        self._held.discard(tag)
        self._finished[tag] = ok
        return True

    def unacked(self) -> list[T]:
        """Every delivery of this channel not acked yet, finished or not (all of them return to their queue
        when the channel is lost)."""
        return [self._items[tag] for tag in self._open]

    def working_items(self) -> Iterator[T]:
        """The deliveries still being worked on, oldest first."""
        for tag in self._open:
            if tag not in self._finished and tag not in self._handing_over:
                yield self._items[tag]

    def take(self) -> Acks:
        """The acks that may be sent now; the deliveries they cover leave the window."""
        through = None
        while self._open and self._open[0] in self._finished:
            tag = self._open.popleft()
            del self._items[tag]
            if self._finished.pop(tag):
                through = tag
        if not self._open or self._open[0] not in self._held:
            return Acks(through)
        return Acks(through, self._take_behind_held())

    def _take_behind_held(self) -> list[int]:
        # A held delivery is first: finished ones after it, up to the first one still being worked
        # on, are acked singly (a multiple ack would take the held one with them).
        singles: list[int] = []
        kept: deque[int] = deque()
        for position, tag in enumerate(self._open):
            if tag in self._held:
                kept.append(tag)
            elif tag in self._finished:
                del self._items[tag]
                if self._finished.pop(tag):
                    singles.append(tag)
            else:
                kept.extend(list(self._open)[position:])
                break
        self._open = kept
        return singles

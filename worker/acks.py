"""Which deliveries may be acked, and how: pure logic, no I/O.

The broker's rules, in one place: a delivery tag means something only on the channel that delivered
it (a tag from an earlier connection is never acked: the broker redelivers those); one ``multiple`` ack
covers every outstanding tag up to it, so it may only be sent through a prefix of deliveries that are
all finished. A delivery *held* for a while (its model store is unreachable) must not stop the acks of
the deliveries after it: those are acked one by one until it is released.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Acks:
    """What to send: one ``multiple`` ack through ``through`` (if set), then single acks of ``singles``."""

    through: int | None = None
    singles: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.through is not None or bool(self.singles)


class AckWindow:
    """The deliveries of the current channel that are not acked yet, in delivery order."""

    def __init__(self) -> None:
        self.epoch = 0
        self._open: deque[int] = deque()
        self._finished: dict[int, bool] = {}
        self._held: set[int] = set()

    def __len__(self) -> int:
        """Deliveries received on this channel and not yet acked or handed back."""
        return len(self._open)

    def reset(self, epoch: int) -> None:
        """A new channel: every outstanding tag is dead (the broker redelivers those deliveries)."""
        self.epoch = epoch
        self._open.clear()
        self._finished.clear()
        self._held.clear()

    def received(self, epoch: int, tag: int) -> None:
        """A delivery arrived (tags grow on one channel)."""
        if epoch == self.epoch:
            self._open.append(tag)

    def finished(self, epoch: int, tag: int, ok: bool) -> bool:
        """A delivery is done: ``ok`` when it may be acked, ``False`` when it was handed back (nacked).
        Returns ``False`` for a tag of an earlier channel, which must be left alone."""
        if epoch != self.epoch:
            return False
        self._held.discard(tag)
        self._finished[tag] = ok
        return True

    def hold(self, epoch: int, tag: int) -> None:
        """A delivery waits for something outside the worker; the ones after it are acked meanwhile."""
        if epoch == self.epoch:
            self._held.add(tag)

    def release(self, epoch: int, tag: int) -> None:
        """A held delivery is being worked on again."""
        if epoch == self.epoch:
            self._held.discard(tag)

    def take(self) -> Acks:
        """The acks that may be sent now; the deliveries they cover leave the window."""
        through = None
        while self._open and self._open[0] in self._finished:
            tag = self._open.popleft()
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
                if self._finished.pop(tag):
                    singles.append(tag)
            else:
                kept.extend(list(self._open)[position:])
                break
        self._open = kept
        return singles

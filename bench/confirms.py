"""Publisher-confirm bookkeeping shared by the driver and the ideal pipeline (pure logic)."""

from __future__ import annotations


class Confirmed:
    """The highest publish sequence number up to which the broker confirmed every publish."""

    def __init__(self) -> None:
        self.through = 0
        self._early: set[int] = set()

    def add(self, tag: int, multiple: bool) -> int:
        """Record a ``basic.ack`` for ``tag`` (covering every lower tag too when ``multiple``); returns the
        new :attr:`through`."""
        if multiple:
            self.through = max(self.through, tag)
            self._early = {t for t in self._early if t > self.through}
        elif tag > self.through:
            self._early.add(tag)
        while self.through + 1 in self._early:
            self.through += 1
            self._early.discard(self.through)
        return self.through

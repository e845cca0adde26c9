"""Drain mode's rule for "the queue is empty and every job is done": pure logic, no I/O.

While consuming, whenever the worker is idle it asks the broker for the queue's depth. At zero it
cancels its consumer (deliveries sent before the cancel arrive before its confirmation, so none is
missed), finishes what it holds, and asks once more: jobs may have been requeued meanwhile (another
worker's, or ours). Zero again: done. Otherwise it consumes again and the cycle restarts. A new
channel (after a reconnect) always restarts the cycle, whatever step it was at.
"""

from __future__ import annotations

from enum import Enum, auto


class Step(Enum):
    """What the worker should do next, as the detector sees it."""

    WAIT = auto()
    """Nothing to do now; tick again later."""
    ASK_DEPTH = auto()
    """Ask the broker how many jobs are ready."""
    CANCEL = auto()
    """Stop consuming."""
    ASK_FINAL_DEPTH = auto()
    """Cancelled and idle: ask once more before stopping."""
    RESUME = auto()
    """Jobs appeared: consume again."""
    DONE = auto()
    """The queue is empty and nothing is in flight."""


class _Phase(Enum):
    CONSUMING = auto()
    ASKING = auto()
    CANCELLING = auto()
    CANCELLED = auto()
    FINAL_ASKING = auto()
    DONE = auto()


class DrainDetector:
    """Decides, from the worker's idleness and the broker's answers, when a drain is complete."""

    def __init__(self) -> None:
        self._phase = _Phase.CONSUMING

    @property
    def done(self) -> bool:
        """The drain completed."""
        return self._phase is _Phase.DONE

    def consuming(self) -> None:
        """A channel is consuming (the first, or one after a reconnect): start the cycle over."""
        if self._phase is not _Phase.DONE:
            self._phase = _Phase.CONSUMING

    def tick(self, idle: bool) -> Step:
        """Periodic check while consuming."""
        if self._phase is _Phase.CONSUMING and idle:
            self._phase = _Phase.ASKING
            return Step.ASK_DEPTH
        return Step.WAIT

    def depth(self, ready_jobs: int, idle: bool) -> Step:
        """The broker answered :attr:`Step.ASK_DEPTH` or :attr:`Step.ASK_FINAL_DEPTH`."""
        if self._phase is _Phase.ASKING:
            if ready_jobs == 0 and idle:
                self._phase = _Phase.CANCELLING
                return Step.CANCEL
            self._phase = _Phase.CONSUMING
            return Step.WAIT
        if self._phase is _Phase.FINAL_ASKING:
            if ready_jobs == 0:
                self._phase = _Phase.DONE
                return Step.DONE
            self._phase = _Phase.CONSUMING
            return Step.RESUME
        return Step.WAIT  # an answer from before a reconnect

    def cancelled(self) -> None:
        """The broker confirmed the cancel."""
        if self._phase is _Phase.CANCELLING:
            self._phase = _Phase.CANCELLED

    def settled(self, idle: bool) -> Step:
        """Work finished; after a cancel, the last in-flight job's ack is the moment to look again."""
        if self._phase is _Phase.CANCELLED and idle:
            self._phase = _Phase.FINAL_ASKING
            return Step.ASK_FINAL_DEPTH
        return Step.WAIT

"""Drain mode's rule for "the queue is empty and every job is done" (:class:`DrainDetector`, pure logic,
no I/O) and the loop that drives it on the worker's I/O thread (:class:`DrainLoop`).

While consuming, whenever the worker is idle it asks the broker for the queue's depth. At zero it
cancels its consumer (deliveries sent before the cancel arrive before its confirmation, so none is
missed), finishes what it holds, and asks once more: jobs may have been requeued meanwhile (another
worker's, or ours). Zero again, and nothing handed back to a queue during the cycle: done. Otherwise
it consumes again and the cycle restarts. A new channel (after a reconnect) always restarts the
cycle, whatever step it was at.

NOTE: the broker counts a message handed back to a queue as ready only a moment later. A job the
worker quarantined or requeued, or a delivery that crossed the cancel on the wire (the client
library returns those by itself), may be missing from the final count: a cycle in which anything
was handed back is never the last one, and the next cycle consumes it.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum, auto
from typing import Protocol

from inferq.shared.config.logging import get_logger

log = get_logger(__name__)


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
        self._handed_back = 0  # the broker side's count when this cycle began

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

    def depth(self, ready_jobs: int, idle: bool, handed_back: int = 0) -> Step:
        """The broker answered :attr:`Step.ASK_DEPTH` or :attr:`Step.ASK_FINAL_DEPTH`; ``handed_back``
        counts the deliveries this worker has handed back to a queue so far."""
        if self._phase is _Phase.ASKING:
            if ready_jobs == 0 and idle:
                self._phase = _Phase.CANCELLING
                return Step.CANCEL
            self._phase = _Phase.CONSUMING
            return Step.WAIT
        if self._phase is _Phase.FINAL_ASKING:
            if ready_jobs == 0 and handed_back == self._handed_back:
                self._phase = _Phase.DONE
                return Step.DONE
            self._handed_back = handed_back
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


class DrainBroker(Protocol):
    """What drain mode asks of the broker side (the worker's consumer)."""

    @property
    def ready(self) -> bool:
        """Consuming on an open channel."""

    @property
    def handed_back(self) -> int:
        """Deliveries handed back to a queue so far (quarantined, requeued, or returned after a cancel)."""

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> object:
        """Run ``callback`` on the I/O thread after ``delay_s``."""

    def queue_depth(self, on_count: Callable[[int], None]) -> None:
        """Ask how many jobs are ready."""

    def cancel(self, on_cancelled: Callable[[], None]) -> None:
        """Stop consuming."""

    def resume(self) -> None:
        """Consume again."""

    def stop(self) -> None:
        """Close and leave the I/O loop."""


class DrainLoop:
    """Drives a :class:`DrainDetector` on the I/O thread: ticks, broker questions, cancel and resume."""

    def __init__(self, broker: DrainBroker, poll_s: float, idle: Callable[[], bool], stopping: Callable[[], bool]):
        self.detector = DrainDetector()
        self._broker = broker
        self._poll_s = poll_s
        self._idle = idle
        self._stopping = stopping

    def consuming(self) -> None:
        """A channel consumes: start (over) ticking."""
        self.detector.consuming()
        self._broker.call_later(self._poll_s, self._tick)

    def settled(self) -> None:
        """The worker became idle: perhaps the moment of the final check."""
        self._step(self.detector.settled(self._idle()))

    def _tick(self) -> None:
        if not self._stopping() and self._broker.ready:
            self._step(self.detector.tick(self._idle()))

    def _step(self, step: Step) -> None:
        if step is Step.WAIT and self._broker.ready:
            self._broker.call_later(self._poll_s, self._tick)
        elif step in (Step.ASK_DEPTH, Step.ASK_FINAL_DEPTH):
            self._broker.queue_depth(self._answered)
        elif step is Step.CANCEL:
            self._broker.cancel(self._cancelled)
        elif step is Step.RESUME:
            self._broker.resume()
        elif step is Step.DONE:
            log.info("queue_drained")
            self._broker.stop()

    def _answered(self, ready_jobs: int) -> None:
        self._step(self.detector.depth(ready_jobs, self._idle(), self._broker.handed_back))

    def _cancelled(self) -> None:
        self.detector.cancelled()
        self.settled()

"""Result publishes, and what happens when the broker refuses one.

A refusal (a nack: the results queue has no leader for a moment after its node died, or the broker is
short of disk) says nothing about the job: its result is already stored. Handing the job back to the
queue would spend one of its delivery attempts per refusal, and a few refusals in a row would
dead-letter a job whose result is stored. So the delivery is *held* (the deliveries after it are still
acked) and only the publish is repeated, with capped backoff, until the broker confirms it, the
connection is lost (the broker redelivers the job, and its stored result goes out then) or the worker
stops (the job is handed back as a copy, which spends none of its delivery attempts either).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from inferq.shared.broker.amqp import Backoff
from inferq.shared.config.logging import get_logger
from inferq.worker.acks import AckWindow
from inferq.worker.consumer import Consumer, Delivery
from inferq.worker.waiting import Waiting

log = get_logger(__name__)

REPUBLISH_MAX_S = 5.0
"""Longest wait between two attempts to publish refused results."""


@dataclass(slots=True, eq=False)
class ResultMessage:
    """A stored result's notification, encoded: what is published for ``delivery`` (read-only by
    convention: one is made per job, and a frozen dataclass costs more to build)."""

    delivery: Delivery
    job_id: str
    body: bytes
    routing_key: str


class ResultPublisher:
    """Publishes results with confirms; a refused one waits and is published again (I/O thread only)."""

    def __init__(
        self,
        consumer: Consumer,
        acks: AckWindow[Delivery],
        finished: Callable[[Delivery, bool], None],
        hand_back: Callable[[Delivery], None],
        stopping: Callable[[], bool],
        on_refused: Callable[[], None],
    ) -> None:
        self._consumer = consumer
        self._finished = finished
        self._on_refused = on_refused
        self._backoff = Backoff(base_s=0.2, cap_s=REPUBLISH_MAX_S)
        self._refused: Waiting[ResultMessage] = Waiting(
            consumer, acks, self.publish, self._next_try_s, hand_back, stopping
        )

    def publish(self, message: ResultMessage) -> None:
        """Publish ``message``; its delivery is finished once the broker confirms it."""
        self._consumer.publish_result(
            message.delivery,
            message.job_id,
            message.body,
            partial(self._confirmed, message),
            routing_key=message.routing_key,
        )

    def _confirmed(self, message: ResultMessage, ok: bool) -> None:
        if ok:
            self._backoff.reset()
            self._finished(message.delivery, True)
            return
        if self._refused.add(message.delivery, message):  # not when its channel is gone, or stopping
            self._on_refused()

    def _next_try_s(self) -> float:
        delay_s = self._backoff.next_delay()
        log.warning("result_publish_refused", refused=len(self._refused) + 1, retry_in_s=round(delay_s, 3))
        return delay_s

    def hand_back(self) -> None:
        """Stopping: the jobs of refused results go back to the queue (their results are stored, and
        whoever takes them again publishes those)."""
        self._refused.hand_back()

    def forget(self) -> None:
        """The connection was lost: the broker redelivers every unacked job, these included."""
        self._refused.forget()

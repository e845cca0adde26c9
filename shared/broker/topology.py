"""Queue names and arguments, declared in one place, the same way by producer and worker.

The jobs queue is a durable quorum queue: replicated, with a delivery limit that dead-letters a job
redelivered too often (a poison job), and a length bound that makes the broker *refuse* publishes
(``reject-publish``) instead of dropping jobs when it is full.

Results go to a durable topic exchange, routing key ``<model>.<status>``: each consumer binds the queue
it needs. The result store is the record; a result message is a notification. The default results
queue is bound to every key but bounded in length and age, dropping its oldest notification when full,
so that nobody consuming it never fills the broker's disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from inferq.shared.config.settings import InferqSettings
from inferq.shared.contract.messages import Status

REASON_HEADER = "x-inferq-reason"
"""Header naming why a message was dead-lettered by inferq itself."""
RESENT_HEADER = "x-inferq-resent"
"""Set by a producer on a job it publishes again because the first publish was never confirmed: the
job may already be queued, so the worker looks for a stored result first."""


ALL_RESULTS = "#"

QUORUM_GROUP_SIZE = 3
"""Replicas of each queue: a quorum queue keeps working while a majority of them is up, so three
survive the loss of any one node. On a cluster of fewer nodes the broker places a replica on each
(min(3, nodes)); nodes added later do not receive replicas by themselves (``rabbitmq-queues grow``)."""
REPLICATED: dict[str, Any] = {"x-queue-type": "quorum", "x-quorum-initial-group-size": QUORUM_GROUP_SIZE}
"""The arguments of every durable queue inferq owns."""
"""The binding key of a queue that takes every result notification."""


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """A queue, the arguments it must be declared with, and the topic exchanges it is bound to
    (with key ``#``: everything)."""

    name: str
    arguments: dict[str, Any]
    bound_to: tuple[str, ...] = ()


class _Routable(Protocol):
    @property
    def model(self) -> str | None: ...
    @property
    def status(self) -> Status: ...


def result_routing_key(result: _Routable) -> str:
    """``<model>.<status>`` (``unknown`` for a message whose model could not be read)."""
    return f"{result.model or 'unknown'}.{result.status.value}"


def jobs_queue(settings: InferqSettings) -> QueueSpec:
    """The jobs queue: quorum, bounded, dead-lettering to ``<jobs>.dlq`` after the delivery limit."""
    return QueueSpec(
        settings.jobs_queue,
        {
            **REPLICATED,
            "x-delivery-limit": settings.max_deliveries,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": settings.dlq_queue,
            "x-max-length": settings.max_queue_length,
            "x-overflow": "reject-publish",
        },
    )


def retry_queue(settings: InferqSettings) -> QueueSpec:
    """Suspects: jobs that were delivered before (their worker may have crashed on them). Workers take
    them one at a time, alone, so that a poison job only ever takes itself down; after the delivery
    limit it is dead-lettered."""
    return QueueSpec(
        f"{settings.jobs_queue}.retry",
        {
            **REPLICATED,
            "x-delivery-limit": settings.max_deliveries,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": settings.dlq_queue,
        },
    )


def dlq_queue(settings: InferqSettings) -> QueueSpec:
    """Dead letters: kept until an operator looks at them."""
    return QueueSpec(settings.dlq_queue, dict(REPLICATED))


def results_queue(settings: InferqSettings) -> QueueSpec:
    """Result notifications for downstream consumers, bound to the results exchange; the result store
    stays the source of truth. Bounded in length and age: when full, the oldest notification goes."""
    return QueueSpec(
        settings.results_queue,
        {
            **REPLICATED,
            "x-max-length": settings.results_max_length,
            "x-message-ttl": settings.results_max_age_s * 1000,
            "x-overflow": "drop-head",
        },
        bound_to=(settings.results_exchange_name,),
    )


def all_queues(settings: InferqSettings) -> list[QueueSpec]:
    """Every queue inferq owns, in declaration order."""
    return [dlq_queue(settings), jobs_queue(settings), retry_queue(settings), results_queue(settings)]

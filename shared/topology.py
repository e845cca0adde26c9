"""Queue names and arguments, declared in one place, the same way by producer and worker.

The jobs queue is a durable quorum queue: replicated, with a delivery limit that dead-letters a job
redelivered too often (a poison job), and a length bound that makes the broker *refuse* publishes
(``reject-publish``) instead of dropping jobs when it is full.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.settings import InferqSettings

REASON_HEADER = "x-inferq-reason"
"""Header naming why a message was dead-lettered by inferq itself."""
RESENT_HEADER = "x-inferq-resent"
"""Set by a producer on a job it publishes again because the first publish was never confirmed: the
job may already be queued, so the worker looks for a stored result first."""


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """A queue and the arguments it must be declared with."""

    name: str
    arguments: dict[str, Any]


def jobs_queue(settings: InferqSettings) -> QueueSpec:
    """The jobs queue: quorum, bounded, dead-lettering to ``<jobs>.dlq`` after the delivery limit."""
    return QueueSpec(
        settings.jobs_queue,
        {
            "x-queue-type": "quorum",
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
            "x-queue-type": "quorum",
            "x-delivery-limit": settings.max_deliveries,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": settings.dlq_queue,
        },
    )


def dlq_queue(settings: InferqSettings) -> QueueSpec:
    """Dead letters: kept until an operator looks at them."""
    return QueueSpec(settings.dlq_queue, {"x-queue-type": "quorum"})


def results_queue(settings: InferqSettings) -> QueueSpec:
    """Results for downstream consumers; the result store stays the source of truth."""
    return QueueSpec(settings.results_queue, {"x-queue-type": "quorum"})


def all_queues(settings: InferqSettings) -> list[QueueSpec]:
    """Every queue inferq owns, in declaration order."""
    return [dlq_queue(settings), jobs_queue(settings), retry_queue(settings), results_queue(settings)]

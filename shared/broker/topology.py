"""Queue names and arguments, declared in one place, the same way by producer and worker.

The jobs queue is a durable quorum queue: replicated, with a delivery limit that dead-letters a job
redelivered too often (a poison job), and a length bound that makes the broker *refuse* publishes
(``reject-publish``) instead of dropping jobs when it is full.

Dead letters go to a durable topic exchange named like the dead-letter queue (``<jobs>.dlq``: exchanges
and queues have separate names), which routes them to that queue and to whoever listens (the HTTP API and
``backfill --out`` learn there that a job of theirs will have no result). The broker dead-letters
*at least once* (``x-dead-letter-strategy``): a job that reaches its delivery limit while the dead-letter
queue has no leader stays in its queue until it can be moved, where ``at-most-once`` would drop it. The
broker accepts that strategy only on a queue that refuses publishes when full (``reject-publish``).

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
UNKNOWN_REASON = "unknown"
"""The reason of a dead letter whose headers say none."""
RESENT_HEADER = "x-inferq-resent"
"""Set by a producer on a job it publishes again because the first publish was never confirmed: the
job may already be queued, so the worker looks for a stored result first. A worker sets it too on a job it
hands back as a copy (see ``COPY_HEADER``)."""
COPY_HEADER = "x-inferq-copy"
"""How many times a worker put a copy of this job back in a queue instead of returning the delivery (a
copy's delivery count starts over, so handing a job back spends none of its delivery attempts)."""


ALL_RESULTS = "#"
"""The binding key of a queue that takes every message of a topic exchange (every result, every dead letter)."""

QUORUM_GROUP_SIZE = 3
"""Replicas of each queue: a quorum queue keeps working while a majority of them is up, so three
survive the loss of any one node. On a cluster of fewer nodes the broker places a replica on each
(min(3, nodes)); nodes added later do not receive replicas by themselves (``rabbitmq-queues grow``)."""
REPLICATED: dict[str, Any] = {"x-queue-type": "quorum", "x-quorum-initial-group-size": QUORUM_GROUP_SIZE}
"""The arguments of every durable queue inferq owns."""


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


def dead_letters_exchange(settings: InferqSettings) -> str:
    """The topic exchange every dead letter goes through (the broker's and the worker's own): it routes
    to the dead-letter queue and to any listener bound with ``#``."""
    return settings.dlq_queue


def death_of(headers: dict[str, Any]) -> tuple[str, str | None]:
    """Why a message was dead-lettered, and from which queue when the broker says: inferq's own header
    (the worker's) first, then the broker's ``x-death`` (``delivery_limit`` for a job redelivered too often,
    ``expired``, ``rejected``), then its ``x-first-death-*`` headers; ``unknown`` when none says."""
    if REASON_HEADER in headers:
        return _text(headers[REASON_HEADER]), None
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        queue = deaths[0].get("queue")
        return _text(deaths[0].get("reason", UNKNOWN_REASON)), None if queue is None else _text(queue)
    if "x-first-death-reason" in headers:
        queue = headers.get("x-first-death-queue")
        return _text(headers["x-first-death-reason"]), None if queue is None else _text(queue)
    return UNKNOWN_REASON, None


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _dead_lettering(settings: InferqSettings) -> dict[str, Any]:
    # NOTE: RabbitMQ takes at-least-once dead-lettering only together with reject-publish; without it the
    # declaration is refused. No dead-letter routing key: the exchange routes on ``#``.
    return {
        "x-delivery-limit": settings.max_deliveries,
        "x-dead-letter-exchange": dead_letters_exchange(settings),
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def jobs_queue(settings: InferqSettings) -> QueueSpec:
    """The jobs queue: quorum, bounded, dead-lettering (at least once) to ``<jobs>.dlq`` after the
    delivery limit."""
    return QueueSpec(
        settings.jobs_queue,
        {**REPLICATED, **_dead_lettering(settings), "x-max-length": settings.max_queue_length},
    )


def retry_queue(settings: InferqSettings) -> QueueSpec:
    """Suspects: jobs that were delivered before (their worker may have crashed on them). Workers take
    them one at a time, alone, so that a poison job only ever takes itself down; after the delivery
    limit it is dead-lettered."""
    return QueueSpec(f"{settings.jobs_queue}.retry", {**REPLICATED, **_dead_lettering(settings)})


def dlq_queue(settings: InferqSettings) -> QueueSpec:
    """Dead letters: kept until an operator looks at them; bound to the dead-letters exchange."""
    return QueueSpec(settings.dlq_queue, dict(REPLICATED), bound_to=(dead_letters_exchange(settings),))


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


def returns_exchange(settings: InferqSettings) -> str:
    """The fanout exchange on which workers tell each other of deliveries returned to the queue through no
    fault of the job (a lost connection, a channel the broker closed): ``<jobs>.returns``. Each worker
    listens on a private queue of its own, deleted with its connection."""
    return f"{settings.jobs_queue}.returns"


def all_queues(settings: InferqSettings) -> list[QueueSpec]:
    """Every queue inferq owns, in declaration order (the dead-letter queue first: declaring it declares
    the exchange the others dead-letter to)."""
    return [dlq_queue(settings), jobs_queue(settings), retry_queue(settings), results_queue(settings)]


def all_exchanges(settings: InferqSettings) -> list[str]:
    """Every exchange inferq owns (declared with the queues bound to them; the returns exchange by the
    workers)."""
    return [dead_letters_exchange(settings), settings.results_exchange_name, returns_exchange(settings)]

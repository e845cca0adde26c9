"""The dead-letter queue, for operators: look at what is there and why, and replay it.

Listing takes messages with ``basic.get`` *without* acking them and hands every one back at the end,
so a look changes nothing but the DLQ's delivery counts. Replaying republishes a message to the jobs
queue with publisher confirms and acks (removes) the dead letter only once the broker confirmed the
new copy: a crash between the two leaves a duplicate job, never a lost one, and the worker's result
store turns the duplicate into a republish of the stored result.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import orjson
import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import BasicProperties

from inferq.shared.broker.amqp import PUBLISHED_MS_HEADER, forwarded_properties
from inferq.shared.broker.connection import open_blocking
from inferq.shared.broker.topology import REASON_HEADER
from inferq.shared.config.settings import OperatorSettings
from inferq.shared.errors import BrokerUnavailable, DeadLetterNotFound, PublishError

REPLAYED_HEADER = "x-inferq-replayed"
"""How many times an operator replayed this job from the dead-letter queue."""

# Headers that describe the *previous* life of a message; a replayed job starts a fresh one.
_DEATH_HEADERS = frozenset(
    {
        REASON_HEADER,
        "x-death",
        "x-delivery-count",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
    }
)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One message in the dead-letter queue and why it is there."""

    message_id: str | None
    reason: str
    source_queue: str | None
    size_bytes: int
    model: str | None


def _reason(headers: dict[str, Any]) -> tuple[str, str | None]:
    """Why the message was dead-lettered, and from which queue: inferq's own header first, then the
    broker's ``x-death`` (e.g. ``delivery_limit`` for a job redelivered too often)."""
    if REASON_HEADER in headers:
        return _text(headers[REASON_HEADER]), None
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        death = deaths[0]
        queue = death.get("queue")
        return _text(death.get("reason", "unknown")), None if queue is None else _text(queue)
    if "x-first-death-reason" in headers:
        queue = headers.get("x-first-death-queue")
        return _text(headers["x-first-death-reason"]), None if queue is None else _text(queue)
    return "unknown", None


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _body_field(body: bytes, name: str) -> str | None:
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    field = value.get(name) if isinstance(value, dict) else None
    return field if isinstance(field, str) and field else None


def describe(properties: BasicProperties, body: bytes) -> DeadLetter:
    """What an operator needs to know about one dead letter; its id from the AMQP message id or, failing
    that, from the body."""
    reason, source = _reason(dict(properties.headers or {}))
    message_id = properties.message_id or _body_field(body, "id")
    return DeadLetter(message_id, reason, source, len(body), _body_field(body, "model"))


@contextmanager
def _dlq_channel(settings: OperatorSettings, name: str) -> Iterator[tuple[BlockingChannel, int]]:
    """A channel on which every message taken and not acked goes back to the DLQ at exit, and the
    number of messages the DLQ held at the start (a bound, so replays dead-lettered again meanwhile
    are never taken twice in one run)."""
    connection = open_blocking(settings, name)
    try:
        channel = connection.channel()
        try:
            frame = channel.queue_declare(settings.dlq_queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                raise DeadLetterNotFound(f"there is no dead-letter queue {settings.dlq_queue!r}") from None
            raise
        yield channel, int(frame.method.message_count)
        if channel.is_open:
            channel.basic_nack(0, multiple=True, requeue=True)  # everything not replayed goes back
    except pika.exceptions.AMQPConnectionError as exc:
        raise BrokerUnavailable(f"lost the broker: {type(exc).__name__}: {exc}") from None
    finally:
        if connection.is_open:
            connection.close()  # unacked messages return to the queue in any case


def _taken(channel: BlockingChannel, queue: str, bound: int) -> Iterator[tuple[int, BasicProperties, bytes]]:
    for _ in range(bound):
        method, properties, body = channel.basic_get(queue, auto_ack=False)
        if method is None:
            return
        yield method.delivery_tag, properties, body


def list_dead_letters(settings: OperatorSettings, limit: int) -> tuple[list[DeadLetter], int]:
    """Up to ``limit`` dead letters, oldest first, and how many the DLQ holds in all. Nothing is removed."""
    with _dlq_channel(settings, "inferq-dlq-list") as (channel, total):
        letters = [describe(p, b) for _tag, p, b in _taken(channel, settings.dlq_queue, min(limit, total))]
    return letters, total


def replay(
    settings: OperatorSettings,
    *,
    job_id: str | None = None,
    on_replayed: Callable[[DeadLetter], None] = lambda _letter: None,
) -> list[DeadLetter]:
    """Republish dead letters to the jobs queue, each removed from the DLQ only once its copy is
    confirmed: the one with ``job_id``, or all of them when it is ``None``."""
    replayed: list[DeadLetter] = []
    with _dlq_channel(settings, "inferq-dlq-replay") as (channel, total):
        channel.confirm_delivery()
        for tag, properties, body in _taken(channel, settings.dlq_queue, total):
            letter = describe(properties, body)
            if job_id is not None and letter.message_id != job_id:
                continue  # held unacked until the end, then handed back
            _republish(channel, settings.jobs_queue, properties, body)
            channel.basic_ack(tag)
            replayed.append(letter)
            on_replayed(letter)
            if job_id is not None:
                break
    if job_id is not None and not replayed:
        raise DeadLetterNotFound(f"no dead-lettered job with id {job_id!r} in {settings.dlq_queue!r}")
    return replayed


def _republish(channel: BlockingChannel, jobs_queue: str, original: BasicProperties, body: bytes) -> None:
    headers = {k: v for k, v in (original.headers or {}).items() if k not in _DEATH_HEADERS}
    headers[REPLAYED_HEADER] = int(headers.get(REPLAYED_HEADER, 0)) + 1
    headers[PUBLISHED_MS_HEADER] = int(time.time() * 1000)  # its latency starts again now
    properties = forwarded_properties(original, headers)
    try:
        channel.basic_publish("", jobs_queue, body, properties, mandatory=True)
    except pika.exceptions.UnroutableError:
        raise PublishError(f"job {original.message_id!r} not replayed: no queue {jobs_queue!r}") from None
    except pika.exceptions.NackError:
        raise PublishError(
            f"job {original.message_id!r} not replayed: {jobs_queue!r} refused it (full?); it stays in the DLQ"
        ) from None

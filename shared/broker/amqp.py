"""pika plumbing both sides share: URLs, backoff, publisher-confirm tracking and queue declaration."""

from __future__ import annotations

import itertools
import random
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import pika
import pika.exceptions
from pika.channel import Channel

from inferq.shared.broker.frames import PublishFrames
from inferq.shared.broker.topology import ALL_RESULTS, QueueSpec, all_exchanges, all_queues
from inferq.shared.errors import BrokerRefused

if TYPE_CHECKING:
    from pika.adapters.blocking_connection import BlockingChannel

    from inferq.shared.config.settings import InferqSettings

PRECONDITION_FAILED = 406
CONTENT_TYPE = "application/json"
PERSISTENT = pika.DeliveryMode.Persistent
PUBLISHED_MS_HEADER = "x-inferq-published-ms"
"""Milliseconds since the epoch when the producer published the job, for the result's ``queue_ms``."""


def redacted_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname or ''}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


MAX_BACKOFF_EXPONENT = 60
"""``2**60`` times any sane base is far past any cap; a larger exponent would only overflow a float."""


@dataclass(slots=True)
class Backoff:
    """Capped exponential backoff with jitter (between half and all of the capped delay)."""

    base_s: float = 0.2
    cap_s: float = 10.0
    attempt: int = 0

    def next_delay(self) -> float:
        """The delay before the next attempt; never above ``cap_s``, whatever the attempt count."""
        # NOTE: `2**attempt` is an int; past ~1,000 attempts the product no longer fits a float
        # (OverflowError). Clamp the exponent instead of the result.
        delay = min(self.cap_s, self.base_s * 2.0 ** min(self.attempt, MAX_BACKOFF_EXPONENT))
        self.attempt += 1
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        """Start again from the base delay after a success."""
        self.attempt = 0


ConfirmCallback = Callable[[bool], None]
"""Called with ``True`` when the broker confirmed a publish, ``False`` when it refused it."""


class ConfirmTracker:
    """Publisher confirms for one channel: maps delivery tags to callbacks, handles ``multiple`` acks,
    and reports a message the broker returned as unroutable as refused."""

    def __init__(self, channel: Channel, on_streak: Callable[[int, float], None] | None = None) -> None:
        self._channel = channel
        self._on_streak = on_streak
        self.nack_streak = 0
        """Publishes refused in a row since the last one confirmed."""
        self._streak_since: float | None = None  # when the first of them was refused (monotonic)
        self._next_tag = 1
        self._pending: OrderedDict[int, tuple[str | None, ConfirmCallback, float]] = OrderedDict()
        self._returned: set[str] = set()
        self._frames: PublishFrames | None = None
        self._unsent: list[bytes] = []  # publish_json's frames, written together at the end of the loop pass
        channel.confirm_delivery(ack_nack_callback=self._on_confirm)
        channel.add_on_return_callback(self._on_return)

    def __len__(self) -> int:
        """Publishes not yet confirmed."""
        return len(self._pending)

    def publish(
        self,
        routing_key: str,
        body: bytes,
        properties: pika.BasicProperties,
        on_confirm: ConfirmCallback,
        *,
        mandatory: bool = True,
        exchange: str = "",
    ) -> None:
        """Publish (on the default exchange unless told otherwise); ``on_confirm`` runs once the broker
        answers (with ``False``, from the I/O loop, when pika could not even send it, e.g. on a connection
        that is closing)."""
        self._write_unsent()  # NOTE: the broker numbers publishes in the order it reads them
        try:
            self._channel.basic_publish(exchange, routing_key, body, properties, mandatory=mandatory)
        except pika.exceptions.AMQPError:
            # NOTE: it never reached the broker, so it takes no delivery tag (that would shift every
            # later confirm onto the wrong message), and it is answered later, never inside the caller.
            self._channel.connection.ioloop.call_later(0, partial(on_confirm, False))
            return
        tag = self._next_tag
        self._next_tag += 1
        self._pending[tag] = (properties.message_id if mandatory else None, on_confirm, time.monotonic())

    def publish_json(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        message_id: str,
        correlation_id: str | None,
        on_confirm: ConfirmCallback,
    ) -> None:
        """What :meth:`publish` does for a persistent JSON message that is not mandatory (a result), in
        a fraction of the time: the frames are packed by :class:`PublishFrames`, not by pika, and those of
        every such publish of one pass of the I/O loop leave in one write (one system call, not one per
        message)."""
        channel = self._channel
        connection = channel.connection
        try:
            if not channel.is_open or connection.is_closed:
                raise pika.exceptions.ChannelWrongStateError("Channel is closed.")
            if self._frames is None:
                # NOTE: pika's own limit for a body frame on this connection, set once the broker tuned it.
                self._frames = PublishFrames(channel.channel_number, CONTENT_TYPE, connection._body_max_length)
            data = self._frames.encode(exchange, routing_key, body, message_id, correlation_id)
        except pika.exceptions.AMQPError:
            connection.ioloop.call_later(0, partial(on_confirm, False))  # as in publish: never a tag
            return
        if not self._unsent:
            connection.ioloop.call_later(0, self._write_unsent)
        self._unsent.append(data)
        tag = self._next_tag
        self._next_tag += 1
        self._pending[tag] = (None, on_confirm, time.monotonic())

    def _write_unsent(self) -> None:
        if not self._unsent:
            return
        data = b"".join(self._unsent)
        self._unsent.clear()
        channel = self._channel
        # NOTE: frames for a channel that is closing would make the broker close the whole connection.
        # Not sent, they are answered as refused once the channel is closed (fail_all).
        if channel.is_open and not channel.connection.is_closed:
            channel.connection._output_marshaled_frames((data,))

    def _on_return(self, _channel: Channel, _method: Any, properties: pika.BasicProperties, _body: bytes) -> None:
        # NOTE: basic.return always arrives before the basic.ack of the same message.
        if properties.message_id:
            self._returned.add(properties.message_id)

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        acked = isinstance(method, pika.spec.Basic.Ack)
        tags = [method.delivery_tag]
        if method.multiple:
            # Pending tags are in publish order: stop at the first one above the ack, instead of
            # scanning every publish in flight on each of the broker's many acks.
            tags = list(itertools.takewhile(lambda t: t <= method.delivery_tag, self._pending))
        answers = []
        for tag in tags:
            entry = self._pending.pop(tag, None)
            if entry is None:
                continue
            message_id, callback, _sent_at = entry
            returned = message_id is not None and message_id in self._returned
            if returned:
                self._returned.discard(message_id)
            answers.append((callback, acked and not returned))
        if acked:
            self.nack_streak, self._streak_since = 0, None
        else:
            self.nack_streak += len(answers)
            self._streak_since = self._streak_since or time.monotonic()
        # Told before the callbacks run, so that a session being replaced takes no more publishes.
        if self._on_streak is not None:
            since = self._streak_since
            self._on_streak(self.nack_streak, 0.0 if since is None else time.monotonic() - since)
        _answer_all(answers)

    def fail_all(self) -> None:
        """The channel is gone: every unconfirmed publish counts as refused."""
        self._unsent.clear()
        pending, self._pending = self._pending, OrderedDict()
        _answer_all([(callback, False) for _message_id, callback, _sent_at in pending.values()])

    def oldest_wait_s(self) -> float:
        """How long the oldest unconfirmed publish has waited for the broker's answer (0 if none)."""
        for _message_id, _callback, sent_at in self._pending.values():
            return time.monotonic() - sent_at
        return 0.0


def _answer_all(answers: list[tuple[ConfirmCallback, bool]]) -> None:
    """Run every callback even if one raises: a publish taken off the pending list and never answered
    would be lost without a trace. The first error is raised once all have run."""
    first: Exception | None = None
    for callback, ok in answers:
        try:
            callback(ok)
        except Exception as exc:
            first = first or exc
    if first is not None:
        raise first


def forwarded_properties(original: pika.BasicProperties, headers: dict[str, Any]) -> pika.BasicProperties:
    """Properties for a message moved to another queue unchanged: its identity, persistent, and
    ``headers``."""
    return pika.BasicProperties(
        content_type=original.content_type,
        delivery_mode=PERSISTENT,
        message_id=original.message_id,
        correlation_id=original.correlation_id,
        reply_to=original.reply_to,
        headers=headers,
    )


_INEQUIVALENT = re.compile(
    r"inequivalent arg '(?P<argument>[^']+)' for queue '(?P<queue>[^']+)' in vhost '(?P<vhost>[^']*)': (?P<detail>.*)"
)
DEAD_LETTERING_ARGUMENTS = frozenset(
    {"x-dead-letter-exchange", "x-dead-letter-routing-key", "x-dead-letter-strategy", "x-overflow"}
)
"""The arguments that changed when the jobs and retry queues moved to at-least-once dead-lettering through
the dead-letters exchange (they used to dead-letter to exchange ``""`` with a routing key, without a
strategy, and the retry queue had no ``x-overflow``)."""
RETRY_SUFFIX = ".retry"


def topology_error(reason: BaseException) -> BrokerRefused | None:
    """A channel closed because a queue exists with other arguments: a configuration error that no
    retry will fix, told with the way out (returns ``None`` for any other reason)."""
    if not (isinstance(reason, pika.exceptions.ChannelClosedByBroker) and reason.reply_code == PRECONDITION_FAILED):
        return None
    found = _INEQUIVALENT.search(reason.reply_text)
    if found is None:
        return BrokerRefused(f"the broker refused our declaration of the topology ({reason.reply_text})")
    queue, argument, detail = found["queue"], found["argument"], found["detail"]
    where = f"queue {queue!r} exists with another {argument} ({detail})"
    vhost = "" if found["vhost"] == "/" else f" -p {found['vhost']}"
    if argument in DEAD_LETTERING_ARGUMENTS:
        jobs = queue.removesuffix(RETRY_SUFFIX)
        return BrokerRefused(
            f"{where}: it was declared by an earlier inferq, and the jobs and retry queues now dead-letter "
            "at least once through the dead-letters exchange (new x-dead-letter-exchange, "
            "x-dead-letter-strategy and x-overflow; no x-dead-letter-routing-key); let the earlier version's "
            f"workers empty both (inferq worker --drain), check with rabbitmqctl{vhost} list_queues name "
            f"messages, delete them (rabbitmqctl{vhost} delete_queue {jobs}; rabbitmqctl{vhost} delete_queue "
            f"{jobs}{RETRY_SUFFIX}) and start the workers: they declare them anew"
        )
    return BrokerRefused(
        f"{where}: set the INFERQ_* settings it was declared with (INFERQ_MAX_DELIVERIES, "
        "INFERQ_MAX_QUEUE_LENGTH, INFERQ_RESULTS_MAX_LENGTH, INFERQ_RESULTS_MAX_AGE_S), or, once it is "
        f"empty, delete it (rabbitmqctl{vhost} delete_queue {queue}) so that it is declared anew"
    )


def declare_queues(channel: Channel, specs: list[QueueSpec], on_done: Callable[[], None]) -> None:
    """Declare ``specs`` one after the other (durable, with their arguments, and bound to their topic
    exchanges, declared durable too), then call ``on_done``. Stops, without calling it, once the channel is
    closing (its close handler takes over)."""
    if not channel.is_open:
        return
    if not specs:
        on_done()
        return
    first, rest = specs[0], specs[1:]
    channel.queue_declare(
        first.name,
        durable=True,
        arguments=first.arguments,
        callback=lambda _frame: _bind(
            channel, first.name, list(first.bound_to), lambda: declare_queues(channel, rest, on_done)
        ),
    )


def _bind(channel: Channel, queue: str, exchanges: list[str], on_done: Callable[[], None]) -> None:
    if not channel.is_open:
        return
    if not exchanges:
        on_done()
        return
    exchange, rest = exchanges[0], exchanges[1:]

    def bind(_frame: Any) -> None:
        if not channel.is_open:
            return
        channel.queue_bind(queue, exchange, ALL_RESULTS, callback=lambda _f: _bind(channel, queue, rest, on_done))

    channel.exchange_declare(exchange, exchange_type="topic", durable=True, callback=bind)


def declare_topology(channel: BlockingChannel, settings: InferqSettings) -> None:
    """Declare every queue and exchange inferq owns on a blocking channel, exactly as the worker and the
    producer do (for operator commands, tools and tests); a queue that exists with other arguments raises
    :class:`BrokerRefused`, saying what to do (:func:`topology_error`)."""
    for spec in all_queues(settings):
        for exchange in spec.bound_to:
            channel.exchange_declare(exchange, exchange_type="topic", durable=True)
        try:
            channel.queue_declare(spec.name, durable=True, arguments=spec.arguments)
        except pika.exceptions.ChannelClosedByBroker as exc:
            refused = topology_error(exc)
            if refused is None:
                raise
            raise refused from None
        for exchange in spec.bound_to:
            channel.queue_bind(spec.name, exchange, ALL_RESULTS)


def delete_topology(channel: BlockingChannel, settings: InferqSettings) -> None:
    """Delete every queue and exchange inferq owns (messages included: for tests and benchmarks)."""
    for spec in all_queues(settings):
        channel.queue_delete(spec.name)
    for exchange in all_exchanges(settings):
        channel.exchange_delete(exchange)

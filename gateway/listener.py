"""What a replica of the API hears from the broker, on queues of its own: each :class:`Subscription` binds a
private queue (exclusive, deleted with the connection) to a topic exchange, and its handler gets what
arrives, a batch at a time. Today the API subscribes to the dead-letters exchange; another exchange is one
more subscription.

A batch is acked once its handler returned: a handler that raises ``OSError`` (its store is unreachable)
gets the batch again after a pause, so nothing heard is dropped while the replica runs. The listener owns
its connection and its thread (pika is not thread-safe); it reconnects, with backoff, until stopped. What
was published while it was disconnected, it does not hear: another replica does, and the records are
shared.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic, BasicProperties

from inferq.shared.broker.amqp import Backoff
from inferq.shared.broker.connection import connect_backoff, open_blocking
from inferq.shared.config.logging import get_logger
from inferq.shared.config.settings import InferqSettings
from inferq.shared.errors import InferqError

log = get_logger(__name__)

POLL_S = 0.5
"""How often the listener's thread looks at its stop flag (and flushes what arrived)."""
PREFETCH = 512
"""Unacked messages per subscription: a batch is at most this large."""


@dataclass(frozen=True, slots=True)
class Heard:
    """One message from a subscription's queue."""

    properties: BasicProperties
    body: bytes


@dataclass(frozen=True, slots=True)
class Subscription:
    """A private queue bound to ``exchange`` with ``routing_key``, and what to do with its messages.
    ``handle`` runs on the listener's thread; it may raise ``OSError`` to get the batch again later."""

    name: str
    exchange: str
    handle: Callable[[list[Heard]], None]
    routing_key: str = "#"


@dataclass(slots=True)
class _Queue:
    subscription: Subscription
    heard: list[Heard] = field(default_factory=list)
    last_tag: int = 0


class Listener:
    """Consumes every :class:`Subscription` on one connection in a thread of its own."""

    def __init__(self, settings: InferqSettings, subscriptions: list[Subscription], *, name: str) -> None:
        self._settings = settings
        self._subscriptions = subscriptions
        self._name = name
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.listening = threading.Event()
        """Set while every subscription's queue is bound and consumed."""

    def start(self) -> None:
        """Start listening (connecting in the background)."""
        self._thread.start()

    def stop(self, timeout_s: float) -> None:
        """Stop within about ``POLL_S``: what was heard and handled is acked, the rest is left to the
        broker (the private queues go with the connection)."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    # -- the listener's thread ------------------------------------------------------------------------

    def _run(self) -> None:
        backoff = connect_backoff()
        while not self._stopping.is_set():
            try:
                self._listen(backoff)
            except (InferqError, pika.exceptions.AMQPError, OSError) as exc:
                log.warning("listener_disconnected", listener=self._name, error=f"{type(exc).__name__}: {exc}")
            except Exception:  # a bug: say so, and listen again rather than go deaf for good
                log.exception("listener_failed", listener=self._name)
            self.listening.clear()
            self._stopping.wait(backoff.next_delay())

    def _listen(self, backoff: Backoff) -> None:
        connection = open_blocking(self._settings, self._name)
        try:
            channel = connection.channel()
            channel.basic_qos(prefetch_count=PREFETCH)
            queues = [self._subscribe(channel, s) for s in self._subscriptions]
            self.listening.set()
            backoff.reset()
            log.info("listener_started", listener=self._name, exchanges=[s.exchange for s in self._subscriptions])
            while not self._stopping.is_set():
                connection.process_data_events(time_limit=POLL_S)
                for queue in queues:
                    self._flush(channel, queue)
        finally:
            if connection.is_open:
                connection.close()

    def _subscribe(self, channel: BlockingChannel, subscription: Subscription) -> _Queue:
        queue = _Queue(subscription)
        name = f"{subscription.exchange}.{subscription.name}.{uuid.uuid4().hex[:12]}"
        # Declared as the topology declares it (a listener may start before any worker or producer did).
        channel.exchange_declare(subscription.exchange, exchange_type="topic", durable=True)
        channel.queue_declare(name, exclusive=True, auto_delete=True)
        channel.queue_bind(name, subscription.exchange, subscription.routing_key)

        def on_message(_ch: BlockingChannel, method: Basic.Deliver, props: BasicProperties, body: bytes) -> None:
            queue.heard.append(Heard(props, body))
            queue.last_tag = method.delivery_tag

        channel.basic_consume(name, on_message)
        return queue

    def _flush(self, channel: BlockingChannel, queue: _Queue) -> None:
        if not queue.heard:
            return
        try:
            queue.subscription.handle(queue.heard)
        except OSError as exc:
            log.warning("listener_handler_failed", listener=self._name, error=str(exc), messages=len(queue.heard))
            # Handed back (they come again, to this queue), after a pause that keeps heartbeats flowing.
            channel.basic_nack(queue.last_tag, multiple=True, requeue=True)
            queue.heard = []
            channel.connection.process_data_events(time_limit=POLL_S)
            return
        channel.basic_ack(queue.last_tag, multiple=True)
        queue.heard = []

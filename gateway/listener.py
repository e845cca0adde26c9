"""What a replica of the API hears from the broker, on queues of its own: each :class:`Subscription` binds a
private queue (exclusive, deleted with the connection) to a topic exchange, and its handler gets what
arrives, a batch at a time. The API subscribes to the dead-letters exchange (to fail the operations of
dead-lettered jobs) and to the results exchange (to wake the requests waiting for a result).

A batch is acked once its handler returned: a handler that raises ``OSError`` (its store is unreachable)
gets the batch again after a pause, so nothing heard is dropped while the replica runs. The listener owns
its connection and its thread (pika is not thread-safe); it reconnects, with backoff, until stopped, and
also when the broker cancels one of its consumers (its queue was deleted). What was published while it
was not listening, it does not hear: another replica does (the records are shared), and ``on_listening``,
called each time every queue is consumed again, lets its owner look for what it may have missed.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic, BasicProperties

from inferq.shared.broker.amqp import Backoff
from inferq.shared.broker.connection import connect_backoff, open_blocking
from inferq.shared.config.logging import get_logger
from inferq.shared.config.settings import InferqSettings
from inferq.shared.contract.messages import Result
from inferq.shared.errors import BrokerUnavailable, InferqError

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
    name: str
    heard: list[Heard] = field(default_factory=list)
    last_tag: int = 0


class Listener:
    """Consumes every :class:`Subscription` on one connection in a thread of its own."""

    def __init__(
        self,
        settings: InferqSettings,
        subscriptions: list[Subscription],
        *,
        name: str,
        on_listening: Callable[[], None] | None = None,
    ) -> None:
        self._settings = settings
        self._subscriptions = subscriptions
        self._name = name
        self._on_listening = on_listening
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._queues: list[str] = []
        self.listening = threading.Event()
        """Set while every subscription's queue is bound and consumed."""

    def queues(self) -> list[str]:
        """The names of the private queues consumed now (new ones after each reconnect)."""
        return list(self._queues)

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
            cancelled: list[str] = []
            channel.add_on_cancel_callback(lambda frame: cancelled.append(frame.method.consumer_tag))
            queues = [self._subscribe(channel, s) for s in self._subscriptions]
            self._queues = [queue.name for queue in queues]
            self.listening.set()
            backoff.reset()
            log.info("listener_started", listener=self._name, exchanges=[s.exchange for s in self._subscriptions])
            if self._on_listening is not None:
                self._on_listening()
            while not self._stopping.is_set():
                connection.process_data_events(time_limit=POLL_S)
                if cancelled:  # e.g. an operator deleted the queue: listen again on new ones
                    raise BrokerUnavailable(f"the broker cancelled consumer {cancelled[0]}")
                for queue in queues:
                    self._flush(channel, queue)
        finally:
            if connection.is_open:
                connection.close()

    def _subscribe(self, channel: BlockingChannel, subscription: Subscription) -> _Queue:
        name = f"{subscription.exchange}.{subscription.name}.{uuid.uuid4().hex[:12]}"
        queue = _Queue(subscription, name)
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


class Waiters:
    """The requests of this replica waiting for their job's result, by job id, and how they are woken: on
    the event loop, with the result heard (or ``None``: look in the store, after a reconnect, a dead
    letter or a stop). Woken by any thread, one hand-over to the event loop per batch heard.

    A waiting request holds one future at a time (:meth:`expect`, then :meth:`renew` after each wake):
    what arrives while it is busy (reading the store) is kept in that future, never lost."""

    def __init__(self) -> None:
        self._waiting: dict[str, list[asyncio.Future[Result | None]]] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    def __len__(self) -> int:
        return len(self._waiting)

    def expect(self, job_id: str) -> asyncio.Future[Result | None]:
        """A future for the next word on ``job_id`` (on the event loop: register before publishing)."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        future: asyncio.Future[Result | None] = loop.create_future()
        with self._lock:
            self._waiting.setdefault(job_id, []).append(future)
        return future

    def renew(self, job_id: str, spent: asyncio.Future[Result | None]) -> asyncio.Future[Result | None]:
        """Replace a future that was woken by a fresh one (in place: the id stays wanted throughout)."""
        future: asyncio.Future[Result | None] = asyncio.get_running_loop().create_future()
        with self._lock:
            futures = self._waiting.setdefault(job_id, [])
            if spent in futures:
                futures[futures.index(spent)] = future
            else:
                futures.append(future)
        return future

    def forget(self, job_id: str, future: asyncio.Future[Result | None]) -> None:
        """The request stopped waiting."""
        with self._lock:
            futures = self._waiting.get(job_id)
            if futures is None:
                return
            if future in futures:
                futures.remove(future)
            if not futures:
                del self._waiting[job_id]

    def wanted(self, job_id: str | None) -> bool:
        """True when a request of this replica waits for ``job_id`` (any thread)."""
        return job_id is not None and job_id in self._waiting

    def wake(self, heard: Mapping[str, Result | None]) -> None:
        """Wake the requests waiting for each id of ``heard`` (any thread)."""
        loop = self._loop
        if not heard or loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._deliver, dict(heard))
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            return

    def wake_all(self) -> None:
        """Tell every waiting request to look in the store (any thread)."""
        with self._lock:
            ids = list(self._waiting)
        self.wake(dict.fromkeys(ids))

    def _deliver(self, heard: dict[str, Result | None]) -> None:
        with self._lock:
            for job_id, result in heard.items():
                for future in self._waiting.get(job_id, ()):
                    if not future.done():
                        future.set_result(result)

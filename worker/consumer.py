"""pika, and only pika: the worker's connection, channel, consumer, confirmed publishes and acks.

Everything here runs on the I/O loop's thread (STYLE §8): other threads reach it through
:meth:`Consumer.call_threadsafe`. Connecting, reconnecting and declaring the queues are the connection
layer's (:mod:`inferq.shared.broker.connection`); delivery tags belong to one connection *epoch*, and a tag from an
older epoch is never acked.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pika.adapters.select_connection import IOLoop
from pika.channel import Channel
from pika.spec import Basic, BasicProperties

from inferq.shared.broker.amqp import (
    PERSISTENT,
    PUBLISHED_MS_HEADER,
    ConfirmCallback,
    ConfirmTracker,
    forwarded_properties,
)
from inferq.shared.broker.connection import Link, Session
from inferq.shared.broker.topology import (
    COPY_HEADER,
    REASON_HEADER,
    RESENT_HEADER,
    all_queues,
    dead_letters_exchange,
    jobs_queue,
    retry_queue,
    returns_exchange,
)
from inferq.shared.config.logging import get_logger
from inferq.shared.config.settings import WorkerSettings
from inferq.shared.errors import InferqError

log = get_logger(__name__)
DELIVERY_COUNT_HEADER = "x-delivery-count"


@dataclass(slots=True, eq=False)
class Delivery:
    """One job delivery, as much of its AMQP envelope as the worker needs. Read-only by convention (not
    frozen: one is made per job, and a frozen dataclass costs several times more to build); two
    deliveries are equal only if they are the same one."""

    tag: int
    epoch: int
    redelivered: bool
    message_id: str | None
    reply_to: str | None
    correlation_id: str | None
    published_ms: float | None
    received_ms: float
    properties: BasicProperties
    body: bytes
    suspect: bool = False
    """Taken from the retry queue: run it alone."""

    @property
    def delivery_count(self) -> int:
        """Earlier deliveries of this message that were not acked, as the quorum queue counts them
        (``x-delivery-count``; absent on a first delivery)."""
        count = (self.properties.headers or {}).get(DELIVERY_COUNT_HEADER)
        return count if isinstance(count, int) else (1 if self.redelivered else 0)

    @property
    def copies(self) -> int:
        """How many times a worker copied this job back to a queue (``x-inferq-copy``): each copy is a new
        message whose delivery count starts over."""
        copies = (self.properties.headers or {}).get(COPY_HEADER)
        return copies if isinstance(copies, int) else 0

    @property
    def maybe_done_before(self) -> bool:
        """The job may already have a stored result: redelivered, a suspect, or resent by its producer."""
        return self.redelivered or self.suspect or bool((self.properties.headers or {}).get(RESENT_HEADER))


class DeliveryHandler(Protocol):
    """What the worker does with the consumer's events."""

    def on_consuming(self) -> None:
        """The channel is set up and deliveries may arrive."""

    def on_delivery(self, delivery: Delivery, body: bytes) -> None:
        """A job message arrived."""

    def on_connection_lost(self) -> None:
        """The connection dropped: every unacked delivery will be redelivered by the broker."""

    def on_cancelled(self, queue: str) -> None:
        """The broker cancelled the consumer of ``queue`` (deleted, or lost): it is declared and consumed
        again; deliveries already taken from it finish as usual."""

    def on_listening(self) -> None:
        """A new session listens to the announcements of returned deliveries (and may send its own)."""

    def on_returns(self, body: bytes) -> None:
        """A worker announced deliveries it lost (:mod:`inferq.worker.absolution`)."""


def _published_ms(properties: BasicProperties) -> float | None:
    headers = properties.headers or {}
    value = headers.get(PUBLISHED_MS_HEADER)
    if isinstance(value, int | float):
        return float(value)
    if properties.timestamp:
        return float(properties.timestamp) * 1000
    return None


def _copied_properties(original: BasicProperties, headers: dict[str, Any]) -> BasicProperties:
    """Every property of ``original`` (persistent) with ``headers``, for a copy of a job put back in a
    queue. NOTE: not ``user_id``: the broker refuses a publish whose user_id is not the publishing user's."""
    return BasicProperties(
        content_type=original.content_type,
        content_encoding=original.content_encoding,
        headers=headers,
        delivery_mode=PERSISTENT,
        priority=original.priority,
        correlation_id=original.correlation_id,
        reply_to=original.reply_to,
        expiration=original.expiration,
        message_id=original.message_id,
        timestamp=original.timestamp,
        type=original.type,
        app_id=original.app_id,
        cluster_id=original.cluster_id,
    )


def _count_returns(channel: Channel, on_return: Callable[[], None]) -> None:
    """Tell ``on_return`` of every delivery pika hands back to the broker by itself.

    NOTE: a delivery that crosses ``basic.cancel`` on the wire never reaches the consumer's callback:
    pika rejects it (requeued). The broker counts it as ready again only a moment later, so a depth
    asked just after the cancel can miss it. The worker itself never rejects (it nacks), so every
    ``basic_reject`` on its channel is such a return."""
    reject = channel.basic_reject

    def counted(delivery_tag: int = 0, requeue: bool = True) -> None:
        on_return()
        reject(delivery_tag, requeue)

    channel.basic_reject = counted


class Consumer:
    """The worker's broker side: consume jobs, publish results with confirms, ack."""

    def __init__(self, settings: WorkerSettings, handler: DeliveryHandler, name: str) -> None:
        self.settings = settings
        self._results_exchange = settings.results_exchange_name
        self._handler = handler
        self._ioloop = IOLoop()
        # A worker is a service: once connected, it reconnects until stopped (shared/broker/connection.py).
        self._link = Link(settings, name, self._ioloop, self, queues=all_queues(settings), reconnect_forever=True)
        self._channel: Channel | None = None
        self._confirms: ConfirmTracker | None = None
        self._consumer_tags: list[str] = []
        self._queue_of: dict[str, str] = {}  # consumer tag -> its queue, for a cancel sent by the broker
        self._lost: list[str] = []  # queues whose consumer the broker cancelled, to consume again
        self._epoch = 0
        self._stopping = False
        self._wanted = True  # consume whenever a channel is up; false after cancel() until resume()
        self.handed_back = 0
        """Deliveries handed back to a queue: quarantined, requeued, or returned after a cancel. Each
        may reach this worker again at any moment (drain mode does not end in a cycle that moved this)."""
        self.failure: BaseException | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def run(self) -> None:
        """Connect and serve until :meth:`stop`; raises :class:`BrokerUnavailable` if never connected."""
        self._link.open()
        try:
            self._ioloop.start()
        finally:
            self._ioloop.close()
        if self.failure is not None:
            raise self.failure

    def stop(self) -> None:
        """Close the connection (unacked deliveries return to the queue) and leave the I/O loop."""
        if self._stopping:
            return
        self._stopping = True
        channel = self._channel
        if channel is not None and channel.is_open:
            # NOTE: a synchronous round trip first, so the broker has taken every ack we sent before
            # the channel closes (closing returns whatever it still counts as unacked to the queue).
            channel.basic_qos(prefetch_count=self.settings.prefetch, callback=lambda _frame: self._link.close())
        else:
            self._link.close()

    def abort(self) -> None:
        """Leave the I/O loop now, without waiting for the broker to answer a close (a stop's time is up).
        The socket goes with the process; the broker returns every unacked delivery to its queue."""
        self._stopping = True
        self._ioloop.stop()

    @property
    def connected(self) -> bool:
        """True while a channel is open (consuming or not)."""
        return self._channel is not None and self._channel.is_open

    @property
    def epoch(self) -> int:
        """Generation of the current connection; tags of older epochs are dead."""
        return self._epoch

    @property
    def ready(self) -> bool:
        """True while a channel is open and consuming (not while a queue whose consumer the broker
        cancelled is declared and consumed again)."""
        return self._channel is not None and self._channel.is_open and bool(self._consumer_tags) and not self._lost

    # Link handler: the connection layer's events.

    def on_ready(self, session: Session) -> None:
        """A new session: consume again (unless stopping)."""
        self._epoch = session.epoch
        self._channel, self._confirms = session.channel, session.confirms
        _count_returns(session.channel, self._count_handed_back)
        self._watch_cancels(session.channel)
        if self._stopping:
            self._link.close()
            return
        self._listen(session.channel)

    def on_lost(self, reason: str) -> bool:
        """Every unacked delivery will be redelivered; reconnect unless stopping (the handler may decide
        to stop on hearing of the loss: a stopping worker has nothing left to wait for)."""
        # Tags of the lost session are dead: its channel is gone, and the next session has a new epoch.
        self._channel = self._confirms = None
        self._consumer_tags = []
        if not self._stopping:
            self._handler.on_connection_lost()
        if self._stopping:
            self._ioloop.stop()
            return False
        return True

    def on_failed(self, error: InferqError) -> None:
        """No broker within the connect timeout, or a permanent refusal: the worker exits with it."""
        self.failure = error
        self._stopping = True
        self._ioloop.stop()

    def on_closed(self) -> None:
        """Closed after :meth:`stop`."""
        self._channel = self._confirms = None
        self._consumer_tags = []
        self._ioloop.stop()

    def _listen(self, channel: Channel) -> None:
        """Listen to the announcements of returned deliveries on a private queue (deleted with the
        connection), then consume jobs."""
        exchange = returns_exchange(self.settings)

        def consume(frame: Any) -> None:
            queue = frame.method.queue
            channel.queue_bind(queue, exchange, callback=lambda _f: started(queue))

        def started(queue: str) -> None:
            channel.basic_consume(queue, self._on_returns, auto_ack=True)
            self._handler.on_listening()
            self._on_queues_declared()

        def declared(_frame: Any) -> None:
            channel.queue_declare("", exclusive=True, auto_delete=True, callback=consume)

        channel.exchange_declare(exchange, exchange_type="fanout", durable=True, callback=declared)

    def _on_returns(self, _channel: Channel, _method: Basic.Deliver, _props: BasicProperties, body: bytes) -> None:
        self._handler.on_returns(body)

    def announce(self, body: bytes, on_confirm: ConfirmCallback) -> None:
        """Tell every worker (this one included) of deliveries this one lost, with a confirm."""
        if self._channel is None or not self._channel.is_open or self._confirms is None:
            on_confirm(False)
            return
        props = BasicProperties(content_type="application/json", delivery_mode=PERSISTENT)
        self._confirms.publish("", body, props, on_confirm, mandatory=False, exchange=returns_exchange(self.settings))

    def _on_queues_declared(self) -> None:
        # NOTE: after a reconnect, consume again only if the worker still wants jobs: a stop (or a
        # drain's cancel) requested while the connection was down stays in force.
        if self._wanted:
            self._consume()

    def resume(self) -> None:
        """Start (or restart, after :meth:`cancel`) consuming: the jobs queue with the configured
        prefetch, and the retry queue one suspect at a time (``basic_qos`` is per consumer)."""
        self._wanted = True
        self._consume()

    def _consume(self) -> None:
        channel = self._channel
        if channel is None or self._consumer_tags:
            return

        def consume_retry(_frame: Any) -> None:
            tag = channel.basic_consume(retry_queue(self.settings).name, self._on_suspect)
            self._subscribed(tag, retry_queue(self.settings).name)
            log.info("consuming", queue=self.settings.jobs_queue, prefetch=self.settings.prefetch)
            self._handler.on_consuming()

        def consume_jobs(_frame: Any) -> None:
            tag = channel.basic_consume(self.settings.jobs_queue, self._on_message)
            self._subscribed(tag, self.settings.jobs_queue)
            channel.basic_qos(prefetch_count=1, callback=consume_retry)

        channel.basic_qos(prefetch_count=self.settings.prefetch, callback=consume_jobs)

    def cancel(self, on_cancelled: Callable[[], None]) -> None:
        """Stop taking new deliveries; ``on_cancelled`` runs once the broker confirms (every delivery
        sent before that has arrived by then). Holds across reconnects until :meth:`resume`."""
        self._wanted = False
        tags, self._consumer_tags = self._consumer_tags, []
        if self._channel is None or not tags:
            on_cancelled()
            return
        remaining = {"count": len(tags)}

        def one_done(_frame: Any) -> None:
            remaining["count"] -= 1
            if remaining["count"] == 0:
                on_cancelled()

        for tag in tags:
            self._channel.basic_cancel(tag, callback=one_done)

    # -- a consumer the broker cancelled ----------------------------------------------------------

    def _watch_cancels(self, channel: Channel) -> None:
        """Hear of the consumers the broker cancels on a new channel: RabbitMQ sends ``basic.cancel`` when a
        consumed queue is deleted (pika advertises the ``consumer_cancel_notify`` capability it needs)."""
        self._queue_of, self._lost = {}, []
        channel.add_on_cancel_callback(self._on_cancelled_by_broker)

    def _subscribed(self, tag: str, queue: str) -> None:
        self._queue_of = {t: q for t, q in self._queue_of.items() if t in self._consumer_tags}
        self._consumer_tags.append(tag)
        self._queue_of[tag] = queue

    def _on_cancelled_by_broker(self, frame: Any) -> None:
        """The broker cancelled a consumer (its queue was deleted, say): not ready until the queues are
        declared again and that one is consumed again. A refused declaration fails the link: the worker
        exits with it."""
        tag = frame.method.consumer_tag
        queue = self._queue_of.pop(tag, None)
        if queue is None or tag not in self._consumer_tags:
            return  # one this worker was cancelling itself (a stop's or a drain's cancel crossed it)
        self._consumer_tags.remove(tag)
        self._lost.append(queue)
        self._handler.on_cancelled(queue)
        if len(self._lost) == 1:  # else a resubscription is under way, and it takes this queue too
            self._link.redeclare(self._resubscribe)

    def _resubscribe(self) -> None:
        """Consume again the first queue that lost its consumer, then the next, one at a time (``basic_qos``
        applies to the consumer created next: two at once could swap their prefetch)."""
        channel = self._channel
        if channel is None or not self._lost:
            return
        queue = self._lost[0]
        prefetch = 1 if queue == retry_queue(self.settings).name else self.settings.prefetch
        channel.basic_qos(prefetch_count=prefetch, callback=lambda _frame: self._consume_again(channel, queue))

    def _consume_again(self, channel: Channel, queue: str) -> None:
        if id(channel) != id(self._channel) or not self._lost:  # (ids: `is not` would widen `channel`)
            return  # the session changed meanwhile: the new one consumes afresh
        self._lost.pop(0)
        # NOTE: a stop or a drain's cancel that came meanwhile holds (resume() consumes every queue).
        if not self._wanted or self._stopping:
            self._lost = []
            return
        if queue not in (self._queue_of.get(t) for t in self._consumer_tags):
            on_message = self._on_suspect if queue == retry_queue(self.settings).name else self._on_message
            self._subscribed(channel.basic_consume(queue, on_message), queue)
            log.info("consuming_again", queue=queue)
        if self._lost:
            self._link.redeclare(self._resubscribe)
        elif self._consumer_tags:
            self._handler.on_consuming()

    # -- deliveries ------------------------------------------------------------------------------

    def _on_suspect(self, channel: Channel, method: Basic.Deliver, props: BasicProperties, body: bytes) -> None:
        self._on_message(channel, method, props, body, suspect=True)

    def _on_message(
        self, _channel: Channel, method: Basic.Deliver, props: BasicProperties, body: bytes, *, suspect: bool = False
    ) -> None:
        delivery = Delivery(
            tag=method.delivery_tag,
            epoch=self._epoch,
            redelivered=bool(method.redelivered),
            message_id=props.message_id,
            reply_to=props.reply_to,
            correlation_id=props.correlation_id,
            published_ms=_published_ms(props),
            received_ms=time.time() * 1000,
            properties=props,
            body=body,
            suspect=suspect,
        )
        self._handler.on_delivery(delivery, body)

    def is_current(self, delivery: Delivery) -> bool:
        """True when ``delivery`` belongs to the open channel and may still be acked."""
        return delivery.epoch == self._epoch and self._channel is not None and self._channel.is_open

    def publish_result(
        self, delivery: Delivery, job_id: str, body: bytes, on_confirm: ConfirmCallback, *, routing_key: str
    ) -> None:
        """Publish a result to the results exchange under ``routing_key`` (``<model>.<status>``) and,
        when asked, to the job's ``reply_to``."""
        if not self.is_current(delivery) or self._confirms is None:
            on_confirm(False)
            return
        # Not mandatory: a result notification nobody is bound to is not an error, the result is stored.
        exchange, correlation_id = self._results_exchange, delivery.correlation_id
        if not delivery.reply_to:
            self._confirms.publish_json(exchange, routing_key, body, job_id, correlation_id, on_confirm)
            return
        waiting = {"count": 2, "ok": True}

        def both(ok: bool) -> None:
            waiting["ok"] = bool(waiting["ok"]) and ok
            waiting["count"] -= 1
            if waiting["count"] == 0:
                on_confirm(bool(waiting["ok"]))

        self._confirms.publish_json(exchange, routing_key, body, job_id, correlation_id, both)
        # The caller may have gone away: an unroutable reply is not an error, the result is stored.
        self._confirms.publish_json("", delivery.reply_to, body, job_id, correlation_id, both)

    def dead_letter(self, delivery: Delivery, reason: str, on_confirm: ConfirmCallback) -> None:
        """Copy the message, body unchanged, through the dead-letters exchange (to the dead-letter queue and
        any listener) with ``reason`` in a header."""
        # NOTE: the routing key is the jobs queue's name, as in the broker's own dead letters: a reason may be
        # longer than the 255 bytes a routing key can hold.
        exchange = dead_letters_exchange(self.settings)
        self._forward(delivery, self.settings.jobs_queue, {REASON_HEADER: reason}, on_confirm, exchange=exchange)

    def quarantine(self, delivery: Delivery, on_confirm: ConfirmCallback) -> None:
        """Move a redelivered job, unchanged, to the retry queue, where it runs alone."""
        self._count_handed_back()
        self._copy(delivery, retry_queue(self.settings).name, {}, on_confirm)

    def resend(self, delivery: Delivery, on_confirm: ConfirmCallback) -> None:
        """Put a copy of the job back in the queue it came from, every property and header kept, marked
        resent (whoever takes it looks for a stored result first). Its delivery count starts over: handing
        a job back this way spends none of its delivery attempts, where a nack would."""
        self._count_handed_back()
        queue = retry_queue(self.settings).name if delivery.suspect else self.settings.jobs_queue
        self._copy(delivery, queue, {RESENT_HEADER: True}, on_confirm)

    def _copy(self, delivery: Delivery, queue: str, headers: dict[str, Any], on_confirm: ConfirmCallback) -> None:
        # Each copy is numbered: the returns of one copy are told apart from those of the message it copies.
        headers = {**headers, COPY_HEADER: delivery.copies + 1}
        self._forward(delivery, queue, headers, on_confirm, whole=True)

    def _forward(
        self,
        delivery: Delivery,
        routing_key: str,
        headers: dict[str, Any],
        on_confirm: ConfirmCallback,
        *,
        exchange: str = "",
        whole: bool = False,
    ) -> None:
        if not self.is_current(delivery) or self._confirms is None:
            on_confirm(False)
            return
        original = delivery.properties
        kept = {k: v for k, v in (original.headers or {}).items() if k != DELIVERY_COUNT_HEADER}
        if whole:
            props = _copied_properties(original, {**kept, **headers})
        else:
            props = forwarded_properties(original, {**kept, **headers})
        self._confirms.publish(routing_key, delivery.body, props, on_confirm, exchange=exchange)

    def ack(self, epoch: int, through: int | None, singles: list[int]) -> None:
        """Ack every outstanding delivery up to ``through`` with one ``multiple`` ack, then each of
        ``singles``, on the channel of ``epoch`` (nothing, if that channel is gone)."""
        if epoch != self._epoch or self._channel is None or not self._channel.is_open:
            return
        if through is not None:
            self._channel.basic_ack(through, multiple=True)
        for tag in singles:
            self._channel.basic_ack(tag, multiple=False)

    def requeue(self, delivery: Delivery) -> None:
        """Hand one delivery back to the broker for another try."""
        if self.is_current(delivery):
            assert self._channel is not None
            self._count_handed_back()
            self._channel.basic_nack(delivery.tag, multiple=False, requeue=True)

    def _count_handed_back(self) -> None:
        self.handed_back += 1

    def queue_depth(self, on_count: Callable[[int], None]) -> None:
        """Ask the broker how many jobs are ready in the jobs and retry queues together."""
        channel = self._channel
        if channel is None or not channel.is_open:
            return
        jobs, retry = jobs_queue(self.settings), retry_queue(self.settings)

        def count_retry(jobs_frame: Any) -> None:
            channel.queue_declare(
                retry.name,
                durable=True,
                arguments=retry.arguments,
                passive=True,
                callback=lambda frame: on_count(jobs_frame.method.message_count + frame.method.message_count),
            )

        channel.queue_declare(jobs.name, durable=True, arguments=jobs.arguments, passive=True, callback=count_retry)

    # -- scheduling ------------------------------------------------------------------------------

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> object:
        """Run ``callback`` on the I/O thread after ``delay_s``."""
        return self._ioloop.call_later(delay_s, callback)

    def cancel_timer(self, handle: object) -> None:
        """Forget a :meth:`call_later` callback."""
        self._ioloop.remove_timeout(handle)

    def call_threadsafe(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the I/O thread; the only way other threads touch the connection."""
        self._ioloop.add_callback_threadsafe(callback)

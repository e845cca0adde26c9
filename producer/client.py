"""The producer client: publish jobs with publisher confirms, a window of them in flight at once.

A job is "published" only when the broker confirmed it. A nack (the jobs queue is full and refuses
publishes) is backpressure: the job is retried with backoff for up to ``publish_retry_s``, then the
call fails with :class:`PublishError`. A lost connection is re-opened and every unconfirmed job is
published again, so a confirmed id is never lost and an unconfirmed one is never reported as safe.

The client drives pika's I/O loop in the calling thread for the duration of each call; it is not
thread-safe (use one client per thread).
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pika
from pika.adapters.select_connection import IOLoop
from pika.channel import Channel
from pika.spec import BasicProperties

from shared.amqp import (
    CONTENT_TYPE,
    PERSISTENT,
    PUBLISHED_MS_HEADER,
    Backoff,
    ConfirmTracker,
    connection_parameters,
    declare_queues,
    redacted_url,
)
from shared.errors import BrokerUnavailable, PublishError
from shared.logging import get_logger
from shared.messages import Job, Result
from shared.settings import ProducerSettings
from shared.topology import all_queues

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A job with its AMQP envelope options."""

    job: Job
    reply_to: str | None = None
    correlation_id: str | None = None


@dataclass(slots=True)
class _Message:
    job_id: str
    body: bytes
    reply_to: str | None
    correlation_id: str | None
    first_nack_at: float | None = None

    def properties(self) -> BasicProperties:
        return BasicProperties(
            content_type=CONTENT_TYPE,
            delivery_mode=PERSISTENT,
            message_id=self.job_id,
            reply_to=self.reply_to,
            correlation_id=self.correlation_id,
            headers={PUBLISHED_MS_HEADER: int(time.time() * 1000)},
        )


def _message(item: Job | Outgoing) -> _Message:
    out = item if isinstance(item, Outgoing) else Outgoing(item)
    body = out.job.model_dump_json(exclude_none=True).encode()
    return _Message(out.job.id, body, out.reply_to, out.correlation_id)


def new_job_id() -> str:
    """A fresh job id (uuid4), for callers that do not bring their own."""
    return str(uuid.uuid4())


@dataclass(slots=True)
class _Run:
    """State of one publishing call."""

    source: Iterator[_Message]
    on_confirmed: Callable[[str], None]
    retry: deque[_Message] = field(default_factory=deque)
    in_flight: int = 0
    exhausted: bool = False
    confirmed: int = 0
    error: Exception | None = None
    backoff: Backoff = field(default_factory=lambda: Backoff(base_s=0.05, cap_s=2.0))

    def done(self) -> bool:
        return self.in_flight == 0 and (self.error is not None or (self.exhausted and not self.retry))


class Producer:
    """Publishes jobs to the jobs queue with confirms; usable as a context manager."""

    def __init__(self, settings: ProducerSettings, name: str = "inferq-producer") -> None:
        self.settings = settings
        self._name = name
        self._ioloop = IOLoop()
        self._connection: pika.SelectConnection | None = None
        self._channel: Channel | None = None
        self._confirms: ConfirmTracker | None = None
        self._reply_queue: str | None = None
        self._replies: dict[str, Result] = {}
        self._run: _Run | None = None
        self._on_ready: Callable[[], None] = lambda: None
        self._waiting_for: str | None = None
        self._connect_error: Exception | None = None
        self._connect_backoff = Backoff()
        self._connect_deadline = 0.0

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- public API -------------------------------------------------------------------------------

    def publish(self, job: Job, *, reply_to: str | None = None, correlation_id: str | None = None) -> str:
        """Publish one job and return its id once the broker confirmed it."""
        self.publish_many([Outgoing(job, reply_to, correlation_id)])
        return job.id

    def publish_many(self, jobs: Iterable[Job | Outgoing], on_confirmed: Callable[[str], None] | None = None) -> int:
        """Publish ``jobs`` with up to ``confirm_window`` unconfirmed at once; ``on_confirmed(id)`` runs
        for each job as the broker confirms it. Returns how many were confirmed; raises
        :class:`PublishError` or :class:`BrokerUnavailable` after reporting every job that was."""
        run = _Run((_message(j) for j in jobs), on_confirmed or (lambda _id: None))
        self._run = run
        try:
            self._drive(self._pump)
        finally:
            self._run = None
        if run.error is not None:
            raise run.error
        return run.confirmed

    def request(self, job: Job, timeout_s: float = 30.0) -> Result:
        """Publish ``job`` with a private ``reply_to`` queue and wait for its result."""
        self._drive(self._ioloop.stop)  # make sure the channel and the reply queue exist
        assert self._reply_queue is not None
        self.publish(job, reply_to=self._reply_queue, correlation_id=job.id)
        if job.id not in self._replies:
            self._waiting_for = job.id
            timer = self._ioloop.call_later(timeout_s, self._ioloop.stop)
            try:
                self._drive(lambda: None)  # runs until the reply arrives or the timer fires
            finally:
                self._ioloop.remove_timeout(timer)
                self._waiting_for = None
        result = self._replies.pop(job.id, None)
        if result is None:
            raise TimeoutError(f"no result for job {job.id} within {timeout_s:g}s (it is still queued or running)")
        return result

    def close(self) -> None:
        """Close the connection and release the I/O loop (its wake-up socket pair)."""
        if self._connection is not None and self._connection.is_open:
            self._connection.close()
            self._ioloop.start()  # returns once the close completed (see _on_closed)
        self._connection = None
        self._ioloop.close()

    # -- the I/O loop -----------------------------------------------------------------------------

    def _drive(self, on_ready: Callable[[], None]) -> None:
        """Run the I/O loop until the current operation stops it; connect first if needed.
        ``on_ready`` runs once the channel is usable."""
        self._connect_error = None
        self._on_ready = on_ready
        if self._channel is not None and self._channel.is_open:
            self._ioloop.call_later(0, on_ready)
        elif self._connection is None or self._connection.is_closed:
            self._connect_deadline = time.monotonic() + self.settings.connect_timeout_s
            self._connect()
        self._ioloop.start()
        if self._connect_error is not None:
            raise self._connect_error

    def _connect(self) -> None:
        self._connection = pika.SelectConnection(
            connection_parameters(self.settings, self._name),
            on_open_callback=lambda c: c.channel(on_open_callback=self._on_channel_open),
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_closed,
            custom_ioloop=self._ioloop,
        )

    def _on_open_error(self, _connection: Any, error: BaseException) -> None:
        if time.monotonic() >= self._connect_deadline:
            url = redacted_url(self.settings.amqp_url.get_secret_value())
            self._connect_error = BrokerUnavailable(
                f"cannot reach the broker at {url} within {self.settings.connect_timeout_s:g}s ({error})"
            )
            self._fail(self._connect_error)
            return
        delay = self._connect_backoff.next_delay()
        log.warning("broker_unavailable", reason=str(error), retry_in_s=round(delay, 2))
        self._ioloop.call_later(delay, self._connect)

    def _on_closed(self, _connection: Any, reason: BaseException) -> None:
        confirms = self._confirms
        self._channel = self._confirms = self._reply_queue = None
        if confirms is not None:
            confirms.fail_all()  # unconfirmed publishes go back to the retry queue
        if self._run is None and self._waiting_for is None:
            self._ioloop.stop()  # an orderly close, or a drop while idle: reconnect on next use
            return
        # Dropped mid-call: publishes in flight were not confirmed; they are resent after reconnecting.
        log.warning("broker_connection_lost", reason=str(reason))
        self._connect_deadline = time.monotonic() + self.settings.connect_timeout_s
        self._ioloop.call_later(self._connect_backoff.next_delay(), self._connect)

    def _on_channel_open(self, channel: Channel) -> None:
        self._connect_backoff.reset()
        self._channel = channel
        self._confirms = ConfirmTracker(channel)
        declare_queues(channel, all_queues(self.settings), self._declare_reply_queue)

    def _declare_reply_queue(self) -> None:
        assert self._channel is not None
        self._channel.queue_declare("", exclusive=True, auto_delete=True, callback=self._on_reply_queue)

    def _on_reply_queue(self, frame: Any) -> None:
        assert self._channel is not None
        self._reply_queue = frame.method.queue
        self._channel.basic_consume(self._reply_queue, self._on_reply, auto_ack=True)
        self._on_ready()

    def _on_reply(self, _ch: Channel, _method: Any, props: BasicProperties, body: bytes) -> None:
        result = Result.model_validate_json(body)
        self._replies[props.correlation_id or result.id] = result
        if self._waiting_for in self._replies:
            self._ioloop.stop()

    def _fail(self, error: Exception) -> None:
        if self._run is not None and self._run.error is None:
            self._run.error = error
        self._ioloop.stop()

    # -- publishing with a window of confirms -------------------------------------------------------

    def _pump(self) -> None:
        run = self._run
        if run is None or self._confirms is None:
            return
        while run.error is None and run.in_flight < self.settings.confirm_window:
            message = self._next_message(run)
            if message is None:
                break
            run.in_flight += 1
            self._confirms.publish(
                self.settings.jobs_queue,
                message.body,
                message.properties(),
                partial(self._on_confirm, message),
            )
        if run.done():
            self._ioloop.stop()

    def _next_message(self, run: _Run) -> _Message | None:
        if run.retry:
            return run.retry.popleft()
        if run.exhausted:
            return None
        try:
            return next(run.source)
        except StopIteration:
            run.exhausted = True
            return None

    def _on_confirm(self, message: _Message, ok: bool) -> None:
        run = self._run
        if run is None:
            return
        run.in_flight -= 1
        if ok:
            run.confirmed += 1
            run.backoff.reset()
            run.on_confirmed(message.job_id)
        elif self._channel is None:
            run.retry.append(message)  # the connection dropped: resend after reconnecting
        else:
            self._backpressure(run, message)
        self._pump()

    def _backpressure(self, run: _Run, message: _Message) -> None:
        now = time.monotonic()
        message.first_nack_at = message.first_nack_at or now
        if now - message.first_nack_at > self.settings.publish_retry_s:
            run.error = PublishError(
                f"broker kept refusing job {message.job_id} for {self.settings.publish_retry_s:g}s "
                f"(queue {self.settings.jobs_queue} full?)"
            )
            return
        delay = run.backoff.next_delay()
        log.warning("publish_refused_retrying", job_id=message.job_id, retry_in_s=round(delay, 2))
        run.in_flight += 1  # hold the slot until the retry is queued

        def requeue() -> None:
            run.in_flight -= 1
            run.retry.append(message)
            self._pump()

        self._ioloop.call_later(delay, requeue)

"""The producer client: publish jobs with publisher confirms, a window of them in flight at once.

A job is "published" only when the broker confirmed it. A nack (the jobs queue is full and refuses
publishes) is backpressure: the job is retried with backoff for up to ``publish_retry_s``, then the
call fails with :class:`PublishError`. A lost connection is re-opened (:mod:`inferq.shared.broker.connection`) and
every unconfirmed job is published again, so a confirmed id is never lost and an unconfirmed one is
never reported as safe: a call returns only when every job it took was confirmed, and raises otherwise.

The client drives pika's I/O loop in the calling thread for the duration of each call; it is not
thread-safe (use one client per thread).
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from pika.adapters.select_connection import IOLoop
from pika.channel import Channel
from pika.spec import BasicProperties
from pydantic import ValidationError

from inferq.shared.broker.amqp import CONTENT_TYPE, PERSISTENT, PUBLISHED_MS_HEADER, Backoff
from inferq.shared.broker.connection import Link, Session
from inferq.shared.broker.topology import RESENT_HEADER, all_queues
from inferq.shared.config.logging import get_logger
from inferq.shared.config.settings import ProducerSettings
from inferq.shared.contract.messages import Job, Result, Status, VersionRef, job_digest
from inferq.shared.errors import IdConflict, InferqError, PublishError, ResultNotFound
from inferq.shared.results.base import ResultStore
from inferq.shared.results.stores import open_result_store

log = get_logger(__name__)

CLOSE_TIMEOUT_S = 10.0
"""How long closing the connection waits for the broker's answer."""
INTERRUPT_CHECK_S = 0.1
"""How soon the I/O loop stops after Ctrl-C (see ``Producer._ctrl_c_between_events``)."""
REPLY_QUEUE_PREFIX = "inferq.reply."
REPLY_QUEUE_GRACE_S = 60.0
"""How long a reply queue outlives its producer's connection: replies that arrive while it reconnects
wait there."""


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A job with its AMQP envelope options."""

    job: Job
    reply_to: str | None = None
    correlation_id: str | None = None


@dataclass(frozen=True, slots=True)
class Encoded:
    """A job already in its wire form, published as it is: a backfill encodes its column arrays straight to
    JSON once, and the HTTP API publishes the bytes it encoded to check the job's size."""

    job_id: str
    body: bytes


@dataclass(slots=True)
class _Message:
    job_id: str
    body: bytes
    reply_to: str | None
    correlation_id: str | None
    first_nack_at: float | None = None
    resent: bool = False

    def properties(self) -> BasicProperties:
        headers: dict[str, object] = {PUBLISHED_MS_HEADER: int(time.time() * 1000)}
        if self.resent:
            headers[RESENT_HEADER] = True
        return BasicProperties(
            content_type=CONTENT_TYPE,
            delivery_mode=PERSISTENT,
            message_id=self.job_id,
            reply_to=self.reply_to,
            correlation_id=self.correlation_id,
            headers=headers,
        )


def _message(item: Job | Outgoing | Encoded) -> _Message:
    if isinstance(item, Encoded):
        return _Message(item.job_id, item.body, None, None)
    out = item if isinstance(item, Outgoing) else Outgoing(item)
    body = out.job.model_dump_json(exclude_none=True).encode()
    return _Message(out.job.id, body, out.reply_to, out.correlation_id)


def answers(result: Result, job: Job) -> bool:
    """True when ``result`` is the result of ``job``: it carries the job's digest.

    NOTE: a job a worker could not read (too large, off the contract) has a failed result without a
    digest: that one is passed on, it holds no other job's outputs."""
    if result.job_sha256 is None:
        return result.status is not Status.SUCCEEDED
    return result.job_sha256 == job_digest(job)


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
    taken: int = 0
    confirmed: int = 0
    error: Exception | None = None
    backoff: Backoff = field(default_factory=lambda: Backoff(base_s=0.05, cap_s=2.0))

    def done(self) -> bool:
        return self.in_flight == 0 and (self.error is not None or (self.exhausted and not self.retry))


@contextmanager
def _one_write(connection: Any) -> Iterator[None]:
    """The frames pika emits inside go to the socket as one write.

    NOTE: pika hands its transport each frame on its own (a message is three: method, header, body),
    and the transport sends each with a system call of its own; on the gateway's path that was most of
    the cost of a publish. pika's accounting (bytes and frames sent, for heartbeats) is done as usual:
    only the hand-over to the transport is deferred to the end of the block, in order."""
    frames: list[bytes] = []
    connection._adapter_emit_data = frames.append  # shadows the method on this instance only
    try:
        yield
    finally:
        del connection._adapter_emit_data
        if frames:
            connection._adapter_emit_data(b"".join(frames))


class Producer:
    """Publishes jobs to the jobs queue with confirms; usable as a context manager."""

    def __init__(self, settings: ProducerSettings, name: str = "inferq-producer") -> None:
        self.settings = settings
        self._ioloop = IOLoop()
        self._link = Link(settings, name, self._ioloop, self, queues=all_queues(settings))
        self._on_ready: Callable[[], None] = lambda: None
        self._calling = False
        self._error: InferqError | None = None
        self._run: _Run | None = None
        # One reply queue per producer, under a name that survives reconnects: it is declared again on
        # every new connection, and the broker deletes it only once it has been unused for a while.
        self._reply_queue = f"{REPLY_QUEUE_PREFIX}{uuid.uuid4().hex}"
        self._wants_replies = False
        self._replies_epoch = 0  # the session consuming the reply queue
        self._replies: dict[str, Result] = {}
        self._waiting_for: str | None = None
        self._results: ResultStore | None = None
        self._closed = False
        self._released = False

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- public API -------------------------------------------------------------------------------

    def publish(self, job: Job, *, reply_to: str | None = None, correlation_id: str | None = None) -> str:
        """Publish one job and return its id once the broker confirmed it."""
        self.publish_many([Outgoing(job, reply_to, correlation_id)])
        return job.id

    def publish_many(
        self, jobs: Iterable[Job | Outgoing | Encoded], on_confirmed: Callable[[str], None] | None = None
    ) -> int:
        """Publish ``jobs`` with up to ``confirm_window`` unconfirmed at once; ``on_confirmed(id)`` runs
        for each job as the broker confirms it. Returns how many were confirmed, which is every job
        taken from ``jobs``; raises :class:`PublishError` or :class:`BrokerUnavailable` after reporting
        every job that was."""
        run = _Run((_message(j) for j in jobs), on_confirmed or (lambda _id: None))
        self._run = run
        try:
            self._drive(self._pump)
        finally:
            self._run = None
        if run.error is not None:
            raise run.error
        if run.confirmed != run.taken or run.in_flight or run.retry:
            # Every path above should have raised; this is the last line of defence for "exit 0 means
            # every job was confirmed".
            raise PublishError(f"{run.taken - run.confirmed} of {run.taken} jobs were not confirmed by the broker")
        return run.confirmed

    def score_frame(
        self,
        frame: Any,
        model: str,
        version: VersionRef = "latest",
        *,
        batch_rows: int | None = None,
        timeout_s: float = 600.0,
    ) -> Any:
        """Score every row of ``frame`` (a pandas DataFrame or a pyarrow table, columns by the names the
        model records) with ``model`` at ``version`` through the workers, and return the predictions as a
        pandas DataFrame in the frame's order and index: ``error_code`` (``None`` where the row succeeded),
        then one column per output value. Needs the tables extra (``pip install 'inferq[tables]'``).

        Jobs of many rows, ids from their content (as ``inferq backfill``): scoring the same rows again
        publishes nothing and reads the stored results. Raises :class:`TimeoutError` when results are
        still missing after ``timeout_s`` (the jobs stay queued; call again to wait for them)."""
        from inferq.producer.frames import score_frame  # noqa: PLC0415  (pandas and pyarrow: an extra)

        return score_frame(self, frame, model, version, batch_rows=batch_rows, timeout_s=timeout_s)

    def request(self, job: Job, timeout_s: float = 30.0) -> Result:
        """Publish ``job`` with this producer's ``reply_to`` queue and wait for its result.

        A result that was stored while the connection was down (its reply lost with it) is found in the
        result store: a timeout is reported only when no result is stored either. A result that does not
        answer this job (the id already had another job's result) raises :class:`IdConflict`."""
        self._wants_replies = True
        self._drive(lambda: self._with_reply_queue(self._ioloop.stop))
        self.publish(job, reply_to=self._reply_queue, correlation_id=job.id)
        result = self._wait_for_reply(job.id, time.monotonic() + timeout_s)
        if result is None:
            result = self._stored(job.id)
        if result is None:
            raise TimeoutError(f"no result for job {job.id} within {timeout_s:g}s (it is still queued or running)")
        if not answers(result, job):
            raise IdConflict(
                f"job id {job.id!r} already has the result of another job (another model, version, inputs or "
                "parameters); send this job under a new id"
            )
        return result

    def close(self) -> None:
        """Close the connection and release the I/O loop; the client cannot be used after."""
        if self._released:
            return
        self._released = True
        self._closed = False
        self._link.close()  # calls on_closed at once when there is nothing to close
        if not self._closed:
            # Returns once the close completed (see on_closed), or after CLOSE_TIMEOUT_S without an answer:
            # the socket then goes with the process (or the collector), and the broker drops the connection.
            timer = self._ioloop.call_later(CLOSE_TIMEOUT_S, self._ioloop.stop)
            try:
                with self._ctrl_c_between_events():
                    self._ioloop.start()
            finally:
                self._ioloop.remove_timeout(timer)
            if not self._closed:
                log.warning("broker_close_unanswered", timeout_s=CLOSE_TIMEOUT_S)
        self._ioloop.close()

    # -- the I/O loop -----------------------------------------------------------------------------

    def _drive(self, on_ready: Callable[[], None], *, if_open: bool = True) -> None:
        """Run the I/O loop until the current operation stops it, connecting first if needed.
        ``on_ready`` runs once a session is usable: at once if one is open (unless ``if_open`` is false),
        and again after every reconnect."""
        self._error = None
        self._on_ready = on_ready
        self._calling = True
        try:
            with self._ctrl_c_between_events():
                if self._link.session is None:
                    self._link.open()
                elif if_open:
                    self._ioloop.call_later(0, self._ready_again)
                self._ioloop.start()
        finally:
            self._calling = False
        if self._error is not None:
            raise self._error

    @contextmanager
    def _ctrl_c_between_events(self) -> Iterator[None]:
        """Ctrl-C (SIGINT) while the I/O loop runs stops the loop and raises :class:`KeyboardInterrupt` once it
        has stopped, never from inside pika's handling of an event: raised there, it can leave the connection
        half-updated (a close that never ends) or be lost in a callback (the call goes on as if nothing
        happened). Only in the main thread, and only where SIGINT still has Python's own handler."""
        if (
            threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
        ):
            yield
            return
        interrupted = False
        timer: Any = None

        def noted(_signum: int, _frame: object) -> None:
            nonlocal interrupted
            interrupted = True

        def check() -> None:
            nonlocal timer
            if interrupted:
                self._ioloop.stop()
            else:
                timer = self._ioloop.call_later(INTERRUPT_CHECK_S, check)

        timer = self._ioloop.call_later(INTERRUPT_CHECK_S, check)
        previous = signal.signal(signal.SIGINT, noted)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
            self._ioloop.remove_timeout(timer)
        if interrupted:
            raise KeyboardInterrupt

    def _ready_again(self) -> None:
        if self._link.session is not None:  # else the next session calls it
            self._on_ready()

    # Link handler: the connection layer's events, on the I/O loop.

    def on_ready(self, _session: Session) -> None:
        """A new session: resend what was unconfirmed, consume replies again, go on with the call."""
        if self._wants_replies:
            self._with_reply_queue(self._on_ready)
        else:
            self._on_ready()

    def on_lost(self, reason: str) -> bool:
        """Reconnect while a call is under way; a call that has failed anyway ends instead."""
        run = self._run
        if run is not None and run.error is not None:
            self._stop_if_done(run)
            return False
        return self._calling

    def on_failed(self, error: InferqError) -> None:
        """No broker (or a permanent refusal): the call fails with ``error``."""
        self._error = error
        if self._run is not None and self._run.error is None:
            self._run.error = error
        self._ioloop.stop()

    def on_closed(self) -> None:
        """The connection is closed."""
        self._closed = True
        self._ioloop.stop()

    # -- replies ----------------------------------------------------------------------------------

    def _with_reply_queue(self, then: Callable[[], None]) -> None:
        """Make sure this session consumes the reply queue, then call ``then``."""
        session = self._link.session
        if session is None:
            return  # the next session comes back here
        if self._replies_epoch == session.epoch:
            then()
            return

        def consume(_frame: Any) -> None:
            self._replies_epoch = session.epoch
            session.channel.basic_consume(self._reply_queue, self._on_reply, auto_ack=True)
            then()

        grace_ms = int((self.settings.connect_timeout_s + REPLY_QUEUE_GRACE_S) * 1000)
        # Durable (a transient shared queue is deprecated in RabbitMQ 4) and expiring: it keeps replies
        # across a broker restart, and the broker deletes it once no producer has used it for a while.
        session.channel.queue_declare(
            self._reply_queue,
            durable=True,
            arguments={"x-queue-type": "classic", "x-expires": grace_ms},
            callback=consume,
        )

    def _on_reply(self, _ch: Channel, _method: Any, props: BasicProperties, body: bytes) -> None:
        try:
            result = Result.model_validate_json(body)
        except ValidationError as exc:
            # NOTE: raising here would drop the connection; the store still has the result.
            log.warning("reply_unreadable", correlation_id=props.correlation_id, error=str(exc).splitlines()[0])
            return
        self._replies[props.correlation_id or result.id] = result
        if self._waiting_for in self._replies:
            self._ioloop.stop()

    def _wait_for_reply(self, job_id: str, deadline: float) -> Result | None:
        """Run the loop until the reply arrives or ``deadline``; after each reconnect, look in the result
        store (a reply sent while the connection was down is lost, the stored result is not)."""
        while job_id not in self._replies:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            epoch = self._link.epoch
            self._waiting_for = job_id
            timer = self._ioloop.call_later(remaining, self._ioloop.stop)
            try:
                # A new session stops the loop: the store is read here, never on the I/O loop.
                self._drive(self._ioloop.stop, if_open=False)
            finally:
                self._ioloop.remove_timeout(timer)
                self._waiting_for = None
            if self._link.epoch != epoch and job_id not in self._replies:
                stored = self._stored(job_id)
                if stored is not None:
                    return stored
        return self._replies.pop(job_id)

    def _stored(self, job_id: str) -> Result | None:
        """The result of ``job_id`` from the result store, or ``None`` when it has none (or cannot say)."""
        try:
            if self._results is None:
                self._results = open_result_store(self.settings.result_store)
            return self._results.get(job_id)
        except ResultNotFound:
            return None
        except (InferqError, OSError, ValueError) as exc:
            log.warning("result_store_unreadable", job_id=job_id, error=f"{type(exc).__name__}: {exc}")
            return None

    # -- publishing with a window of confirms -------------------------------------------------------

    def _pump(self) -> None:
        run = self._run
        session = self._link.session
        if run is None or session is None:
            return
        with _one_write(session.connection):
            while run.error is None and run.in_flight < self.settings.confirm_window:
                message = self._next_message(run)
                if message is None:
                    break
                run.in_flight += 1
                session.confirms.publish(
                    self.settings.jobs_queue,
                    message.body,
                    message.properties(),
                    partial(self._on_confirm, message),
                )
        self._stop_if_done(run)

    def _stop_if_done(self, run: _Run) -> None:
        if run.done():
            self._ioloop.stop()

    def _next_message(self, run: _Run) -> _Message | None:
        if run.retry:
            return run.retry.popleft()
        if run.exhausted:
            return None
        try:
            message = next(run.source)
        except StopIteration:
            run.exhausted = True
            return None
        except Exception as exc:  # the caller's iterator failed (e.g. a bad input line): stop, and say so
            run.error = exc
            return None
        run.taken += 1
        return message

    def _on_confirm(self, message: _Message, ok: bool) -> None:
        run = self._run
        if run is None:
            return
        run.in_flight -= 1
        try:
            self._settle(run, message, ok)
        except Exception as exc:
            # NOTE: an exception escaping into pika drops the connection, and with it the job in hand.
            # Keep the job (it is retried unless the call fails) and fail the call loudly instead.
            run.retry.append(message)
            run.error = run.error or exc
        self._pump()

    def _settle(self, run: _Run, message: _Message, ok: bool) -> None:
        if ok:
            run.confirmed += 1
            run.backoff.reset()
            try:
                run.on_confirmed(message.job_id)
            except Exception as exc:  # e.g. stdout closed under `inferq submit | head`
                run.error = run.error or exc
        elif self._link.session is None:
            # The connection dropped before the broker answered: the job may or may not be queued.
            # Resend it, marked, so a worker looks for a stored result before running it twice.
            message.resent = True
            run.retry.append(message)
        else:
            self._backpressure(run, message)

    def _backpressure(self, run: _Run, message: _Message) -> None:
        now = time.monotonic()
        message.first_nack_at = message.first_nack_at or now
        if now - message.first_nack_at > self.settings.publish_retry_s:
            run.retry.append(message)  # never confirmed: the call fails and says so
            run.error = PublishError(
                f"broker kept refusing job {message.job_id} for {self.settings.publish_retry_s:g}s "
                f"(queue {self.settings.jobs_queue} full?)"
            )
            return
        if run.backoff.attempt == 0:  # once per spell of refusals, not once per refused job
            log.warning("publish_refused_retrying", job_id=message.job_id, queue=self.settings.jobs_queue)
        delay = run.backoff.next_delay()
        run.in_flight += 1  # hold the slot until the retry is queued

        def requeue() -> None:
            run.in_flight -= 1
            run.retry.append(message)
            self._pump()

        self._ioloop.call_later(delay, requeue)

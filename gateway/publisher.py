"""One long-lived publisher for every request: a thread owns the producer (pika is not thread-safe),
request handlers hand it jobs through a queue and learn when the broker confirmed: a future per job
(:meth:`Publisher.submit`), or one callback per group of jobs (:meth:`Publisher.submit_group`: the jobs of
many requests handed over at once, and answered at once, one hand-over between threads each way).

Jobs handed in while a publish is under way join it: the producer pulls them while it has room in its
window of confirms, so under load one round of confirms carries many requests (a group commit) instead
of one round trip each. A refused publish (the jobs queue is full) is retried for ``publish_retry_s``,
then its future fails with :class:`PublishError`; a broker that cannot be reached within
``connect_timeout_s`` fails every job of the round with :class:`BrokerUnavailable`.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

from inferq.producer import Producer
from inferq.producer.client import Encoded
from inferq.shared.config.logging import get_logger
from inferq.shared.config.settings import ProducerSettings
from inferq.shared.errors import BrokerUnavailable, ConfigError, PublishError

log = get_logger(__name__)

REFUSING_S = 1.0
"""After the broker refused a publish (queue full), new jobs are refused at once for this long: the
producer's retries with backoff would otherwise hold every request of a round for seconds."""
IDLE_S = 1.0
"""How often an idle publisher runs the connection's I/O (heartbeats) and checks the broker."""


Outcomes = dict[str, Exception | None]
"""Each job id of a group and how its publish ended: ``None`` confirmed, else the error."""


class _Waiter(Protocol):
    def start(self) -> bool: ...
    def settle(self, job_id: str, error: Exception | None) -> None: ...


class _FutureWaiter:
    """One job's future (withdrawn when cancelled before its publish started)."""

    __slots__ = ("future",)

    def __init__(self, future: Future[None]) -> None:
        self.future = future

    def start(self) -> bool:
        return self.future.set_running_or_notify_cancel()

    def settle(self, _job_id: str, error: Exception | None) -> None:
        if error is None:
            self.future.set_result(None)
        else:
            self.future.set_exception(error)


class _Group:
    """The jobs of one :meth:`Publisher.submit_group`: ``done`` is called once, when each has an outcome."""

    __slots__ = ("done", "outcomes", "pending")

    def __init__(self, size: int, done: Callable[[Outcomes], None]) -> None:
        self.pending = size
        self.outcomes: Outcomes = {}
        self.done = done

    def start(self) -> bool:
        return True

    def settle(self, job_id: str, error: Exception | None) -> None:
        self.outcomes[job_id] = error
        self.pending -= 1
        if self.pending == 0:
            self.done(self.outcomes)


@dataclass(frozen=True, slots=True)
class _Request:
    job: Encoded
    waiter: _Waiter


class _Round:
    """One call of the producer: the jobs it takes from the queue and the futures waiting on them."""

    def __init__(self, requests: queue.SimpleQueue[_Request | None], first: _Request | None) -> None:
        self._requests = requests
        self._first = first
        self._waiting: dict[str, list[_Waiter]] = {}
        self.stop_seen = False

    def jobs(self) -> Iterator[Encoded]:
        """The first job, then whatever is queued; ends when the queue is empty (later jobs start the
        next round once this one is confirmed)."""
        item = self._first
        while True:
            if item is None:
                item = self._take()
                if item is None:
                    return
            if item.waiter.start():  # False: withdrawn by its request
                if item.job.job_id in self._waiting:  # the same id twice at once: one publish answers both
                    self._waiting[item.job.job_id].append(item.waiter)
                else:
                    self._waiting[item.job.job_id] = [item.waiter]
                    yield item.job
            item = None

    def _take(self) -> _Request | None:
        try:
            item = self._requests.get_nowait()
        except queue.Empty:
            return None
        if item is None:
            self.stop_seen = True
        return item

    def confirmed(self, job_id: str) -> None:
        """The broker confirmed ``job_id``: its requests are answered."""
        for waiter in self._waiting.pop(job_id, []):
            waiter.settle(job_id, None)

    def fail_unconfirmed(self, error: Exception) -> None:
        """The round ended with these jobs not confirmed."""
        waiting, self._waiting = self._waiting, {}
        for job_id, waiters in waiting.items():
            for waiter in waiters:
                waiter.settle(job_id, error)


class Publisher:
    """Publishes jobs handed in by any thread through one :class:`Producer` that only its thread uses."""

    def __init__(self, settings: ProducerSettings, *, name: str = "inferq-gateway", idle_s: float = IDLE_S) -> None:
        self._settings = settings
        self._name = name
        self._idle_s = idle_s
        self._requests: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="inferq-publisher", daemon=True)
        self._stopping = threading.Event()
        self._stop_seen = False
        self._started = threading.Event()
        self._start_error: ConfigError | None = None
        # Written by the publisher thread only; read anywhere (a bool is read atomically).
        self.broker_down = False
        self.connected = False
        self._refusing_until = 0.0

    def start(self, timeout_s: float | None = None) -> None:
        """Start taking jobs once a first connection was tried; raises :class:`ConfigError` when the broker
        refused our queue declarations (queues declared with other arguments). A broker that cannot be
        reached is not an error here: requests get 503 until it can."""
        self._thread.start()
        self._started.wait(timeout_s)
        if self._start_error is not None:
            raise self._start_error

    def submit(self, job: Encoded) -> Future[None]:
        """Hand ``job`` over; the future resolves once the broker confirmed it, or fails with
        :class:`PublishError` (refused: queue full) or :class:`BrokerUnavailable`. Cancelling the
        future before the publish started withdraws the job."""
        future: Future[None] = Future()
        if self._stopping.is_set():
            future.set_exception(BrokerUnavailable("the gateway is stopping"))
            return future
        self._requests.put(_Request(job, _FutureWaiter(future)))
        return future

    def submit_group(self, jobs: list[Encoded], done: Callable[[Outcomes], None]) -> None:
        """Hand ``jobs`` over together; ``done`` (called once, on the publisher's thread) gets each job's
        outcome: ``None`` when the broker confirmed it, else :class:`PublishError` (refused: queue full)
        or :class:`BrokerUnavailable`."""
        if not jobs:
            return
        group = _Group(len(jobs), done)
        if self._stopping.is_set():
            error = BrokerUnavailable("the gateway is stopping")
            for job in jobs:
                group.settle(job.job_id, error)
            return
        for job in jobs:
            self._requests.put(_Request(job, group))

    def refusing(self) -> bool:
        """True shortly after the broker refused a publish because the jobs queue was full."""
        return time.monotonic() < self._refusing_until

    def stop(self, timeout_s: float) -> None:
        """Publish what was handed in, wait for its confirms, close the connection."""
        self._stopping.set()
        self._requests.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("publisher_stop_timed_out", timeout_s=timeout_s)

    # -- the publisher thread -----------------------------------------------------------------------

    def _run(self) -> None:
        producer = Producer(self._settings, name=self._name)
        try:
            try:
                self._keepalive(producer)  # connect and declare the queues before the first request
            except ConfigError as exc:
                self._start_error = exc
                return
            finally:
                self._started.set()
            while not self._stop_seen:
                try:
                    first = self._requests.get(timeout=self._idle_s)
                except queue.Empty:
                    self._keepalive(producer)
                    continue
                if first is None:
                    self._stop_seen = True
                    self._publish_round(producer, None)  # whatever slipped in beside the stop
                    break
                self._publish_round(producer, first)
        except Exception:  # a bug here would leave every request hanging: fail them, say so
            log.exception("publisher_crashed")
            self.broker_down = True
            self._fail_queued(BrokerUnavailable("the gateway's publisher stopped"))
        finally:
            producer.close()
            self.connected = False

    def _keepalive(self, producer: Producer) -> None:
        """Run the connection's I/O briefly (heartbeats, a lost connection noticed) and learn whether
        the broker can be reached; a gateway whose broker is down answers 503 at once."""
        try:
            producer.publish_many([])
        except BrokerUnavailable as exc:
            self._mark_down(exc)
        except PublishError as exc:  # the channel was closed on us: the next use opens a new one
            log.warning("publisher_channel_closed", reason=str(exc))
        except ConfigError:
            if not self._started.is_set():
                raise
            log.exception("publisher_topology_refused")
        else:
            self._mark_up()

    def _publish_round(self, producer: Producer, first: _Request | None) -> None:
        round_ = _Round(self._requests, first)
        error: Exception | None = None
        try:
            producer.publish_many(round_.jobs(), on_confirmed=round_.confirmed)
        except BrokerUnavailable as exc:
            error = exc
            self._mark_down(exc)
        except PublishError as exc:
            error = exc
            self._refusing_until = time.monotonic() + REFUSING_S
        except Exception as exc:  # e.g. the queues were redeclared with other arguments: fail this round
            log.exception("publish_round_failed")
            error = exc
        else:
            self._mark_up()
        if round_.stop_seen:
            self._stop_seen = True
        round_.fail_unconfirmed(error or PublishError("the broker did not confirm the job"))

    def _fail_queued(self, error: Exception) -> None:
        while True:
            try:
                item = self._requests.get_nowait()
            except queue.Empty:
                return
            if item is not None and item.waiter.start():
                item.waiter.settle(item.job.job_id, error)

    def _mark_down(self, error: Exception) -> None:
        if not self.broker_down:
            log.warning("broker_unavailable", error=str(error))
        self.broker_down = True
        self.connected = False

    def _mark_up(self) -> None:
        if self.broker_down:
            log.info("broker_available")
        self.broker_down = False
        self.connected = True

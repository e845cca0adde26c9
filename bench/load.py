"""The driver's broker side: queue set-up, pre-loading a backlog, and offered load at a fixed rate with
the results consumed as they arrive. Publishes exactly like the inferq producer (persistent, message id,
``x-inferq-published-ms`` header, publisher confirms with a window in flight)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pika
from pika.adapters.select_connection import IOLoop

from bench.confirms import Confirmed
from inferq.shared.broker.amqp import CONTENT_TYPE, PERSISTENT, PUBLISHED_MS_HEADER, declare_queues, delete_topology
from inferq.shared.broker.topology import ALL_RESULTS, all_queues
from inferq.shared.config.settings import InferqSettings

CONFIRM_WINDOW = 1000
TICK_S = 0.001
SATURATION_BACKLOG_S = 2.0


def declare(settings: InferqSettings, *, celery: bool = False) -> None:
    """Declare the jobs, results and dead-letter queues exactly as inferq does (quorum queues, the
    results queue bound to the results exchange); for Celery, its jobs queue as Celery declares it."""
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url.get_secret_value()))
    channel = connection.channel()
    for spec in all_queues(settings):
        if celery and spec.name == settings.jobs_queue:
            channel.queue_declare(spec.name, durable=True, arguments={"x-queue-type": "quorum"})
            continue
        channel.queue_declare(spec.name, durable=True, arguments=spec.arguments)
        for exchange in spec.bound_to:
            channel.exchange_declare(exchange, exchange_type="topic", durable=True)
            channel.queue_bind(spec.name, exchange, ALL_RESULTS)
    connection.close()


def delete(settings: InferqSettings) -> None:
    """Delete the run's queues and exchanges."""
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url.get_secret_value()))
    channel = connection.channel()
    delete_topology(channel, settings)
    connection.close()


def celery_message(job_id: str, body: bytes) -> tuple[bytes, pika.BasicProperties]:
    """The inferq job ``body`` as a Celery (protocol 2) message calling ``bench.infer(body)``."""
    payload = orjson.dumps([[body.decode()], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    headers = {
        "lang": "py",
        "task": "bench.infer",
        "id": job_id,
        "root_id": job_id,
        "parent_id": None,
        "group": None,
        "retries": 0,
        "eta": None,
        "expires": None,
        "argsrepr": "(...)",
        "kwargsrepr": "{}",
        "origin": "bench",
    }
    props = pika.BasicProperties(
        content_type=CONTENT_TYPE,
        content_encoding="utf-8",
        delivery_mode=PERSISTENT,
        correlation_id=job_id,
        headers=headers,
    )
    return payload, props


class DepthProbe:
    """Asks the broker how many messages and consumers a queue has (a passive declare)."""

    def __init__(self, settings: InferqSettings) -> None:
        self._connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url.get_secret_value()))
        self._channel = self._connection.channel()

    def __call__(self, queue: str) -> tuple[int, int]:
        """(messages ready, consumers) of ``queue``."""
        frame = self._channel.queue_declare(queue, passive=True)
        return frame.method.message_count, frame.method.consumer_count

    def close(self) -> None:
        """Close the probe's connection."""
        self._connection.close()


def _properties(job_id: str) -> pika.BasicProperties:
    return pika.BasicProperties(
        content_type=CONTENT_TYPE,
        delivery_mode=PERSISTENT,
        message_id=job_id,
        headers={PUBLISHED_MS_HEADER: int(time.time() * 1000)},
    )


@dataclass(slots=True)
class Offered:
    """What an offered-load run saw: per job, publish and receipt times (``perf_counter`` seconds)."""

    published: dict[str, float] = field(default_factory=dict)
    latencies_s: dict[str, float] = field(default_factory=dict)
    worker_timings: dict[str, dict[str, float | None]] = field(default_factory=dict)
    started: float = 0.0
    finished: float = 0.0
    saturated: bool = False


class Load:
    """One SelectConnection driven in the calling thread for the duration of each call."""

    def __init__(
        self,
        settings: InferqSettings,
        message: Callable[[str, bytes], tuple[bytes, pika.BasicProperties]] | None = None,
    ) -> None:
        self.settings = settings
        self._message = message  # turns an inferq job into another system's message (Celery)
        self._ioloop = IOLoop()
        self._channel: Any = None
        self._results_channel: Any = None
        self._published = 0
        self._confirmed = Confirmed()
        self._step: Callable[[], None] = lambda: None
        self.error: BaseException | None = None
        self._connection = pika.SelectConnection(
            pika.URLParameters(settings.amqp_url.get_secret_value()),
            on_open_callback=self._on_open,
            on_open_error_callback=lambda _c, error: self._fail(error),
            custom_ioloop=self._ioloop,
        )
        self._ioloop.start()  # returns once both channels are open
        if self.error is not None:
            raise self.error

    def _fail(self, error: BaseException) -> None:
        self.error = error
        self._ioloop.stop()

    def _on_open(self, connection: pika.SelectConnection) -> None:
        connection.channel(on_open_callback=self._on_channel)

    def _on_channel(self, channel: Any) -> None:
        self._channel = channel
        channel.confirm_delivery(ack_nack_callback=self._on_confirm)
        self._connection.channel(on_open_callback=self._on_results_channel)

    def _on_results_channel(self, channel: Any) -> None:
        self._results_channel = channel
        if self._message is not None:
            self._ioloop.stop()  # the driver declared the other system's queue as it does
            return
        declare_queues(channel, all_queues(self.settings), self._ioloop.stop)

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        if not isinstance(method, pika.spec.Basic.Ack):
            self._fail(RuntimeError("the broker refused a job publish"))
            return
        self._confirmed.add(method.delivery_tag, method.multiple)
        self._step()

    @property
    def _in_flight(self) -> int:
        return self._published - self._confirmed.through

    def _publish(self, job_id: str, body: bytes) -> None:
        if self._message is not None:
            body, props = self._message(job_id, body)
        else:
            props = _properties(job_id)
        self._channel.basic_publish("", self.settings.jobs_queue, body, props)
        self._published += 1

    # -- a backlog ----------------------------------------------------------------------------------

    def preload(self, jobs: Iterator[tuple[str, bytes]]) -> int:
        """Publish every job with confirms, ``CONFIRM_WINDOW`` in flight; returns how many."""
        count = 0
        exhausted = False

        def pump() -> None:
            nonlocal count, exhausted
            while not exhausted and self._in_flight < CONFIRM_WINDOW:
                item = next(jobs, None)
                if item is None:
                    exhausted = True
                    break
                self._publish(*item)
                count += 1
            if exhausted and self._in_flight == 0:
                self._ioloop.stop()

        self._run(pump, on_confirm=pump)
        return count

    # -- offered load -------------------------------------------------------------------------------

    def offered(self, jobs: Iterator[tuple[str, bytes]], total: int, rate: float, grace_s: float) -> Offered:
        """Publish ``total`` jobs at ``rate`` per second (open loop) while consuming the results queue;
        returns once every result arrived, ``grace_s`` after the last publish, or as soon as more than
        ``SATURATION_BACKLOG_S`` worth of jobs await their results (the system cannot keep up: its
        latency would only measure the growing queue)."""
        seen = Offered()
        sent = 0
        timers: list[object] = []

        def on_result(_ch: Any, _method: Any, props: pika.BasicProperties, body: bytes) -> None:
            published = seen.published.get(props.message_id)
            if published is not None and props.message_id not in seen.latencies_s:
                seen.latencies_s[props.message_id] = time.perf_counter() - published
                seen.worker_timings[props.message_id] = orjson.loads(body).get("timings") or {}
                if len(seen.latencies_s) == total:
                    seen.finished = time.perf_counter()
                    self._ioloop.stop()

        def tick() -> None:
            nonlocal sent
            now = time.perf_counter()
            due = min(total, int((now - seen.started) * rate) + 1)
            while sent < due:
                job_id, body = next(jobs)
                seen.published[job_id] = time.perf_counter()
                self._publish(job_id, body)
                sent += 1
            if sent - len(seen.latencies_s) > rate * SATURATION_BACKLOG_S:
                seen.saturated = True
                self._ioloop.stop()
            elif sent < total:
                # Sleep until the next job is due (at least a tick), not a busy 1 ms loop: the driver
                # shares the cores with the system under test.
                next_due = seen.started + sent / rate
                self._ioloop.call_later(max(TICK_S, next_due - time.perf_counter()), tick)
            elif len(seen.latencies_s) < total:
                timers.append(self._ioloop.call_later(grace_s, self._ioloop.stop))

        tag = self._results_channel.basic_consume(self.settings.results_queue, on_result, auto_ack=True)
        seen.started = time.perf_counter()
        self._run(tick)
        for timer in timers:
            self._ioloop.remove_timeout(timer)
        self._results_channel.basic_cancel(tag)
        return seen

    def _run(self, start: Callable[[], None], on_confirm: Callable[[], None] = lambda: None) -> None:
        self._step = on_confirm
        self._ioloop.call_later(0, start)
        self._ioloop.start()
        self._step = lambda: None
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Close the connection."""
        if self._connection.is_open:
            self._connection.add_on_close_callback(lambda *_: self._ioloop.stop())
            self._connection.close()
            self._ioloop.start()

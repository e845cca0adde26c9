"""The worker: receive → decode → batch → run → store → publish → ack.

A job's whole story is :class:`Worker`'s methods in the order they run, top to bottom:

1. :meth:`Worker.on_delivery` (I/O thread): receive (a whole message read at once, shared/broker/frames.py), decode
   (msgspec; pydantic only for rejects), batch.
2. :meth:`Worker._flush` hands due batches to the processing thread, which resolves the version,
   runs one onnxruntime call per batch, encodes each result once and stores them
   (:class:`worker.processor.Processor`).
3. :meth:`Worker._on_processed` (I/O thread again) publishes each result with a confirm (frames packed by
   shared/broker/frames.py, one write per loop pass); one the broker refuses is published again, its job held
   meanwhile (:class:`worker.publishing.ResultPublisher`).
4. :meth:`Worker._finished` records each confirmed delivery in the :class:`AckWindow`, and
   :meth:`Worker._send_acks` acks once per pass of the I/O loop with ``multiple``.

The I/O thread owns the broker connection and every piece of state here; the processing thread touches
none of it and never the broker. Ack last: a delivery is acked only after its result is stored and the
broker confirmed the result's publish.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from types import FrameType

from inferq.model_store.cache import ModelCache
from inferq.model_store.registry import Registry
from inferq.model_store.stores import open_model_store
from inferq.monitoring.counting import Monitor
from inferq.monitoring.shadow_traffic import Shadow
from inferq.monitoring.store import open_monitor_store
from inferq.shared.broker.topology import result_routing_key
from inferq.shared.config.logging import get_logger
from inferq.shared.config.settings import WorkerSettings
from inferq.shared.contract.codec import Rejected, Undecodable, decode_job
from inferq.shared.errors import Expired, InferqError
from inferq.shared.results.base import ResultStore
from inferq.shared.results.stores import open_result_store
from inferq.worker.acks import AckWindow
from inferq.worker.batcher import Batch, Batcher
from inferq.worker.consumer import Consumer, Delivery
from inferq.worker.drain import DrainLoop
from inferq.worker.fetcher import ModelFetcher
from inferq.worker.metrics import MeteredRegistry, WorkerMetrics, start_metrics_server
from inferq.worker.processor import ModelKey, Outcome, Pending, Processed, Processor
from inferq.worker.publishing import ResultMessage, ResultPublisher
from inferq.worker.runner import Limits, LoadedModel, Watchdog, check_providers, load_model
from inferq.worker.waiting import Waiting

log = get_logger(__name__)
PROCESSING_THREADS = 1
"""Units of work in flight at once. One: measured against two (one computing while the other stores),
one thread does as well or better under the GIL, with fewer handoffs (see the commit that set it)."""
GC_EVERY_S = 60.0
CLOSE_WAIT_S = 10.0
"""How long a worker that stopped with its work settled waits for the drift counting of its last unit."""
HOLD_RETRY_S = 1.0
"""How soon a job held for an unreachable model or result store is tried again."""
SUSPECT_DELIVERIES = 2
"""A job delivered this often before was in flight at two crashes (or lost connections): it moves to
the retry queue and runs alone there. Once is most likely innocent: it runs in an ordinary batch."""


class ShutdownTimeout(InferqError):
    """The worker was stopped before its in-flight work finished; that work returns to the queue."""


@dataclass(slots=True)
class Counters:
    """What a worker did, for its final log line and for tests."""

    received: int = 0
    succeeded: int = 0
    failed: int = 0
    dead_lettered: int = 0
    quarantined: int = 0
    reused: int = 0
    batches: int = 0
    publishes_refused: int = 0
    started: float = field(default_factory=time.monotonic)
    first_job_at: float | None = None
    last_ack_at: float | None = None
    forced: bool = False

    def publish_refused(self) -> None:
        """The broker refused a result publish (it is published again)."""
        self.publishes_refused += 1


def worker_name() -> str:
    """``host:pid``, stamped on every result."""
    return f"{socket.gethostname()}:{os.getpid()}"


class ProcessingThreads:
    """Daemon threads that run units of work; a stuck one never delays the process's exit."""

    def __init__(self, count: int) -> None:
        self._work: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._serve, name=f"inferq-processing-{n}", daemon=True) for n in range(count)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, work: Callable[[], None]) -> None:
        """Run ``work`` on a free thread."""
        self._work.put(work)

    def close(self, wait_s: float) -> None:
        """Let the threads end once idle, waiting up to ``wait_s`` for them (one stuck in a run is left
        behind: a daemon thread never delays the process's exit)."""
        for _ in self._threads:
            self._work.put(None)
        deadline = time.monotonic() + wait_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _serve(self) -> None:
        while (work := self._work.get()) is not None:
            work()


class Worker:
    """One worker process's pipeline, driven by the consumer's events on the I/O thread."""

    def __init__(
        self,
        settings: WorkerSettings,
        registry: Registry[LoadedModel],
        store: ResultStore,
        *,
        drain: bool,
        metrics: WorkerMetrics | None = None,
        monitor: Monitor | None = None,
        shadow: Shadow | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics if metrics is not None else WorkerMetrics()
        self.registry = registry
        self.name = worker_name()
        self.counters = Counters()
        self.consumer = Consumer(settings, self, f"inferq-worker {self.name}")
        self._stopping = threading.Event()
        poll_s = settings.drain_poll_ms / 1000
        self.drain = DrainLoop(self.consumer, poll_s, self._idle, self._stopping.is_set) if drain else None
        limits = Limits(settings.max_rows_per_job, settings.max_elements_per_tensor)
        watchdog = Watchdog(settings.job_timeout_s)
        # A model fetched in the background: its held jobs are tried again at once.
        models = ModelFetcher(registry, on_fetched=lambda: self.consumer.call_threadsafe(self._held.retry_now))
        self.processor = Processor(
            models, store, limits, self.name, self._stopping, settings.store_retry_max_s, watchdog, monitor, shadow
        )
        self._batcher: Batcher[ModelKey, Pending] = Batcher(
            settings.max_batch_rows, settings.max_wait_ms, time.monotonic
        )
        self._ready: list[Outcome] = []  # results known without running (rejected, expired)
        self._suspects: list[Pending] = []  # from the retry queue: each runs alone
        self._threads = ProcessingThreads(PROCESSING_THREADS)
        self._units = 0  # units of work at the processing threads
        self._alone = False  # a suspect is running: nothing else may
        self._flush_timer: object | None = None
        self._acks = AckWindow()
        self._ack_timer: object | None = None
        # Jobs whose model (or stored result) cannot be read now: held, tried again in a second or as
        # soon as a fetch finished; on stop, handed back (another worker may reach the store).
        self._held: Waiting[Pending] = Waiting(
            self.consumer, self._acks, self._batch, lambda: HOLD_RETRY_S, self._finished, self._stopping.is_set
        )
        self._results = ResultPublisher(
            self.consumer, self._acks, self._finished, self._stopping.is_set, self.counters.publish_refused
        )

    # -- lifecycle --------------------------------------------------------------------------------

    def run(self) -> Counters:
        """Serve until stopped (or, in drain mode, until the queue is empty)."""
        try:
            self.consumer.run()
        finally:
            # Settled: only the last unit's drift counting may still run, and it is waited for. NOTE: not
            # after a forced stop or a failure: a thread may be stuck in a run or a store retry.
            settled = not self._units and not self.counters.forced
            self._threads.close(CLOSE_WAIT_S if settled else 0.0)
            # Monitoring seam: the open window and the pending shadow pairs, so a short run shows at once.
            if self.processor.monitor is not None:
                self.processor.monitor.flush()
            if self.processor.shadow is not None:
                self.processor.shadow.finish(self.settings.shutdown_grace_s)
        elapsed = time.monotonic() - self.counters.started
        counts = {k: v for k, v in dataclasses.asdict(self.counters).items() if k != "started"}
        log.info("worker_stopped", **counts, elapsed_s=round(elapsed, 3))
        return self.counters

    @property
    def stopping(self) -> bool:
        """True once a graceful stop was requested."""
        return self._stopping.is_set()

    @property
    def ready(self) -> bool:
        """Connected and consuming, and not stopping: what ``/readyz`` reports."""
        # NOTE: read from the metrics thread; these are plain attribute reads of the I/O thread's state.
        return self.consumer.ready and not self._stopping.is_set()

    @property
    def in_flight(self) -> int:
        """Deliveries received and not yet acked."""
        return len(self._acks)

    def request_stop(self) -> None:
        """Graceful stop, on the I/O thread. The order matters: stop taking work (basic.cancel),
        finish the in-flight batch, store, publish, ack, and only then close the connection."""
        if self._stopping.is_set():
            return
        log.info("worker_stopping", in_flight=len(self._acks), grace_s=self.settings.shutdown_grace_s)
        self._stopping.set()
        self.consumer.call_later(self.settings.shutdown_grace_s, self._grace_expired)
        self.consumer.cancel(self._after_settled)
        self._held.hand_back()  # another worker may reach their store
        self._results.hand_back()  # refused result publishes: stored, so another worker sends them
        self._flush()

    def _grace_expired(self) -> None:
        # Out of time: close now. Whatever is unacked returns to the queue; nothing is lost, and a
        # redelivered job whose result was already stored is republished from the store, not rerun.
        log.error("worker_shutdown_grace_expired", in_flight=len(self._acks))
        self.counters.forced = True
        self.consumer.stop()

    def _idle(self) -> bool:
        return not (
            self._acks or self._units or self._batcher or self._ready or self._suspects or self._ack_timer is not None
        )

    def _after_settled(self) -> None:
        """Something finished: perhaps the last thing a stop or a drain was waiting for."""
        if not self._idle():
            return
        if self._stopping.is_set():
            self.consumer.stop()
        elif self.drain is not None:
            self.drain.settled()

    def on_consuming(self) -> None:
        if self.drain is not None:
            self.drain.consuming()

    # -- 1. receive → decode → batch --------------------------------------------------------------

    def on_delivery(self, delivery: Delivery, body: bytes) -> None:
        self.counters.received += 1
        if self.counters.first_job_at is None:
            self.counters.first_job_at = time.time()
        if delivery.epoch != self._acks.epoch:
            self._acks.reset(delivery.epoch)  # the first delivery of a new channel: its tags start over
        self._acks.received(delivery.epoch, delivery.tag)
        if delivery.delivery_count >= SUSPECT_DELIVERIES and not delivery.suspect:
            # In flight at two crashes: perhaps it causes them. It moves to the retry queue and runs
            # alone there, so a poison job takes only itself down.
            self.counters.quarantined += 1
            self.consumer.quarantine(delivery, partial(self._finished, delivery))
            return
        decoded = decode_job(body, delivery.message_id, self.settings.max_message_bytes)
        if isinstance(decoded, Undecodable):
            self._dead_letter(delivery, decoded.reason)
        elif isinstance(decoded, Rejected):
            self._ready.append(self.processor.failed(delivery, decoded, decoded.error))
        elif decoded.deadline is not None and decoded.deadline < datetime.now(UTC):
            error = Expired(f"deadline {decoded.deadline.isoformat()} passed before the job could run")
            self._ready.append(self.processor.failed(delivery, decoded, error))
        else:
            self._batch(Pending(delivery, decoded))
        self._schedule_flush(0.0)

    def _batch(self, pending: Pending) -> None:
        if pending.delivery.suspect:
            self._suspects.append(pending)
        else:
            self._batcher.add((pending.job.model, pending.job.version), pending, pending.job.rows)
        self._schedule_flush(0.0)

    def _dead_letter(self, delivery: Delivery, reason: str) -> None:
        log.warning("job_dead_lettered", message_id=delivery.message_id, reason=reason)
        self.counters.dead_lettered += 1
        self.metrics.dead_lettered()
        self.consumer.dead_letter(delivery, reason, partial(self._finished, delivery))

    # -- 2. batch → run → store (the processing thread) -------------------------------------------

    def _schedule_flush(self, delay_s: float) -> None:
        if self._flush_timer is None:
            self._flush_timer = self.consumer.call_later(delay_s, self._flush)

    def _flush(self) -> None:
        """Hand waiting work to the processing thread, if it is free and the work is due."""
        if self._flush_timer is not None:
            self.consumer.cancel_timer(self._flush_timer)
            self._flush_timer = None
        if self._alone or self._units >= PROCESSING_THREADS:
            return  # more jobs gather meanwhile; a completion flushes again
        if self._suspects:
            if not self._units:  # a suspect runs alone: let the others finish first
                suspect = self._suspects.pop(0)
                key = (suspect.job.model, suspect.job.version)
                self._dispatch([Batch(key, [suspect], suspect.job.rows)], [], alone=True)
            return
        due_in = self._batcher.due_in()
        if due_in is None and not self._ready:
            return
        if due_in and not self._ready and not self._stopping.is_set():
            self._schedule_flush(due_in)
            return
        batches, ready = self._batcher.take_all(), self._ready
        self._ready = []
        self._dispatch(batches, ready)

    def _dispatch(self, batches: list[Batch[ModelKey, Pending]], ready: list[Outcome], *, alone: bool = False) -> None:
        self._units += 1
        self._alone = alone

        def unit() -> None:
            try:
                done: Processed | BaseException = self.processor.process(batches, ready)
            except Exception as exc:  # the store unavailable while stopping, or a bug: nothing is acked
                done = exc
            self.consumer.call_threadsafe(partial(self._on_processed, done, batches, ready))
            if not isinstance(done, BaseException):
                try:
                    self.processor.observe(done)  # drift counting: after the results left, not before
                except Exception as exc:  # a bug in counting must not end the processing thread
                    log.error("drift_counting_failed", error=f"{type(exc).__name__}: {exc}")

        self._threads.submit(unit)

    # -- 3. publish (I/O thread) ------------------------------------------------------------------

    def _on_processed(
        self, done: Processed | BaseException, batches: list[Batch[ModelKey, Pending]], ready: list[Outcome]
    ) -> None:
        self._units -= 1
        self._alone = False
        self._flush()  # the processing thread takes the next unit while these results go out
        if isinstance(done, BaseException):
            log.error("batch_not_completed", error=f"{type(done).__name__}: {done}")
            for delivery in [i.delivery for b in batches for i in b.items] + [o.delivery for o in ready]:
                self._finished(delivery, ok=False)
            if self.processor.shadow is not None:  # shadow seam: these jobs return to the queue
                self.processor.shadow.discard()
        else:
            self.counters.batches += len(done.runs)
            self.metrics.observe_processed(done.runs, done.outcomes)
            for outcome in done.outcomes:
                self._count(outcome)
                result = outcome.result
                message = ResultMessage(outcome.delivery, result.id, result.to_json(), result_routing_key(result))
                self._results.publish(message)
            for rejection in done.rejections:
                self._dead_letter(rejection.delivery, rejection.reason)
            for pending in done.held:
                self._held.add(pending.delivery, pending)
            if done.held:
                self._schedule_acks()  # the deliveries after a held one are acked meanwhile
                if self.processor.models.fetched != done.fetched:
                    # A fetch finished while the unit ran: its wake-up came before these jobs were held.
                    self._held.retry_now()
            if self.processor.shadow is not None:  # shadow seam: results stored and published first
                self.processor.shadow.release()
        self._after_settled()

    def _count(self, outcome: Outcome) -> None:
        if not outcome.counted:
            self.counters.reused += 1
        elif outcome.result.error is None:
            self.counters.succeeded += 1
        else:
            self.counters.failed += 1

    # -- 4. ack (I/O thread) ----------------------------------------------------------------------

    def _finished(self, delivery: Delivery, ok: bool) -> None:
        """A delivery is done: its result (or dead letter) is confirmed, or it was handed back."""
        if not self._acks.finished(delivery.epoch, delivery.tag, ok):
            return  # from before a reconnect: the broker will redeliver it; never ack a stale tag
        if not ok:
            log.warning("job_requeued", message_id=delivery.message_id)
            self.consumer.requeue(delivery)
        self._schedule_acks()

    def _schedule_acks(self) -> None:
        if self._ack_timer is None:
            # Confirms arrive one by one; one ack for all of those read in this pass of the I/O loop.
            self._ack_timer = self.consumer.call_later(0, self._send_acks)

    def _send_acks(self) -> None:
        self._ack_timer = None
        acks = self._acks.take()
        if acks:
            # NOTE: fewer, larger acks also matter for correctness: a quorum queue takes acks
            # asynchronously, and a burst of single acks just before the channel closes can be lost
            # (the jobs are redelivered, and their stored results republished).
            self.consumer.ack(self._acks.epoch, acks.through, acks.singles)
            self.counters.last_ack_at = time.time()
        self._after_settled()

    def on_connection_lost(self) -> None:
        # Every unacked delivery returns to the queue; whatever was stored is republished from the
        # store when it comes back (redelivered jobs look there first). Work at the processing thread
        # finishes, and its publishes are refused as stale.
        self._acks.reset(epoch=-1)  # no channel: nothing may be acked until the next one consumes
        if self.drain is not None and not self._stopping.is_set():
            self.consumer.resume()  # a drain's cancel does not outlive its channel; a stop's does
        if self._ack_timer is not None:
            self.consumer.cancel_timer(self._ack_timer)
            self._ack_timer = None
        self._batcher.take_all()
        self._ready = []
        self._suspects = []
        self._held.forget()
        self._results.forget()
        if self._flush_timer is not None:
            self.consumer.cancel_timer(self._flush_timer)
            self._flush_timer = None


def build_worker(settings: WorkerSettings, *, drain: bool) -> Worker:
    """Wire a worker from settings: model store, registry, result store; refuses unknown providers."""
    check_providers(settings.providers)
    model_store = open_model_store(settings.model_store)
    metrics = WorkerMetrics()
    metrics.set_provider(settings.providers[0])
    registry = MeteredRegistry(
        model_store,
        partial(load_model, intra_op_threads=settings.intra_op_threads, providers=settings.providers),
        metrics=metrics,
        max_loaded=settings.max_loaded_models,
        refresh_s=settings.alias_refresh_s,
        cache=ModelCache(settings.model_cache, settings.max_model_bytes),
        load_retry_s=0.0,  # an unreachable store holds the batch's jobs instead of blocking the thread
    )
    name = worker_name()
    monitoring = open_monitor_store(settings.result_store)
    monitor = None
    if settings.monitor:
        monitor = Monitor(monitoring, settings.monitor_window_s, name)
        monitor.register(metrics.registry)
        monitor.start_timer()
    shadow = Shadow(settings, registry, monitoring, name)
    store = open_result_store(settings.result_store)
    return Worker(settings, registry, store, drain=drain, metrics=metrics, monitor=monitor, shadow=shadow)


def collect_garbage(consumer: Consumer) -> None:
    """A full cyclic garbage collection now and every ``GC_EVERY_S`` on the I/O thread."""
    gc.collect()
    consumer.call_later(GC_EVERY_S, partial(collect_garbage, consumer))


def run_worker(settings: WorkerSettings, *, drain: bool = False) -> Counters:
    """Run a worker in this process until SIGTERM/SIGINT (or the queue is empty, with ``drain``)."""
    worker = build_worker(settings, drain=drain)

    signals: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        signals.append(signum)
        if len(signals) > 1:
            # A second signal: exit at once. Unacked jobs go back to the queue; nothing is lost.
            log.warning("worker_forced_exit", signal=signal.Signals(signum).name)
            os._exit(128 + signum)
        worker.consumer.call_threadsafe(worker.request_stop)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info(
        "worker_starting",
        worker=worker.name,
        queue=settings.jobs_queue,
        model_store=settings.model_store,
        result_store=settings.result_store,
        ort_providers=list(settings.providers),
        drain=drain,
    )
    worker.metrics.watch(worker)
    # Every job allocates a few short-lived objects, freed by reference counting; the cyclic collector
    # found nothing to free yet cost 7-9 % of a drain's CPU (a young-generation pass per few hundred
    # allocations, however high the threshold). It runs on a timer instead, over what lives then, and
    # the objects made at start (modules, schemas, sessions) are moved out of its sight.
    gc.freeze()
    gc.disable()
    collect_garbage(worker.consumer)
    server = start_metrics_server(worker.metrics, worker, settings.metrics_host, settings.metrics_port)
    try:
        counters = worker.run()
    finally:
        if server is not None:
            server.close()
    if counters.forced:
        raise ShutdownTimeout(
            f"in-flight work did not finish within INFERQ_SHUTDOWN_GRACE_S={settings.shutdown_grace_s:g}s; "
            "unacked jobs were returned to the queue"
        )
    return counters

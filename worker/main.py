"""The worker: receive → decode → batch → run → store → publish → ack.

The I/O loop's thread owns the broker connection and all of the state below; batches run on two
processing threads (one computing while the other stores), whose results come back through
:meth:`Consumer.call_threadsafe`. A delivery is acked only after its result is stored and the broker
confirmed the result's publish (ack last).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from types import FrameType

from model_store.cache import ModelCache
from model_store.registry import Registry
from model_store.stores import open_model_store
from shared.codec import Rejected, Undecodable, decode_job
from shared.errors import Expired, InferqError, JobError, StoreUnreachable
from shared.logging import get_logger
from shared.messages import Job
from shared.results import ResultStore, open_result_store
from shared.settings import WorkerSettings
from shared.topology import result_routing_key
from worker.batcher import Batch, Batcher
from worker.consumer import Consumer, Delivery
from worker.metrics import MeteredRegistry, WorkerMetrics, start_metrics_server
from worker.processor import ModelKey, Outcome, Pending, Processor
from worker.runner import Limits, LoadedModel, Watchdog, load_model

log = get_logger(__name__)
UNITS_IN_FLIGHT = 2
"""Units of work at the processing threads at once: one stores its results while the next runs."""
MODEL_STORE_RETRY_S = 1.0


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
    batches: int = 0
    started: float = field(default_factory=time.monotonic)
    first_job_at: float | None = None
    last_ack_at: float | None = None
    forced: bool = False


def worker_name() -> str:
    """``host:pid``, stamped on every result."""
    return f"{socket.gethostname()}:{os.getpid()}"


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
    ) -> None:
        self.settings = settings
        self.metrics = metrics if metrics is not None else WorkerMetrics()
        self.registry = registry
        self.drain = drain
        self.name = worker_name()
        self.counters = Counters()
        self.consumer = Consumer(settings, self, f"inferq-worker {self.name}")
        self._stopping = threading.Event()
        limits = Limits(settings.max_rows_per_job, settings.max_elements_per_tensor)
        self.processor = Processor(
            registry,
            store,
            limits,
            self.name,
            self._stopping,
            settings.store_retry_max_s,
            Watchdog(settings.job_timeout_s),
        )
        self._batcher: Batcher[ModelKey, Pending] = Batcher(
            settings.max_batch_rows, settings.max_wait_ms, time.monotonic
        )
        self._ready: list[Outcome] = []
        self._suspects: list[Pending] = []
        self._executor = ThreadPoolExecutor(max_workers=UNITS_IN_FLIGHT, thread_name_prefix="inferq-batch")
        self._units = 0  # units of work at the processing threads
        self._alone = False  # a suspect is running: nothing else may
        self._flush_timer: object | None = None
        self._unacked: deque[int] = deque()
        self._settled: dict[int, bool] = {}
        self._ack_upto: int | None = None
        self._ack_timer: object | None = None
        self._cancelled = False
        self._final_check = False

    # -- lifecycle --------------------------------------------------------------------------------

    def run(self) -> Counters:
        """Serve until stopped (or, with ``drain``, until the queue is empty)."""
        try:
            self.consumer.run()
        finally:
            # NOTE: after a forced stop the processing thread may be stuck in a batch; do not wait for it.
            self._executor.shutdown(wait=not self.counters.forced, cancel_futures=True)
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
        return len(self._unacked)

    def request_stop(self) -> None:
        """Graceful stop, on the I/O thread. The order matters: stop taking work (basic.cancel),
        finish the in-flight batch, store, publish, ack, and only then close the connection."""
        if self._stopping.is_set():
            return
        log.info("worker_stopping", in_flight=len(self._unacked), grace_s=self.settings.shutdown_grace_s)
        self._stopping.set()
        self.consumer.call_later(self.settings.shutdown_grace_s, self._grace_expired)
        self.consumer.cancel(self._after_cancel)

    def _grace_expired(self) -> None:
        # Out of time: close now. Whatever is unacked returns to the queue; nothing is lost, and a
        # redelivered job whose result was already stored is republished from the store, not rerun.
        log.error("worker_shutdown_grace_expired", in_flight=len(self._unacked))
        self.counters.forced = True
        self.consumer.stop()

    def _after_cancel(self) -> None:
        self._cancelled = True
        self._flush()
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if not self._idle():
            return
        if self._stopping.is_set():
            self.consumer.stop()
        elif self.drain and self._cancelled and not self._final_check:
            # Cancelled because the queue looked empty; jobs may have been requeued since.
            self._final_check = True
            self.consumer.queue_depth(self._after_final_depth)

    def _idle(self) -> bool:
        return not (
            self._unacked or self._units or self._batcher or self._ready or self._suspects or self._ack_upto is not None
        )

    # -- drain mode -------------------------------------------------------------------------------

    def on_consuming(self) -> None:
        self._cancelled = False
        if self.drain:
            self.consumer.call_later(self.settings.drain_poll_ms / 1000, self._drain_tick)

    def _drain_tick(self) -> None:
        if self._cancelled or self._stopping.is_set() or not self.consumer.ready:
            return
        if self._idle():
            self.consumer.queue_depth(self._after_depth)
        else:
            self.consumer.call_later(self.settings.drain_poll_ms / 1000, self._drain_tick)

    def _after_depth(self, ready_jobs: int) -> None:
        if ready_jobs == 0 and self._idle():
            # Deliveries sent before the cancel arrive before its confirmation: none can be missed.
            self.consumer.cancel(self._after_cancel)
        else:
            self.consumer.call_later(self.settings.drain_poll_ms / 1000, self._drain_tick)

    def _after_final_depth(self, ready_jobs: int) -> None:
        self._final_check = False
        if ready_jobs == 0:
            log.info("queue_drained", queue=self.settings.jobs_queue)
            self.consumer.stop()
        else:
            self.consumer.resume()

    # -- receive → decode → batch -----------------------------------------------------------------

    def on_delivery(self, delivery: Delivery, body: bytes) -> None:
        self.counters.received += 1
        if self.counters.first_job_at is None:
            self.counters.first_job_at = time.time()
        self._unacked.append(delivery.tag)
        if delivery.redelivered and not delivery.suspect:
            # This job was in flight when a worker died or lost its connection, perhaps because of
            # it. It moves to the retry queue, where it runs alone: a poison job takes only itself down.
            self.counters.quarantined += 1
            self.consumer.quarantine(delivery, body, partial(self._settle, delivery))
            return
        decoded = decode_job(body, delivery.message_id, self.settings.max_message_bytes)
        if isinstance(decoded, Undecodable):
            self._dead_letter(delivery, body, decoded.reason)
        elif isinstance(decoded, Rejected):
            self._ready.append(self.processor.failed(delivery, decoded, decoded.error))
        else:
            self._accept(delivery, decoded)
        self._schedule_flush(0.0)

    def _accept(self, delivery: Delivery, job: Job) -> None:
        if job.deadline is not None and job.deadline < datetime.now(UTC):
            error: JobError = Expired(f"deadline {job.deadline.isoformat()} passed before the job could run")
            self._ready.append(self.processor.failed(delivery, job, error))
            return
        try:
            version = self.registry.resolve(job.model, job.version)  # resolved at receipt
        except JobError as exc:
            self._ready.append(self.processor.failed(delivery, job, exc))
            return
        except StoreUnreachable as exc:
            self._retry_accept(delivery, job, exc)
            return
        pending = Pending(delivery, job, version)
        if delivery.suspect:
            self._suspects.append(pending)
        else:
            self._batcher.add((job.model, version), pending, job.rows)

    def _retry_accept(self, delivery: Delivery, job: Job, exc: StoreUnreachable) -> None:
        """The model store is unreachable and this model was never resolved: hold the job (unacked, so
        nothing is lost and no delivery attempt is spent) and try again shortly; give it back on stop."""
        if self._stopping.is_set():
            self._settle(delivery, ok=False)
            return
        log.warning("model_store_unreachable", job_id=job.id, model=job.model, error=str(exc))

        def again() -> None:
            if self.consumer.is_current(delivery):
                self._accept(delivery, job)
                self._schedule_flush(0.0)

        self.consumer.call_later(MODEL_STORE_RETRY_S, again)

    def _dead_letter(self, delivery: Delivery, body: bytes, reason: str) -> None:
        log.warning("job_dead_lettered", message_id=delivery.message_id, reason=reason)
        self.counters.dead_lettered += 1
        self.metrics.dead_lettered()
        self.consumer.dead_letter(delivery, body, reason, partial(self._settle, delivery))

    # -- batch → run → store (processing threads) -------------------------------------------------

    def _schedule_flush(self, delay_s: float) -> None:
        if self._flush_timer is None:
            self._flush_timer = self.consumer.call_later(delay_s, self._flush)

    def _flush(self) -> None:
        """Hand waiting work to a processing thread, if one is free and the work is due."""
        if self._flush_timer is not None:
            self.consumer.cancel_timer(self._flush_timer)
            self._flush_timer = None
        if self._alone or self._units >= UNITS_IN_FLIGHT:
            return  # more jobs gather meanwhile; a completion flushes again
        if self._suspects:
            if not self._units:  # a suspect runs alone: let the others finish first
                suspect = self._suspects.pop(0)
                batch = Batch((suspect.job.model, suspect.version), [suspect], suspect.job.rows)
                self._dispatch([batch], [], alone=True)
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
        future = self._executor.submit(self.processor.process, batches, ready)
        future.add_done_callback(
            lambda f: self.consumer.call_threadsafe(partial(self._on_processed, f, batches, ready))
        )

    # -- publish → ack (I/O thread) ---------------------------------------------------------------

    def _on_processed(
        self, future: Future[list[Outcome]], batches: list[Batch[ModelKey, Pending]], ready: list[Outcome]
    ) -> None:
        self._units -= 1
        self._alone = False
        try:
            outcomes = future.result()
        except Exception as exc:  # store unavailable while stopping, or a bug: nothing is acked
            log.error("batch_not_completed", error=f"{type(exc).__name__}: {exc}")
            for delivery in [i.delivery for b in batches for i in b.items] + [o.delivery for o in ready]:
                self._settle(delivery, ok=False)
        else:
            self.counters.batches += len(batches)
            self.metrics.observe_processed(batches, outcomes)
            for outcome in outcomes:
                if outcome.result.error is None:
                    self.counters.succeeded += 1
                else:
                    self.counters.failed += 1
                self.consumer.publish_result(
                    outcome.delivery,
                    outcome.result.id,
                    outcome.result.to_json(),
                    partial(self._settle, outcome.delivery),
                    routing_key=result_routing_key(outcome.result),
                )
        self._flush()
        self._maybe_finish()

    def _settle(self, delivery: Delivery, ok: bool) -> None:
        """A delivery is finished: its result (or dead letter) is confirmed, or it was handed back.
        Ack the longest finished prefix of deliveries with one ``multiple`` ack."""
        if not self.consumer.is_current(delivery):
            return  # from before a reconnect: the broker will redeliver it; never ack a stale tag
        if not ok:
            log.warning("job_requeued", message_id=delivery.message_id)
            self.consumer.requeue(delivery)
        self._settled[delivery.tag] = ok
        while self._unacked and self._unacked[0] in self._settled:
            tag = self._unacked.popleft()
            if self._settled.pop(tag):
                self._ack_upto = tag
        if self._ack_upto is not None and self._ack_timer is None:
            # Confirms arrive one by one; one ack for all of those read in this pass of the I/O loop.
            self._ack_timer = self.consumer.call_later(0, self._send_ack)
        self._maybe_finish()

    def _send_ack(self) -> None:
        self._ack_timer = None
        if self._ack_upto is not None:
            # NOTE: fewer, larger acks also matter for correctness: a quorum queue takes acks
            # asynchronously, and a burst of single acks just before the channel closes can be lost
            # (the jobs are redelivered, and their stored results republished).
            self.consumer.ack_through(self._ack_upto)
            self._ack_upto = None
            self.counters.last_ack_at = time.time()
        self._maybe_finish()

    def on_connection_lost(self) -> None:
        # Every unacked delivery returns to the queue; whatever was stored is republished from the
        # store when it comes back (redelivered jobs look there first).
        self._unacked.clear()
        self._settled.clear()
        self._ack_upto = None
        if self._ack_timer is not None:
            self.consumer.cancel_timer(self._ack_timer)
            self._ack_timer = None
        self._batcher.take_all()
        self._ready = []
        self._suspects = []
        if self._flush_timer is not None:
            self.consumer.cancel_timer(self._flush_timer)
            self._flush_timer = None


def build_worker(settings: WorkerSettings, *, drain: bool) -> Worker:
    """Wire a worker from settings: model store, registry, result store."""
    model_store = open_model_store(settings.model_store)
    metrics = WorkerMetrics()
    registry = MeteredRegistry(
        model_store,
        partial(load_model, intra_op_threads=settings.intra_op_threads),
        metrics=metrics,
        max_loaded=settings.max_loaded_models,
        refresh_s=settings.alias_refresh_s,
        cache=ModelCache(settings.model_cache, settings.max_model_bytes),
    )
    return Worker(settings, registry, open_result_store(settings.result_store), drain=drain, metrics=metrics)


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
        drain=drain,
    )
    worker.metrics.watch(worker)
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

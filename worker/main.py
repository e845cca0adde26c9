"""The worker: receive → decode → batch → run → store → publish → ack.

The I/O loop's thread owns the broker connection and all of the state below; batches run on one
processing thread, whose results come back through :meth:`Consumer.call_threadsafe`. A delivery is
acked only after its result is stored and the broker confirmed the result's publish (ack last).
"""

from __future__ import annotations

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
from shared.errors import Expired, JobError, StoreUnreachable
from shared.logging import get_logger
from shared.messages import Job
from shared.results import ResultStore, open_result_store
from shared.settings import WorkerSettings
from worker.batcher import Batch, Batcher
from worker.consumer import Consumer, Delivery
from worker.processor import ModelKey, Outcome, Pending, Processor
from worker.runner import Limits, LoadedModel, load_model

log = get_logger(__name__)
MODEL_STORE_RETRY_S = 1.0


@dataclass(slots=True)
class Counters:
    """What a worker did, for its final log line and for tests."""

    received: int = 0
    succeeded: int = 0
    failed: int = 0
    dead_lettered: int = 0
    batches: int = 0
    started: float = field(default_factory=time.monotonic)
    first_job_at: float | None = None
    last_ack_at: float | None = None


def worker_name() -> str:
    """``host:pid``, stamped on every result."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Worker:
    """One worker process's pipeline, driven by the consumer's events on the I/O thread."""

    def __init__(
        self, settings: WorkerSettings, registry: Registry[LoadedModel], store: ResultStore, *, drain: bool
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.drain = drain
        self.name = worker_name()
        self.counters = Counters()
        self.consumer = Consumer(settings, self, f"inferq-worker {self.name}")
        self._stopping = threading.Event()
        limits = Limits(settings.max_rows_per_job, settings.max_elements_per_tensor)
        self.processor = Processor(registry, store, limits, self.name, self._stopping, settings.store_retry_max_s)
        self._batcher: Batcher[ModelKey, Pending] = Batcher(
            settings.max_batch_rows, settings.max_wait_ms, time.monotonic
        )
        self._ready: list[Outcome] = []
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inferq-batch")
        self._busy = False
        self._flush_timer: object | None = None
        self._unacked: deque[int] = deque()
        self._settled: dict[int, bool] = {}
        self._cancelled = False
        self._final_check = False

    # -- lifecycle --------------------------------------------------------------------------------

    def run(self) -> Counters:
        """Serve until stopped (or, with ``drain``, until the queue is empty)."""
        try:
            self.consumer.run()
        finally:
            self._executor.shutdown(wait=True, cancel_futures=True)
        elapsed = time.monotonic() - self.counters.started
        log.info("worker_stopped", **_asdict(self.counters), elapsed_s=round(elapsed, 3))
        return self.counters

    @property
    def stopping(self) -> bool:
        """True once a graceful stop was requested."""
        return self._stopping.is_set()

    def request_stop(self) -> None:
        """Graceful stop, on the I/O thread. The order matters: stop taking work (basic.cancel),
        finish the in-flight batch, store, publish, ack, and only then close the connection."""
        if self._stopping.is_set():
            return
        log.info("worker_stopping", in_flight=len(self._unacked))
        self._stopping.set()
        self.consumer.cancel(self._after_cancel)

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
        return not self._unacked and not self._busy and not self._batcher and not self._ready

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
        self._batcher.add((job.model, version), Pending(delivery, job, version), job.rows)

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
        self.consumer.dead_letter(delivery, body, reason, partial(self._settle, delivery))

    # -- batch → run → store (processing thread) --------------------------------------------------

    def _schedule_flush(self, delay_s: float) -> None:
        if self._flush_timer is None:
            self._flush_timer = self.consumer.call_later(delay_s, self._flush)

    def _flush(self) -> None:
        """Hand waiting work to the processing thread, if it is free and the work is due."""
        if self._flush_timer is not None:
            self.consumer.cancel_timer(self._flush_timer)
            self._flush_timer = None
        if self._busy:
            return  # more jobs gather meanwhile; the completion flushes again
        due_in = self._batcher.due_in()
        if due_in is None and not self._ready:
            return
        if due_in and not self._ready and not self._stopping.is_set():
            self._schedule_flush(due_in)
            return
        batches, ready = self._batcher.take_all(), self._ready
        self._ready = []
        self._busy = True
        future = self._executor.submit(self.processor.process, batches, ready)
        future.add_done_callback(
            lambda f: self.consumer.call_threadsafe(partial(self._on_processed, f, batches, ready))
        )

    # -- publish → ack (I/O thread) ---------------------------------------------------------------

    def _on_processed(
        self, future: Future[list[Outcome]], batches: list[Batch[ModelKey, Pending]], ready: list[Outcome]
    ) -> None:
        self._busy = False
        try:
            outcomes = future.result()
        except Exception as exc:  # store unavailable while stopping, or a bug: nothing is acked
            log.error("batch_not_completed", error=f"{type(exc).__name__}: {exc}")
            for delivery in [i.delivery for b in batches for i in b.items] + [o.delivery for o in ready]:
                self._settle(delivery, ok=False)
        else:
            self.counters.batches += len(batches)
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
        last_ok = None
        while self._unacked and self._unacked[0] in self._settled:
            tag = self._unacked.popleft()
            if self._settled.pop(tag):
                last_ok = tag
        if last_ok is not None:
            self.consumer.ack_through(last_ok)
            self.counters.last_ack_at = time.time()
        self._maybe_finish()

    def on_connection_lost(self) -> None:
        # Every unacked delivery returns to the queue; whatever was stored is republished from the
        # store when it comes back (redelivered jobs look there first).
        self._unacked.clear()
        self._settled.clear()
        self._batcher.take_all()
        self._ready = []
        if self._flush_timer is not None:
            self.consumer.cancel_timer(self._flush_timer)
            self._flush_timer = None


def _asdict(counters: Counters) -> dict[str, int | float | None]:
    return {
        "first_job_at": counters.first_job_at,
        "last_ack_at": counters.last_ack_at,
        "received": counters.received,
        "succeeded": counters.succeeded,
        "failed": counters.failed,
        "dead_lettered": counters.dead_lettered,
        "batches": counters.batches,
    }


def build_worker(settings: WorkerSettings, *, drain: bool) -> Worker:
    """Wire a worker from settings: model store, registry, result store."""
    model_store = open_model_store(settings.model_store)
    registry: Registry[LoadedModel] = Registry(
        model_store,
        partial(load_model, intra_op_threads=settings.intra_op_threads),
        max_loaded=settings.max_loaded_models,
        refresh_s=settings.alias_refresh_s,
        cache=ModelCache(settings.model_cache, settings.max_model_bytes),
    )
    return Worker(settings, registry, open_result_store(settings.result_store), drain=drain)


def run_worker(settings: WorkerSettings, *, drain: bool = False) -> Counters:
    """Run a worker in this process until SIGTERM/SIGINT (or the queue is empty, with ``drain``)."""
    worker = build_worker(settings, drain=drain)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if worker.stopping:
            log.warning("worker_forced_exit", signal=signal.Signals(signum).name)
            os._exit(128 + signum)  # unacked jobs go back to the queue; nothing is lost
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
    return worker.run()

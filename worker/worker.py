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
5. What the worker hands back itself (held longer than the broker allows, or at a stop) goes back as a
   copy, acked once the copy is confirmed (:meth:`Worker._hand_back`): that spends none of the job's
   delivery attempts. What a lost connection returns is announced to every worker
   (:mod:`inferq.worker.absolution`), so that only a job in flight at crashes is suspected.

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
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum, auto
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
from inferq.shared.errors import Expired, InferqError, StoreRefused
from inferq.shared.results.base import ResultStore
from inferq.shared.results.stores import open_result_store
from inferq.worker.absolution import Absolutions, Return
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
"""A job returned this often before, not counting the returns announced as no fault of its own (lost
connections, channels the broker closed, stops past their grace), was in flight at two crashes: it moves
to the retry queue and runs alone there. Once is most likely innocent: it runs in an ordinary batch."""
VERDICT_WAIT_S = 5.0
"""How long a delivery that looks suspect waits for announcements of its returns still on their way
before it is quarantined: the worker that lost it announces once it has reconnected."""
HAND_BACK_AFTER = 0.5
"""A delivery unacked for this share of the broker's consumer timeout is handed back (as a copy): the
broker would close the whole channel at the full timeout, returning every delivery on it."""
SWEEPS_PER_HAND_BACK = 10
"""How often, per hand-back period, the worker looks for deliveries held too long."""
STOP_CLOSE_SHARE = 0.2
STOP_CLOSE_MAX_S = 2.0
"""Of a stop's grace time, the last part (this share, at most this long) is kept for closing the
connection and leaving; finishing in-flight work gets the rest."""


def stop_close_s(grace_s: float) -> float:
    """How much of a stop's ``grace_s`` is kept for closing and leaving."""
    return min(STOP_CLOSE_MAX_S, grace_s * STOP_CLOSE_SHARE)


class Verdict(Enum):
    """What a job returned before is taken for."""

    INNOCENT = auto()
    """Its unexplained returns are below the threshold: it runs in an ordinary batch."""
    SUSPECT = auto()
    """In flight at crashes: it moves to the retry queue and runs alone."""
    REFRESH = auto()
    """Innocent, but its count nears the delivery limit: it goes back as a fresh copy."""


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
    handed_back: int = 0
    """Deliveries returned as copies (held too long, refreshed, or at a stop): none spent an attempt."""
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
        self._acks: AckWindow[Delivery] = AckWindow()
        self._ack_timer: object | None = None
        # Jobs whose model (or stored result) cannot be read now: held, tried again in a second or as
        # soon as a fetch finished; on stop, handed back (another worker may reach the store).
        self._held: Waiting[Pending] = Waiting(
            self.consumer, self._acks, self._batch, lambda: HOLD_RETRY_S, self._hand_back, self._stopping.is_set
        )
        self._results = ResultPublisher(
            self.consumer,
            self._acks,
            self._finished,
            self._hand_back,
            self._stopping.is_set,
            self.counters.publish_refused,
        )
        # (Named apart from any other worker of this process: each must hear the others.)
        self._absolutions = Absolutions(
            self.consumer.announce, self.consumer.call_later, f"{self.name}/{uuid.uuid4().hex[:8]}"
        )
        self._hand_back_after_s = settings.broker_consumer_timeout_s * HAND_BACK_AFTER
        # An announced job whose count nears the delivery limit is refreshed (copied back, count 0) before
        # one more return (a crash, a lost connection) could make the broker dead-letter it.
        self._refresh_at = max(SUSPECT_DELIVERIES, settings.max_deliveries - 1)
        self._stop_deadline: float | None = None  # monotonic; set by request_stop
        self._undecided: list[tuple[Delivery, bytes]] = []  # look suspect: waiting for announcements
        self._verdict_timer: object | None = None

    # -- lifecycle --------------------------------------------------------------------------------

    def run(self) -> Counters:
        """Serve until stopped (or, in drain mode, until the queue is empty)."""
        self._schedule_sweep()
        try:
            self.consumer.run()
        finally:
            # Settled: only the last unit's drift counting may still run, and it is waited for. NOTE: not
            # after a forced stop or a failure: a thread may be stuck in a run or a store retry. A stop's
            # waits all end by its deadline.
            settled = not self._units and not self.counters.forced
            self._threads.close(self._stop_left_s(CLOSE_WAIT_S) if settled else 0.0)
            # Monitoring seam: the open window and the pending shadow pairs, so a short run shows at once.
            if self.processor.monitor is not None:
                self.processor.monitor.flush()
            if self.processor.shadow is not None:
                self.processor.shadow.finish(self._stop_left_s(self.settings.shutdown_grace_s))
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
        return self.consumer.ready and not self._stopping.is_set() and self.processor.refused is None

    @property
    def in_flight(self) -> int:
        """Deliveries received and not yet acked."""
        return len(self._acks)

    def request_stop(self) -> None:
        """Graceful stop, on the I/O thread. The order matters: stop taking work (basic.cancel),
        finish the in-flight batch, store, publish, ack, and only then close the connection. All of it
        within the grace time: its last part is kept for closing (:func:`stop_close_s`)."""
        if self._stopping.is_set():
            return
        grace_s = self.settings.shutdown_grace_s
        log.info("worker_stopping", in_flight=len(self._acks), grace_s=grace_s)
        self._stopping.set()
        self._stop_deadline = time.monotonic() + grace_s
        if not self.consumer.connected:
            # No channel: every unacked delivery is back in its queue already, and nothing can be acked.
            log.warning("worker_stopping_disconnected")
            self.consumer.stop()
            return
        close_s = stop_close_s(grace_s)
        self.consumer.call_later(grace_s - close_s, self._grace_expired)
        self.consumer.call_later(grace_s - close_s / 2, self._close_expired)
        self.consumer.cancel(self._after_settled)
        self._decide_now()  # those that look suspect are judged on what is known
        self._held.hand_back()  # another worker may reach their store
        self._results.hand_back()  # refused result publishes: stored, so another worker sends them
        self._flush()

    def _grace_expired(self) -> None:
        # Out of time: close now. Whatever is unacked returns to the queue; nothing is lost, and a
        # redelivered job whose result was already stored is republished from the store, not rerun.
        # Those returns are no fault of the jobs: announced first (the publish goes out before the close).
        log.error("worker_shutdown_grace_expired", in_flight=len(self._acks))
        self.counters.forced = True
        self._absolutions.lost(self._returns(), "stop")
        self._absolutions.send_unsent()
        self.consumer.stop()

    def _close_expired(self) -> None:
        # The broker did not answer the close in time (a node that went silent): leave without it.
        log.error("worker_close_timed_out")
        self.counters.forced = True
        self.consumer.abort()

    def _stop_left_s(self, at_most_s: float) -> float:
        """Time left before the stop's deadline (``at_most_s`` if no stop was requested)."""
        if self._stop_deadline is None:
            return at_most_s
        return max(0.0, min(at_most_s, self._stop_deadline - time.monotonic()))

    def _idle(self) -> bool:
        return not (
            self._acks
            or self._units
            or self._batcher
            or self._ready
            or self._suspects
            or self._undecided
            or self._ack_timer is not None
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

    def on_cancelled(self, queue: str) -> None:
        """The broker cancelled the consumer of ``queue`` (an operator deleted it, say). The consumer
        declares the queues again and consumes again, not ready meanwhile; the jobs already delivered from
        it finish as usual (acking them is harmless when their queue is gone). A drain starts its check
        over once consuming again, so a drain whose queue vanished still ends."""
        log.warning("consumer_cancelled_by_broker", queue=queue, in_flight=len(self._acks))

    def on_listening(self) -> None:
        self._absolutions.listening()  # what earlier sessions lost, announced to every worker

    def on_returns(self, body: bytes) -> None:
        self._absolutions.heard(body)

    # -- 1. receive → decode → batch --------------------------------------------------------------

    def on_delivery(self, delivery: Delivery, body: bytes) -> None:
        self.counters.received += 1
        if self.counters.first_job_at is None:
            self.counters.first_job_at = time.time()
        if delivery.epoch != self._acks.epoch:
            self._acks.reset(delivery.epoch)  # the first delivery of a new channel: its tags start over
        self._acks.received(delivery.epoch, delivery.tag, delivery)
        if delivery.delivery_count >= SUSPECT_DELIVERIES and self._returned_before(delivery, body):
            return
        self._accept(delivery, body)

    def _accept(self, delivery: Delivery, body: bytes) -> None:
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

    def _returned_before(self, delivery: Delivery, body: bytes) -> bool:
        """A job returned before: quarantined if it was in flight at two crashes, refreshed if announced
        returns brought it near the delivery limit. One that looks suspect first waits a few seconds for
        announcements still on their way (its loser may still be reconnecting). True when it was set aside."""
        verdict = self._verdict(delivery)
        if verdict is Verdict.SUSPECT and not self._stopping.is_set():
            self._acks.hold(delivery.epoch, delivery.tag)  # the deliveries after it are acked meanwhile
            self._undecided.append((delivery, body))
            if self._verdict_timer is None:
                self._verdict_timer = self.consumer.call_later(VERDICT_WAIT_S, self._decide)
            return True
        return self._act_on(verdict, delivery)

    def _decide(self) -> None:
        """The wait is over (or the worker stops): quarantine the suspects, take the others in."""
        self._verdict_timer = None
        undecided, self._undecided = self._undecided, []
        for delivery, body in undecided:
            if not self.consumer.is_current(delivery) or not self._acks.working(delivery.epoch, delivery.tag):
                continue
            self._acks.release(delivery.epoch, delivery.tag)
            if not self._act_on(self._verdict(delivery), delivery):
                self._accept(delivery, body)
        self._after_settled()

    def _decide_now(self) -> None:
        if self._verdict_timer is not None:
            self.consumer.cancel_timer(self._verdict_timer)
            self._verdict_timer = None
        if self._undecided:
            self._decide()

    def _verdict(self, delivery: Delivery) -> Verdict:
        count = delivery.delivery_count
        explained = self._absolutions.explained(delivery.message_id, delivery.copies, count)
        if count - explained >= SUSPECT_DELIVERIES and not delivery.suspect:
            return Verdict.SUSPECT
        if explained and count >= self._refresh_at:
            return Verdict.REFRESH
        return Verdict.INNOCENT

    def _act_on(self, verdict: Verdict, delivery: Delivery) -> bool:
        if verdict is Verdict.SUSPECT:
            # In flight at two crashes: perhaps it causes them. It moves to the retry queue and runs
            # alone there, so a poison job takes only itself down.
            count = delivery.delivery_count
            explained = self._absolutions.explained(delivery.message_id, delivery.copies, count)
            log.warning("job_quarantined", message_id=delivery.message_id, deliveries=count, explained=explained)
            self.counters.quarantined += 1
            self.consumer.quarantine(delivery, partial(self._finished, delivery))
            return True
        if verdict is Verdict.REFRESH:
            log.info("job_refreshed", message_id=delivery.message_id, deliveries=delivery.delivery_count)
            self._hand_back(delivery)
            return True
        return False

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
            self._not_completed(done, batches, ready)
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

    def _not_completed(
        self, error: BaseException, batches: list[Batch[ModelKey, Pending]], ready: list[Outcome]
    ) -> None:
        """A unit failed before its results were stored: its jobs return to the queue, none acked. A result
        store that refuses us (credentials, permission, a missing bucket or table) stops the worker: no
        retry helps, and the processor keeps the error for the exit (``run_worker``)."""
        log.error("batch_not_completed", error=f"{type(error).__name__}: {error}")
        if isinstance(error, StoreRefused):
            # Stopping first: the jobs then go back as copies, spending none of their delivery attempts, so
            # a worker restarted again and again against a refused store never dead-letters them.
            self.request_stop()
        for delivery in [i.delivery for b in batches for i in b.items] + [o.delivery for o in ready]:
            self._finished(delivery, ok=False)
        if self.processor.shadow is not None:  # shadow seam: these jobs return to the queue
            self.processor.shadow.discard()

    def _count(self, outcome: Outcome) -> None:
        if not outcome.counted:
            self.counters.reused += 1
        elif outcome.result.error is None:
            self.counters.succeeded += 1
        else:
            self.counters.failed += 1

    # -- 4. ack (I/O thread) ----------------------------------------------------------------------

    def _finished(self, delivery: Delivery, ok: bool) -> None:
        """A delivery is done: its result (or dead letter) is confirmed, or it must go back to the queue
        (a nack, which spends one of its delivery attempts; while stopping it goes back as a copy)."""
        if not ok and self._stopping.is_set():
            self._hand_back(delivery)  # a stop is no fault of the job's
            return
        if not self._acks.finished(delivery.epoch, delivery.tag, ok):
            return  # from before a reconnect: the broker will redeliver it; never ack a stale tag
        if not ok:
            log.warning("job_requeued", message_id=delivery.message_id)
            self.consumer.requeue(delivery)
        self._schedule_acks()

    def _hand_back(self, delivery: Delivery) -> None:
        """Return a delivery to its queue without spending one of its attempts: a copy is published (with
        a confirm) and the delivery acked once the copy is in; a refused copy falls back to a nack."""
        if self._acks.hand_over(delivery.epoch, delivery.tag):  # not when finished, or of an earlier channel
            self.counters.handed_back += 1
            self.consumer.resend(delivery, partial(self._handed_back, delivery))

    def _handed_back(self, delivery: Delivery, ok: bool) -> None:
        if not self._acks.handed_over(delivery.epoch, delivery.tag, ok):
            return  # its channel is gone: the broker returns it by itself
        if not ok:
            log.warning("job_requeued", message_id=delivery.message_id, reason="copy refused")
            self.consumer.requeue(delivery)
        self._schedule_acks()

    def _schedule_sweep(self) -> None:
        every_s = self._hand_back_after_s / SWEEPS_PER_HAND_BACK
        self.consumer.call_later(every_s, self._hand_back_overdue)

    def _hand_back_overdue(self) -> None:
        """Hand back every delivery held longer than half the broker's consumer timeout, whatever holds it
        (an unreachable store, refused result publishes): at the full timeout the broker would close the
        channel and return every delivery on it, each spending an attempt. Whatever was under way for it
        goes on; its result, if it comes, is stored and published, and the copy republishes it."""
        self._schedule_sweep()
        cutoff_ms = (time.time() - self._hand_back_after_s) * 1000
        overdue = []
        for delivery in self._acks.working_items():  # oldest first
            if delivery.received_ms > cutoff_ms:
                break
            overdue.append(delivery)
        if overdue:
            log.warning("jobs_held_too_long", jobs=len(overdue), held_s=round(self._hand_back_after_s, 1))
        for delivery in overdue:
            self._hand_back(delivery)

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
        # finishes, and its publishes are refused as stale. None of these returns is the jobs' fault:
        # they are announced to every worker once connected again.
        returns = self._returns()
        self._acks.reset(epoch=-1)  # no channel: nothing may be acked until the next one consumes
        if self.drain is not None and not self._stopping.is_set():
            self.consumer.resume()  # a drain's cancel does not outlive its channel; a stop's does
        if self._ack_timer is not None:
            self.consumer.cancel_timer(self._ack_timer)
            self._ack_timer = None
        self._batcher.take_all()
        self._ready = []
        self._suspects = []
        self._undecided = []
        self._decide_now()
        self._held.forget()
        self._results.forget()
        if self._flush_timer is not None:
            self.consumer.cancel_timer(self._flush_timer)
            self._flush_timer = None
        if self._stopping.is_set():
            # Nothing left to wait for: everything unacked went back to the queue with the connection.
            log.warning("worker_stop_connection_lost", returned=len(returns))
            self.consumer.stop()
            return
        self._absolutions.lost(returns, "connection lost")

    def _returns(self) -> list[Return]:
        """Every unacked delivery, returned by the broker when this channel goes (with its count then)."""
        return [(d.message_id, d.copies, d.delivery_count) for d in self._acks.unacked() if d.message_id]


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


class StopSignals:
    """SIGTERM and SIGINT for a worker process: the first stops it gracefully, and the process exits at
    the stop's deadline whatever it is doing then; a second one exits at once. Unacked jobs go back to
    the queue either way; nothing is lost.

    NOTE: read on a thread of their own, from the interpreter's wakeup pipe. A Python signal handler runs
    only when the main thread next runs Python code, and the kernel may deliver the signal to another
    thread while the main thread sleeps in the I/O loop's poll (or is busy in a long call): a forced exit
    that waits for the main thread can come seconds late, or not at all."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self._received = 0

    def install(self) -> None:
        """Route SIGTERM and SIGINT here (call from the main thread)."""
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)  # the interpreter's C handler must never block on it
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, _noted)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        threading.Thread(target=self._serve, args=(read_fd,), name="inferq-signals", daemon=True).start()

    def _serve(self, read_fd: int) -> None:
        while data := os.read(read_fd, 64):
            for signum in data:  # one byte per signal: its number
                if signum in (signal.SIGTERM, signal.SIGINT):
                    self._on_signal(signum)

    def _on_signal(self, signum: int) -> None:
        self._received += 1
        if self._received > 1:
            log.warning("worker_forced_exit", signal=signal.Signals(signum).name)
            os._exit(128 + signum)
        self._worker.consumer.call_threadsafe(self._worker.request_stop)
        deadline = threading.Timer(self._worker.settings.shutdown_grace_s, self._deadline)
        deadline.daemon = True
        deadline.start()

    def _deadline(self) -> None:
        # The stop's own timers close and leave before this; this is for a main thread that cannot.
        log.error("worker_stop_deadline", grace_s=self._worker.settings.shutdown_grace_s)
        os._exit(1)


def _noted(_signum: int, _frame: FrameType | None) -> None:
    """The Python-level handler: nothing to do here, the signal's number went to the wakeup pipe."""


def run_worker(settings: WorkerSettings, *, drain: bool = False) -> Counters:
    """Run a worker in this process until SIGTERM/SIGINT (or the queue is empty, with ``drain``)."""
    worker = build_worker(settings, drain=drain)
    StopSignals(worker).install()
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
    if worker.processor.refused is not None:  # the result store refuses us: `inferq worker` exits 2
        raise worker.processor.refused
    if counters.forced:
        raise ShutdownTimeout(
            f"in-flight work did not finish within INFERQ_SHUTDOWN_GRACE_S={settings.shutdown_grace_s:g}s; "
            "unacked jobs were returned to the queue"
        )
    return counters

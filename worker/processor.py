"""The worker's processing threads: run each batch (one onnxruntime call per model version), turn every
outcome into a result, and store the results. Nothing here touches the broker."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from model_store.registry import Registry
from shared.amqp import Backoff
from shared.codec import Rejected
from shared.errors import ErrorCode, JobError
from shared.logging import get_logger
from shared.messages import ErrorInfo, Job, Result, Status, Tensor, Timings
from shared.results import ResultStore
from worker.batcher import Batch
from worker.consumer import Delivery
from worker.runner import Arrays, Limits, LoadedModel, Watchdog, prepare_inputs, run_isolating

log = get_logger(__name__)

ModelKey = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Pending:
    """A decoded job waiting for its batch, with the concrete version it resolved to at receipt."""

    delivery: Delivery
    job: Job
    version: int


@dataclass(frozen=True, slots=True)
class Outcome:
    """A delivery and its one result."""

    delivery: Delivery
    result: Result


class StoreUnavailable(Exception):
    """The result store kept failing until the worker was told to stop."""


def _timings(delivery: Delivery, inference_ms: float | None) -> Timings:
    now_ms = time.time() * 1000
    start_ms = delivery.published_ms if delivery.published_ms is not None else delivery.received_ms
    queue_ms = delivery.received_ms - delivery.published_ms if delivery.published_ms is not None else None
    return Timings(
        queue_ms=None if queue_ms is None else round(max(queue_ms, 0.0), 3),
        inference_ms=None if inference_ms is None else round(inference_ms, 3),
        total_ms=round(max(now_ms - start_ms, 0.0), 3),
    )


class Processor:
    """Runs batches and stores their results; called from the worker's processing threads."""

    def __init__(
        self,
        registry: Registry[LoadedModel],
        store: ResultStore,
        limits: Limits,
        worker_name: str,
        stopping: threading.Event,
        retry_max_s: float,
        watchdog: Watchdog | None = None,
    ) -> None:
        self.registry = registry
        self.store = store
        self.limits = limits
        self.worker_name = worker_name
        self._stopping = stopping
        self._retry_max_s = retry_max_s
        self.watchdog = watchdog
        self._compute = threading.Lock()

    # -- results ----------------------------------------------------------------------------------

    def failed(self, delivery: Delivery, job: Job | Rejected, error: JobError) -> Outcome:
        """The one failed (or expired) result of a job that cannot run."""
        if isinstance(job, Rejected):
            job_id, model, requested = job.job_id, job.model, job.requested_version
        else:
            job_id, model, requested = job.id, job.model, job.version
        status = Status.EXPIRED if error.code is ErrorCode.EXPIRED else Status.FAILED
        log.info("job_failed", job_id=job_id, model=model, code=str(error.code), error=str(error))
        result = Result(
            id=job_id,
            model=model,
            requested_version=requested,
            status=status,
            error=ErrorInfo(code=error.code, message=str(error)),
            worker=self.worker_name,
            timings=_timings(delivery, None),
        )
        return Outcome(delivery, result)

    def _succeeded(self, item: Pending, sha256: str, outputs: list[Tensor], inference_ms: float) -> Outcome:
        result = Result.model_construct(
            id=item.job.id,
            model=item.job.model,
            requested_version=item.job.version,
            version=item.version,
            model_sha256=sha256,
            status=Status.SUCCEEDED,
            outputs=outputs,
            error=None,
            worker=self.worker_name,
            timings=_timings(item.delivery, inference_ms),
        )
        return Outcome(item.delivery, result)

    # -- the story: run, then store ---------------------------------------------------------------

    def process(self, batches: Sequence[Batch[ModelKey, Pending]], ready: list[Outcome]) -> list[Outcome]:
        """Results for every job of ``batches`` plus the ``ready`` ones, all stored when this returns."""
        computed = list(ready)
        reused: list[Outcome] = []
        # One unit computes at a time (the CPU is the limit, and the watchdog guards one run); the
        # other unit meanwhile stores its results, which waits on the disk or the network.
        with self._compute:
            for batch in batches:
                fresh = self._reuse_stored(batch.items, reused)
                if fresh:
                    computed.extend(self._run(batch.key, fresh))
        return self._store(computed) + reused

    def _reuse_stored(self, items: list[Pending], reused: list[Outcome]) -> list[Pending]:
        """A redelivered job may have finished before a crash: republish its stored result instead of
        computing a second, possibly different one."""
        fresh = []
        for item in items:
            if item.delivery.maybe_done_before and self.store.exists(item.job.id):
                reused.append(Outcome(item.delivery, self.store.get(item.job.id)))
                log.info("job_result_reused", job_id=item.job.id)
            else:
                fresh.append(item)
        return fresh

    def _run(self, key: ModelKey, items: list[Pending]) -> list[Outcome]:
        name, version = key
        try:
            manifest, model = self.registry.get(name, version)
        except JobError as error:
            return [self.failed(i.delivery, i.job, error) for i in items]
        outcomes: list[Outcome] = []
        runnable: list[tuple[Pending, Arrays]] = []
        for item in items:
            try:
                runnable.append((item, prepare_inputs(item.job, manifest, self.limits)))
            except JobError as error:
                outcomes.append(self.failed(item.delivery, item.job, error))
        if not runnable:
            return outcomes
        started = time.perf_counter()
        results = run_isolating(model, [arrays for _, arrays in runnable], self.watchdog)
        inference_ms = (time.perf_counter() - started) * 1000
        for (item, _), result in zip(runnable, results, strict=True):
            if isinstance(result, JobError):
                outcomes.append(self.failed(item.delivery, item.job, result))
            else:
                outcomes.append(self._succeeded(item, manifest.sha256, result, inference_ms))
        log.info("batch_done", model=name, version=version, jobs=len(runnable), inference_ms=round(inference_ms, 3))
        return outcomes

    def _store(self, outcomes: list[Outcome]) -> list[Outcome]:
        """Store every result, retrying a failing store with backoff until it works or we must stop.
        Where the id already had a result (the job ran twice), that earlier result is what goes out."""
        backoff = Backoff(cap_s=self._retry_max_s)
        while True:
            try:
                stored = self.store.put_many([o.result for o in outcomes])
                return [o if s is o.result else Outcome(o.delivery, s) for o, s in zip(outcomes, stored, strict=True)]
            except OSError as exc:
                if self._stopping.is_set():
                    raise StoreUnavailable(f"result store {self.store.describe()} unavailable: {exc}") from exc
                delay = backoff.next_delay()
                log.warning("result_store_unavailable", error=str(exc), retry_in_s=round(delay, 2))
                self._stopping.wait(delay)

"""The worker's processing thread: for each batch, resolve the model version, reuse results stored
before, run one onnxruntime call, encode each result once, and store them all. Nothing here touches
the broker; nothing here sleeps on behalf of one model while others wait."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import orjson

from model_store.registry import Registry
from shared.amqp import Backoff
from shared.codec import Rejected
from shared.errors import ErrorCode, JobError, StoreUnreachable
from shared.logging import get_logger
from shared.messages import ErrorInfo, Job, OutputTensor, Result, Status, Timings, trusted
from shared.results import ResultStore
from worker.batcher import Batch
from worker.consumer import Delivery
from worker.runner import Arrays, Limits, LoadedModel, Watchdog, prepare_inputs, run_isolating

log = get_logger(__name__)

ModelKey = tuple[str, int | str]
"""A batch's key: the model and the version reference its jobs asked for (resolved when it runs)."""
ID_CONFLICT = "id_conflict"


@dataclass(frozen=True, slots=True)
class Pending:
    """A decoded job waiting for its batch."""

    delivery: Delivery
    job: Job


@dataclass(frozen=True, slots=True)
class Outcome:
    """A delivery and its one result; ``counted`` is false for a result stored earlier and sent again."""

    delivery: Delivery
    result: Result
    counted: bool = True


@dataclass(frozen=True, slots=True)
class Rejection:
    """A job that goes to the dead-letter queue with ``reason`` (its id answers another job)."""

    delivery: Delivery
    reason: str


@dataclass(frozen=True, slots=True)
class BatchRun:
    """One onnxruntime call, for the metrics."""

    model: str
    rows: int
    seconds: float


@dataclass(slots=True)
class Processed:
    """What one unit of work came to: results to publish, jobs to dead-letter, jobs to hold and retry."""

    outcomes: list[Outcome] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    held: list[Pending] = field(default_factory=list)
    runs: list[BatchRun] = field(default_factory=list)


class StoreUnavailable(Exception):
    """The result store kept failing until the worker was told to stop."""


def job_digest(job: Job) -> str:
    """SHA-256 of what a job asks for (model, requested version, inputs, parameters), not of its id."""
    inputs = [(t.name, t.shape, str(t.datatype), t.data) for t in job.inputs]
    material = orjson.dumps([job.model, job.version, inputs, job.parameters], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(material).hexdigest()


def _timings(delivery: Delivery, inference_ms: float | None) -> Timings:
    now_ms = time.time() * 1000
    published = delivery.published_ms
    start_ms = published if published is not None else delivery.received_ms
    queue_ms = None if published is None else round(max(delivery.received_ms - published, 0.0), 3)
    return trusted(
        Timings,
        queue_ms=queue_ms,
        inference_ms=None if inference_ms is None else round(inference_ms, 3),
        total_ms=round(max(now_ms - start_ms, 0.0), 3),
    )


class Processor:
    """Runs units of work and stores their results; called from the worker's processing thread."""

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
        # With more than one processing thread, one runs onnxruntime at a time (the watchdog guards one
        # run); nothing that waits on I/O happens under this lock.
        self._compute = threading.Lock()

    # -- results ----------------------------------------------------------------------------------

    def failed(self, delivery: Delivery, job: Job | Rejected, error: JobError) -> Outcome:
        """The one failed (or expired) result of a job that cannot run."""
        if isinstance(job, Rejected):
            job_id, model, requested, digest = job.job_id, job.model, job.requested_version, None
        else:
            job_id, model, requested, digest = job.id, job.model, job.version, job_digest(job)
        status = Status.EXPIRED if error.code is ErrorCode.EXPIRED else Status.FAILED
        log.info("job_failed", job_id=job_id, model=model, code=str(error.code), error=str(error))
        result = Result(
            id=job_id,
            model=model,
            requested_version=requested,
            job_sha256=digest,
            status=status,
            error=ErrorInfo(code=error.code, message=str(error)),
            worker=self.worker_name,
            timings=_timings(delivery, None),
        )
        return Outcome(delivery, result)

    def _succeeded(
        self, item: Pending, version: int, sha256: str, outputs: list[OutputTensor], inference_ms: float
    ) -> Outcome:
        # Built without validation and encoded once with orjson: this runs for every job, and pydantic
        # would cost more than everything else the worker does per job together.
        job, timings = item.job, _timings(item.delivery, inference_ms)
        digest = job_digest(job)
        wire = orjson.dumps(
            {
                "id": job.id,
                "model": job.model,
                "requested_version": job.version,
                "version": version,
                "model_sha256": sha256,
                "job_sha256": digest,
                "status": "succeeded",
                "outputs": [t.__dict__ for t in outputs],
                "error": None,
                "worker": self.worker_name,
                "timings": timings.__dict__,
            }
        )
        result = Result.encoded(
            wire,
            id=job.id,
            model=job.model,
            requested_version=job.version,
            version=version,
            model_sha256=sha256,
            job_sha256=digest,
            status=Status.SUCCEEDED,
            outputs=outputs,
            error=None,
            worker=self.worker_name,
            timings=timings,
        )
        return Outcome(item.delivery, result)

    # -- the story: resolve, reuse, run, store ----------------------------------------------------

    def process(self, batches: Sequence[Batch[ModelKey, Pending]], ready: list[Outcome]) -> Processed:
        """Results for every job of ``batches`` plus the ``ready`` ones, all stored when this returns;
        jobs whose model or stored result cannot be read now come back in ``held``."""
        done = Processed(outcomes=list(ready))
        for batch in batches:
            self._process_batch(batch, done)
        self._store(done)
        return done

    def _process_batch(self, batch: Batch[ModelKey, Pending], done: Processed) -> None:
        name, ref = batch.key
        try:
            version = self.registry.resolve(name, ref)
            fresh = self._reuse_stored(batch.items, done)
            if fresh:
                manifest, model = self.registry.get(name, version)
                self._run(fresh, version, manifest.sha256, model, done)
        except JobError as error:
            done.outcomes.extend(self.failed(i.delivery, i.job, error) for i in batch.items)
        except StoreUnreachable as exc:
            log.warning("model_store_unreachable", model=name, version=str(ref), jobs=len(batch.items), error=str(exc))
            done.held.extend(batch.items)

    def _reuse_stored(self, items: list[Pending], done: Processed) -> list[Pending]:
        """A redelivered job may have finished before a crash: send its stored result again instead of
        computing a second, possibly different one. A job whose store cannot answer now is held."""
        fresh = []
        for item in items:
            if not item.delivery.maybe_done_before:
                fresh.append(item)
                continue
            try:
                stored = self.store.get(item.job.id) if self.store.exists(item.job.id) else None
            except OSError as exc:
                log.warning("result_store_unavailable", job_id=item.job.id, error=str(exc))
                done.held.append(item)
                continue
            if stored is None:
                fresh.append(item)
            else:
                self._answer_with_stored(item, stored, done)
        return fresh

    def _answer_with_stored(self, item: Pending, stored: Result, done: Processed) -> None:
        if stored.job_sha256 is not None and stored.job_sha256 != job_digest(item.job):
            log.warning("job_id_conflict", job_id=item.job.id)
            done.rejections.append(Rejection(item.delivery, ID_CONFLICT))
        else:
            log.info("job_result_reused", job_id=item.job.id)
            done.outcomes.append(Outcome(item.delivery, stored, counted=False))

    def _run(self, items: list[Pending], version: int, sha256: str, model: LoadedModel, done: Processed) -> None:
        runnable: list[tuple[Pending, Arrays]] = []
        for item in items:
            try:
                runnable.append((item, prepare_inputs(item.job, model.manifest, self.limits)))
            except JobError as error:
                done.outcomes.append(self.failed(item.delivery, item.job, error))
        if not runnable:
            return
        with self._compute:
            started = time.perf_counter()
            results = run_isolating(model, [arrays for _, arrays in runnable], self.watchdog)
            seconds = time.perf_counter() - started
        for (item, _), result in zip(runnable, results, strict=True):
            if isinstance(result, JobError):
                done.outcomes.append(self.failed(item.delivery, item.job, result))
            else:
                done.outcomes.append(self._succeeded(item, version, sha256, result, seconds * 1000))
        rows = sum(item.job.rows for item, _ in runnable)
        done.runs.append(BatchRun(model.manifest.name, rows, seconds))
        log.info(
            "batch_done",
            model=model.manifest.name,
            version=version,
            jobs=len(runnable),
            inference_ms=round(seconds * 1000, 3),
        )

    def _store(self, done: Processed) -> None:
        """Store every new result, retrying a failing store with backoff until it works or we must stop.
        Where the id already had a result, that one goes out instead; if it answers another job (its
        digest differs), this job is dead-lettered as an id conflict."""
        fresh = [o for o in done.outcomes if o.counted]
        if not fresh:
            return
        stored = self._put_many([o.result for o in fresh])
        replaced = {id(o): s for o, s in zip(fresh, stored, strict=True) if s is not o.result}
        if not replaced:
            return
        kept: list[Outcome] = []
        for outcome in done.outcomes:
            earlier = replaced.get(id(outcome))
            if earlier is None:
                kept.append(outcome)
            elif earlier.job_sha256 is not None and earlier.job_sha256 != outcome.result.job_sha256:
                log.warning("job_id_conflict", job_id=outcome.result.id)
                done.rejections.append(Rejection(outcome.delivery, ID_CONFLICT))
            else:
                kept.append(Outcome(outcome.delivery, earlier, counted=False))
        done.outcomes = kept

    def _put_many(self, results: list[Result]) -> list[Result]:
        backoff = Backoff(cap_s=self._retry_max_s)
        while True:
            try:
                return self.store.put_many(results)
            except OSError as exc:
                if self._stopping.is_set():
                    raise StoreUnavailable(f"result store {self.store.describe()} unavailable: {exc}") from exc
                delay = backoff.next_delay()
                log.warning("result_store_unavailable", error=str(exc), retry_in_s=round(delay, 2))
                self._stopping.wait(delay)

"""The worker's processing thread: for each batch, resolve the model version, reuse results stored
before, run one onnxruntime call, encode each result once, and store them all. Nothing here touches
the broker; nothing here sleeps on behalf of one model while others wait."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydantic import ValidationError

from inferq.model_store.manifest import Manifest
from inferq.monitoring.counting import Monitor
from inferq.monitoring.shadow_traffic import Shadow
from inferq.shared.broker.amqp import Backoff
from inferq.shared.config.logging import get_logger
from inferq.shared.contract.codec import Rejected, describe_validation_error
from inferq.shared.contract.messages import (
    ErrorInfo,
    Job,
    OutputTensor,
    Result,
    Status,
    Tensor,
    Timings,
    job_digest,
    trusted,
)
from inferq.shared.errors import ErrorCode, JobError, ResultRefused, StoreError, StoreRefused, ValueRefused
from inferq.shared.results.base import ResultStore, rejects_another
from inferq.worker.alias_guard import AliasGuards
from inferq.worker.batcher import Batch
from inferq.worker.consumer import Delivery
from inferq.worker.fetcher import ModelFetcher
from inferq.worker.runner import Arrays, Feed, Limits, LoadedModel, Watchdog, check_inputs, run_isolating, stack_inputs

log = get_logger(__name__)

ModelKey = tuple[str, int | str]
"""A batch's key: the model and the version reference its jobs asked for (resolved when it runs)."""
ID_CONFLICT = "id_conflict"
"""Dead-letter reason: the job's id already has a result, of another job (its digest differs)."""
STORED_RESULT_UNREADABLE = "stored_result_unreadable"
"""Dead-letter reason: a result is stored for the job's id but cannot be read back."""


@dataclass(slots=True, eq=False)
class Pending:
    """A decoded job waiting for its batch (read-only by convention, like :class:`Delivery`)."""

    delivery: Delivery
    job: Job


@dataclass(slots=True, eq=False)
class Outcome:
    """A delivery and its one result; ``counted`` is false for a result stored earlier and sent again
    (read-only by convention, like :class:`Delivery`)."""

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


@dataclass(frozen=True, slots=True)
class Observed:
    """A batch that ran on a version with a reference: counted for drift once its results are stored."""

    manifest: Manifest
    deliveries: list[Delivery]
    inputs: Sequence[Arrays]
    """Each job's inputs (a :class:`Feed`: the batch's stacked rows)."""
    results: list[object]


@dataclass(slots=True)
class Processed:
    """What one unit of work came to: results to publish, jobs to dead-letter, jobs to hold and retry."""

    outcomes: list[Outcome] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    held: list[Pending] = field(default_factory=list)
    runs: list[BatchRun] = field(default_factory=list)
    observed: list[Observed] = field(default_factory=list)
    fetched: int = 0
    """The model fetcher's count of finished fetches when the unit began."""


class StoreUnavailable(Exception):
    """The result store kept failing until the worker was told to stop."""


def _timings(delivery: Delivery, inference_ms: float | None, now_ms: float | None = None) -> Timings:
    if now_ms is None:
        now_ms = time.time() * 1000
    published, received = delivery.published_ms, delivery.received_ms
    if published is None:
        published, queue_ms = received, None
    else:
        queue_ms = round(received - published, 3) if received > published else 0.0
    total_ms = round(now_ms - published, 3) if now_ms > published else 0.0
    return trusted(
        Timings,
        queue_ms=queue_ms,
        inference_ms=None if inference_ms is None else round(inference_ms, 3),
        total_ms=total_ms,
    )


class Processor:
    """Runs units of work and stores their results; called from the worker's processing thread."""

    def __init__(
        self,
        models: ModelFetcher,
        store: ResultStore,
        limits: Limits,
        worker_name: str,
        stopping: threading.Event,
        retry_max_s: float,
        watchdog: Watchdog | None = None,
        monitor: Monitor | None = None,
        shadow: Shadow | None = None,
    ) -> None:
        self.models = models
        self.store = store
        self.limits = limits
        self.worker_name = worker_name
        self._stopping = stopping
        self._retry_max_s = retry_max_s
        self.watchdog = watchdog
        self.monitor = monitor
        self.shadow = shadow
        self.guards = AliasGuards(models.registry, worker_name, labels=store.labels)
        # With more than one processing thread, one runs onnxruntime at a time (the watchdog guards one
        # run); nothing that waits on I/O happens under this lock.
        self._compute = threading.Lock()
        self.refused: StoreRefused | None = None
        """Set once the result store refused us for good: no unit runs after that, the worker stops."""

    # -- results ----------------------------------------------------------------------------------

    def failed(
        self,
        delivery: Delivery,
        job: Job | Rejected,
        error: JobError,
        *,
        version: int | None = None,
        sha256: str | None = None,
    ) -> Outcome:
        """The one failed (or expired) result of a job that cannot run; ``version`` is the version its
        request resolved to, when it got that far (the alias guards and the reports count it there)."""
        if isinstance(job, Rejected):
            # The digest of the message as it arrived: a corrected job sent under the same id is another job.
            job_id, model, requested, digest = job.job_id, job.model, job.requested_version, job.body_sha256
        else:
            job_id, model, requested, digest = job.id, job.model, job.version, job_digest(job)
        status = Status.EXPIRED if error.code is ErrorCode.EXPIRED else Status.FAILED
        log.info("job_failed", job_id=job_id, model=model, version=version, code=str(error.code), error=str(error))
        result = Result(
            id=job_id,
            model=model,
            requested_version=requested,
            version=version,
            model_sha256=sha256,
            job_sha256=digest,
            status=status,
            error=ErrorInfo(code=error.code, message=str(error)),
            worker=self.worker_name,
            timings=_timings(delivery, None),
        )
        return Outcome(delivery, result)

    def _succeeded(
        self, item: Pending, version: int, sha256: str, outputs: list[OutputTensor], inference_ms: float, now_ms: float
    ) -> Outcome:
        # Built without validation and encoded once with orjson, from one dict that also becomes the
        # result's fields: this runs for every job, and pydantic would cost more than everything else
        # the worker does per job together.
        job = item.job
        result = Result.encoded(
            {
                "id": job.id,
                "model": job.model,
                "requested_version": job.version,
                "version": version,
                "model_sha256": sha256,
                "job_sha256": job_digest(job),
                "status": Status.SUCCEEDED,
                "outputs": outputs,
                "error": None,
                "worker": self.worker_name,
                "timings": _timings(item.delivery, inference_ms, now_ms),
            }
        )
        return Outcome(item.delivery, result)

    # -- the story: resolve, reuse, run, store ----------------------------------------------------

    def process(self, batches: Sequence[Batch[ModelKey, Pending]], ready: list[Outcome]) -> Processed:
        """Results for every job of ``batches`` plus the ``ready`` ones, all stored when this returns;
        jobs whose model or stored result cannot be read now come back in ``held``. Drift is counted
        afterwards, by :meth:`observe`, once the results are on their way. Raises :class:`StoreRefused`
        once the result store refused us (then at once, for every later unit)."""
        if self.refused is not None:
            raise self.refused
        done = Processed(outcomes=list(ready), fetched=self.models.fetched)
        try:
            for batch in batches:
                self._process_batch(batch, done)
            self._store(done)
        except StoreRefused as exc:
            log.error("result_store_refused", store=self.store.describe(), error=str(exc))
            self.refused = exc
            raise
        # Alias guards seam: stored results of jobs resolved through a guarded alias count towards its guard.
        self.guards.tally(o.result for o in done.outcomes if o.counted)
        return done

    def _process_batch(self, batch: Batch[ModelKey, Pending], done: Processed) -> None:
        name, ref = batch.key
        try:
            ready = self.models.lookup(name, ref)
        except JobError as error:
            version = self.models.resolved(name, ref)  # a version that fails to load, say
            done.outcomes.extend(self.failed(i.delivery, i.job, error, version=version) for i in batch.items)
            return
        if ready is None:  # being fetched from the model store: these jobs wait, the others go on
            done.held.extend(batch.items)
            return
        version, manifest, model = ready
        fresh = self._reuse_stored(batch.items, done)
        if fresh:
            self._run(fresh, version, manifest.sha256, model, done)

    def _reuse_stored(self, items: list[Pending], done: Processed) -> list[Pending]:
        """A redelivered job may have finished before a crash: send its stored result again instead of
        computing a second, possibly different one. One read of the store for the batch; if the store
        cannot answer now, those jobs are held and the others go on."""
        maybe = [i for i in items if i.delivery.maybe_done_before]
        if not maybe:
            return items
        try:
            stored = self.store.get_many([i.job.id for i in maybe])
        except StoreRefused:
            raise
        except (OSError, StoreError) as exc:
            log.warning("result_store_unavailable", jobs=len(maybe), error=str(exc))
            done.held.extend(maybe)
            return [i for i in items if not i.delivery.maybe_done_before]
        except ValidationError:  # one stored result is unreadable: find it, job by job
            stored = self._read_one_by_one(maybe, done)
        fresh = []
        for item in items:
            earlier = stored.get(item.job.id) if item.delivery.maybe_done_before else None
            if earlier is not None and rejects_another(earlier, job_digest(item.job)):
                earlier = None  # a rejection of another message under this id: this job runs, and replaces it
            if earlier is not None:
                self._answer_with_stored(item, earlier, done)
            elif item not in done.held and all(r.delivery is not item.delivery for r in done.rejections):
                fresh.append(item)
        return fresh

    def _read_one_by_one(self, items: list[Pending], done: Processed) -> dict[str, Result]:
        found: dict[str, Result] = {}
        for item in items:
            try:
                found.update(self.store.get_many([item.job.id]))
            except StoreRefused:
                raise
            except (OSError, StoreError):
                done.held.append(item)
            except ValidationError as exc:  # no retry will make it readable: an operator must look
                log.error("stored_result_unreadable", job_id=item.job.id, error=describe_validation_error(exc))
                done.rejections.append(Rejection(item.delivery, STORED_RESULT_UNREADABLE))
        return found

    def _answer_with_stored(self, item: Pending, stored: Result, done: Processed) -> None:
        if stored.job_sha256 is not None and stored.job_sha256 != job_digest(item.job):
            log.warning("job_id_conflict", job_id=item.job.id)
            done.rejections.append(Rejection(item.delivery, ID_CONFLICT))
        else:
            log.info("job_result_reused", job_id=item.job.id)
            done.outcomes.append(Outcome(item.delivery, stored, counted=False))

    def _run(self, items: list[Pending], version: int, sha256: str, model: LoadedModel, done: Processed) -> None:
        checked: list[Pending] = []
        tensors: list[dict[str, Tensor]] = []
        refused: list[tuple[Job, JobError]] = []
        for item in items:
            try:
                tensors.append(check_inputs(item.job, model.manifest, self.limits))
                checked.append(item)
            except JobError as error:
                done.outcomes.append(self.failed(item.delivery, item.job, error, version=version, sha256=sha256))
                refused.append((item.job, error))
        feeds, unconvertible = stack_inputs(tensors, model.manifest.inputs) if checked else ([], {})
        for index, problem in unconvertible.items():
            bad = checked[index]
            done.outcomes.append(self.failed(bad.delivery, bad.job, problem, version=version, sha256=sha256))
            refused.append((checked[index].job, problem))
        if refused and self.shadow is not None:  # shadow seam: the shadow version may take what this one refused
            self.shadow.offer_refused(model.manifest, refused)
        for indices, feed in feeds:
            self._run_feed([checked[i] for i in indices], feed, version, sha256, model, done)

    def _run_feed(
        self, items: list[Pending], feed: Feed, version: int, sha256: str, model: LoadedModel, done: Processed
    ) -> None:
        with self._compute:
            started = time.perf_counter()
            results = run_isolating(model, feed, self.watchdog)
            seconds = time.perf_counter() - started
        now_ms = time.time() * 1000  # the batch's jobs finish together
        for item, result in zip(items, results, strict=True):
            if isinstance(result, JobError):
                done.outcomes.append(self.failed(item.delivery, item.job, result, version=version, sha256=sha256))
            else:
                done.outcomes.append(self._succeeded(item, version, sha256, result, seconds * 1000, now_ms))
        # Monitoring seam: drift counts (monitoring/counting.py, once the results are stored) and shadow
        # sampling (monitoring/shadow_traffic.py) per batch.
        if self.monitor is not None and model.manifest.reference is not None:
            deliveries = [item.delivery for item in items]
            done.observed.append(Observed(model.manifest, deliveries, feed, list(results)))
        if self.shadow is not None:
            self.shadow.offer(model.manifest, [item.job.id for item in items], feed, results, seconds * 1000)
        done.runs.append(BatchRun(model.manifest.name, feed.bounds[-1], seconds))
        log.info(
            "batch_done",
            model=model.manifest.name,
            version=version,
            jobs=len(items),
            inference_ms=round(seconds * 1000, 3),
        )

    def _store(self, done: Processed) -> None:
        """Store every new result, retrying a failing store with backoff until it works or we must stop.
        Where the id already had a result, that one goes out instead; if it answers another job (its
        digest differs), this job is dead-lettered as an id conflict."""
        fresh = [o for o in done.outcomes if o.counted]
        if not fresh:
            return
        refusals: set[int] = set()
        stored = self._put_isolating([o.result for o in fresh], refusals)
        replaced = {id(o): s for o, s in zip(fresh, stored, strict=True) if s is not o.result}
        if not replaced:
            return
        kept: list[Outcome] = []
        for outcome in done.outcomes:
            earlier = replaced.get(id(outcome))
            if earlier is None:
                kept.append(outcome)
            elif id(earlier) in refusals:  # the store refused this result: its job's result says so
                kept.append(Outcome(outcome.delivery, earlier))
            elif earlier.job_sha256 is not None and earlier.job_sha256 != outcome.result.job_sha256:
                log.warning("job_id_conflict", job_id=outcome.result.id)
                done.rejections.append(Rejection(outcome.delivery, ID_CONFLICT))
            else:
                kept.append(Outcome(outcome.delivery, earlier, counted=False))
        done.outcomes = kept

    def observe(self, done: Processed) -> None:
        """Count for drift the jobs whose result :meth:`process` stored. A job whose id already had a result
        (it ran before, and that result is what goes out) was counted when that result was stored; a unit
        whose results could not be stored never gets here, and its jobs are counted when they are."""
        monitor = self.monitor
        if monitor is None or not done.observed:
            return
        stored = {id(o.delivery) for o in done.outcomes if o.counted}
        for seen in done.observed:
            keep = [i for i, d in enumerate(seen.deliveries) if id(d) in stored]
            if len(keep) == len(seen.deliveries):
                monitor.observe(seen.manifest, seen.inputs, seen.results)
            elif keep:
                monitor.observe(seen.manifest, [seen.inputs[i] for i in keep], [seen.results[i] for i in keep])

    def _put_isolating(self, results: list[Result], refusals: set[int]) -> list[Result]:
        """What :meth:`_put_many` stores for ``results``, except that a result whose content the store
        refuses is replaced by a ``result_refused`` failure of its job (added to ``refusals`` by ``id()``),
        and the others are stored all the same. The refused ones are found by the ids the store names, or
        by bisecting the batch, as ``run_isolating`` bisects a failing run."""
        try:
            return self._put_many(results)
        except ValueRefused as exc:
            if len(results) == 1:
                return [self._store_refusal(results[0], exc, refusals)]
            named = [i for i, r in enumerate(results) if r.id in exc.ids]
            if named and len(named) < len(results):
                others = [i for i, r in enumerate(results) if r.id not in exc.ids]
                groups = [named, others]
            else:
                half = len(results) // 2
                groups = [list(range(half)), list(range(half, len(results)))]
        stored: list[Result | None] = [None] * len(results)
        for group in groups:
            for index, result in zip(group, self._put_isolating([results[i] for i in group], refusals), strict=True):
                stored[index] = result
        return [result for result in stored if result is not None]

    def _store_refusal(self, result: Result, refused: ValueRefused, refusals: set[int]) -> Result:
        error = ResultRefused(f"the result store refused this result: {refused}")
        log.warning("job_result_refused", job_id=result.id, model=result.model, error=str(refused))
        failure = Result(
            id=result.id,
            model=result.model,
            requested_version=result.requested_version,
            version=result.version,
            model_sha256=result.model_sha256,
            job_sha256=result.job_sha256,
            status=Status.FAILED,
            error=ErrorInfo(code=error.code, message=str(error)),
            worker=self.worker_name,
            timings=result.timings,
        )
        try:
            stored = self._put_many([failure])[0]
        except ValueRefused as again:  # not even a failure fits: the store, not this result, is at fault
            raise StoreRefused(f"result store {self.store.describe()} refuses every result: {again}") from None
        if stored is failure:
            refusals.add(id(failure))
        return stored

    def _put_many(self, results: list[Result]) -> list[Result]:
        """``store.put_many``, retried with backoff while it fails in a way worth retrying, until it works
        or the worker must stop; a refused store or refused values are raised at once."""
        backoff = Backoff(cap_s=self._retry_max_s)
        while True:
            try:
                return self.store.put_many(results)
            except (StoreRefused, ValueRefused):
                raise
            except StoreError as exc:  # a refusal the store could not place: retrying would freeze the worker
                raise StoreRefused(f"result store {self.store.describe()}: {exc}") from None
            except OSError as exc:
                if self._stopping.is_set():
                    raise StoreUnavailable(f"result store {self.store.describe()} unavailable: {exc}") from exc
                delay = backoff.next_delay()
                log.warning("result_store_unavailable", error=str(exc), retry_in_s=round(delay, 2))
                self._stopping.wait(delay)

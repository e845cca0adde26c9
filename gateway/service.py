"""What the HTTP routes do: admit a job, report an operation, describe a model, answer the probes.

Admission, in order: the job id; the job held to the wire contract; its inputs against the manifest of
the version it names (the worker's own checks); no result of another job under the id; the operation
record claimed (one body per id); the job published and confirmed by the broker; the record marked
confirmed. Only then is it "queued". An operation is answered only for an id admitted here, and only
with the result of the job admitted (its job digest), or its dead letter, which every replica hears of.

Admission goes at the speed of the HTTP stack by grouping what concurrent requests share: the checks,
the result look-ups and the record writes of every request that arrived while the previous group was
being written run together on the records thread, in one transaction (claims and confirms alike, flushed
to disk when it holds claims), with one hand-over to that thread and back per group; the jobs of one turn
of the event loop go to the publisher together and come back together, their confirms in flight at once.
Blocking work (stores, the model catalog) never runs on the event loop.

A request that waits for its result is woken by the result itself: every replica consumes the results
exchange on a queue of its own (:class:`Waiters`), registered before the job is published. The store
is the fallback: read when told to (a reconnect of the listener, a dead letter, a result that does not
answer), and on a slow safety-net schedule in case a notification was lost.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from anyio import to_thread
from pydantic import ValidationError

from inferq.gateway.catalog import Catalog
from inferq.gateway.dead_letters import RecentDeadLetters, read_dead_letter
from inferq.gateway.errors import RETRY_AFTER_S, ApiCode, ApiError, from_job_error, store_unavailable
from inferq.gateway.jobs import (
    answers,
    build_job,
    check_job,
    finished,
    id_conflict_message,
    job_id_for,
    queued,
    record_for,
    settled,
)
from inferq.gateway.listener import Heard, Listener, Waiters
from inferq.gateway.metrics import GatewayMetrics
from inferq.gateway.probe import QueueProbe
from inferq.gateway.protocol import InferenceRequest, ModelMetadata, Operation, TensorMetadata
from inferq.gateway.publisher import Outcomes, Publisher
from inferq.gateway.records import OperationRecord, OperationStore
from inferq.gateway.settings import GatewaySettings
from inferq.model_store.manifest import TensorSpec
from inferq.model_store.signature import Limits
from inferq.producer.client import Encoded
from inferq.shared.config.logging import get_logger
from inferq.shared.contract.messages import LATEST, Job, Result, VersionRef, is_valid_job_id
from inferq.shared.errors import BrokerUnavailable, JobError, PublishError, ResultNotFound, StoreError
from inferq.shared.results.base import ResultStore

log = get_logger(__name__)
T = TypeVar("T")
R = TypeVar("R")

FALLBACK_POLL_S = 2.0
"""While the listener listens, a waiting request reads the store only when told to, or after this long
without a word (then at doubling intervals, up to ``MAX_FALLBACK_POLL_S``): the safety net for a lost
notification, not the way results arrive."""
MAX_FALLBACK_POLL_S = 8.0
DEAF_POLL_S = 0.2
"""How often a waiting request reads the store while the listener is not listening (no notification
can come)."""


@dataclass(frozen=True, slots=True)
class Answer:
    """An operation and the status it is answered with (200 finished or queued, 202 just accepted)."""

    status: int
    operation: Operation


@dataclass(frozen=True, slots=True)
class Claim:
    """What one request asks the records thread for: its job checked and its record claimed."""

    job: Job
    encoded: Encoded
    """The job as it is published (encoded once, when its size was checked)."""
    request: InferenceRequest
    record: OperationRecord
    published: asyncio.Future[None] | None
    """For an id this gateway made up (nobody else can have used it): the job is published as soon as it
    passed its checks, while its record is written, and this future answers the publish. ``None`` for
    an id the client chose: published only once the claim said the id is free."""


@dataclass(frozen=True, slots=True)
class Confirm:
    """What one request asks the records thread for once the broker confirmed its job: its record
    marked confirmed."""

    job_id: str


ClaimOutcome = OperationRecord | ApiError
"""The record stored for a claimed id, or why the request is refused."""


class Lane(Generic[T, R]):
    """Work of concurrent requests done a group at a time on a thread of its own: while a group runs, the
    requests that arrive gather into the next, so a busy gateway writes one transaction (one disk flush)
    and makes one round trip between threads per group, not per request. ``work`` answers each item of
    a group in order, with a value or the exception its request raises."""

    def __init__(self, work: Callable[[list[T]], Sequence[R | Exception]], name: str) -> None:
        self._work = work
        self._groups: queue.SimpleQueue[list[tuple[T, asyncio.Future[R]]] | None] = queue.SimpleQueue()
        self._next: list[tuple[T, asyncio.Future[R]]] = []
        self._busy = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    async def run(self, item: T) -> R:
        """``item``'s answer, once the group it joined has run."""
        return await self.submit(item)

    def submit(self, item: T) -> asyncio.Future[R]:
        """A future for ``item``'s answer (on the event loop)."""
        self._loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = self._loop.create_future()
        self._next.append((item, future))
        self._start()
        return future

    def close(self) -> None:
        """Finish the group under way, then stop the thread."""
        self._groups.put(None)
        self._thread.join()

    def _start(self) -> None:
        if self._busy or not self._next:
            return
        group, self._next = self._next, []
        self._busy = True
        self._groups.put(group)

    def _run(self) -> None:  # the lane's thread
        while (group := self._groups.get()) is not None:
            try:
                answers: Sequence[R | Exception] = self._work([item for item, _ in group])
            except Exception as exc:  # a bug: every request of the group gets it (and a 500)
                answers = [exc] * len(group)
            loop = self._loop
            try:
                assert loop is not None  # set by the request that started the group
                loop.call_soon_threadsafe(self._finish, group, answers)
            except RuntimeError:  # the event loop is closed: nobody waits any more
                return

    def _finish(self, group: list[tuple[T, asyncio.Future[R]]], answers: Sequence[R | Exception]) -> None:
        self._busy = False
        for (_, future), answer in zip(group, answers, strict=True):
            if future.done():  # the request went away
                continue
            if isinstance(answer, BaseException):
                future.set_exception(answer)
            else:
                future.set_result(answer)
        self._start()


class PublishGroups:
    """Jobs handed to the publisher a group at a time (the jobs of one turn of the event loop, or of one
    group of claims), and their outcomes handed back together: one wake-up of the event loop per group."""

    def __init__(self, publisher: Publisher) -> None:
        self._publisher = publisher
        self._next: list[tuple[Encoded, asyncio.Future[None]]] = []

    def publish(self, job: Encoded) -> asyncio.Future[None]:
        """A future that resolves once the broker confirmed ``job`` (on the event loop), or fails with
        :class:`PublishError` or :class:`BrokerUnavailable`."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        if not self._next:
            loop.call_soon(self._hand_over_next)
        self._next.append((job, future))
        return future

    def hand_over(self, group: list[tuple[Encoded, asyncio.Future[None]]], loop: asyncio.AbstractEventLoop) -> None:
        """Publish ``group`` now (any thread); its futures are answered on ``loop``."""
        if not group:
            return
        futures: dict[str, list[asyncio.Future[None]]] = {}
        for job, future in group:
            futures.setdefault(job.job_id, []).append(future)

        def done(outcomes: Outcomes) -> None:  # on the publisher's thread
            try:
                loop.call_soon_threadsafe(_settle, futures, outcomes)
            except RuntimeError:  # the event loop is closed: nobody waits any more
                return

        self._publisher.submit_group([job for job, _ in group], done)

    def _hand_over_next(self) -> None:
        group, self._next = self._next, []
        self.hand_over(group, asyncio.get_running_loop())


def _settle(futures: dict[str, list[asyncio.Future[None]]], outcomes: Outcomes) -> None:
    """Answer each future with its job's outcome."""
    for job_id, waiting in futures.items():
        error = outcomes.get(job_id)
        for future in waiting:
            if future.done():
                continue
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)


async def _within(future: asyncio.Future[None], timeout_s: float) -> None:
    """Await ``future``; ``TimeoutError`` after ``timeout_s`` (a timer, not a task per request)."""
    timer = asyncio.get_running_loop().call_later(timeout_s, _expire, future)
    try:
        await future
    finally:
        timer.cancel()


def _retrieved(future: asyncio.Future[None]) -> None:
    """Mark the outcome of ``future`` seen (asyncio would log an error nobody retrieved)."""
    if not future.cancelled():
        future.exception()


def _expire(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


class Gateway:
    """The gateway's parts, built once per process, and what each route does with them."""

    def __init__(
        self,
        settings: GatewaySettings,
        *,
        publisher: Publisher,
        operations: OperationStore,
        results: ResultStore,
        catalog: Catalog,
        probe: QueueProbe,
        metrics: GatewayMetrics,
        listener: Listener | None = None,
        fallback_poll_s: float = FALLBACK_POLL_S,
    ) -> None:
        self.settings = settings
        self.publisher = publisher
        self.operations = operations
        self.results = results
        self.catalog = catalog
        self.probe = probe
        self.metrics = metrics
        self.listener = listener
        self.fallback_poll_s = fallback_poll_s
        self.dead_letters = RecentDeadLetters()
        self.waiters = Waiters()
        self.limits = Limits(settings.max_rows_per_job, settings.max_elements_per_tensor)
        # Claims and confirms share one lane, and each group one transaction: a confirm costs no
        # transaction of its own, and the flush the claims need anyway carries it.
        self.records: Lane[Claim | Confirm, OperationRecord | None] = Lane(self._write_group, "inferq-records")
        self.publishes = PublishGroups(publisher)
        self.stopping = threading.Event()
        """Set on SIGTERM: requests waiting for a result answer 202 at once, so the stop is not held up."""

    # -- submitting -------------------------------------------------------------------------------

    async def submit(
        self, model: str, ref: VersionRef, request: InferenceRequest, idempotency_key: str | None, wait_s: float
    ) -> Answer:
        """Admit a job (or find the one already admitted under its id) and answer with its operation,
        finished if it finishes within ``wait_s`` seconds."""
        self._refuse_while_the_broker_does()
        chosen = request.id is not None or idempotency_key is not None
        job_id = job_id_for(request, idempotency_key)
        job, encoded = build_job(model, ref, request, job_id, self.settings.max_message_bytes)
        record = record_for(job, request, time.time())
        published = None if chosen else asyncio.get_running_loop().create_future()
        # Registered before any publish: the result's notification may come before the confirm does.
        waiting = self.waiters.expect(job.id) if wait_s > 0 else None
        try:
            stored = await self._claim(Claim(job, encoded, request, record, published))
            if stored.digest != record.digest:
                self.metrics.jobs_refused.labels("id_conflict").inc()
                message = f"job id {job_id!r} was already used for a different request"
                raise ApiError(409, ApiCode.ID_CONFLICT, message)
            resubmitted = stored.confirmed
            confirming = None
            if not resubmitted:
                # Claimed but not (yet) confirmed: new, or a publish whose fate is unknown. Publishing the
                # same body again is safe: a job id gets one result, whoever runs it.
                await self._confirmed(published if published is not None else self.publishes.publish(encoded))
                # Marked while the job runs; done before any answer, so a read after it finds the record queued.
                confirming = self.records.submit(Confirm(job.id))
                self.metrics.jobs_accepted.inc()
            operation = None
            if waiting is not None:
                operation = await self._wait_until_settled(stored, wait_s, waiting, look_first=resubmitted)
            elif resubmitted:
                operation = await self._settled_now(stored)
            if confirming is not None:
                await confirming
        finally:
            if waiting is not None:
                self.waiters.forget(job.id, waiting)
            if published is not None:  # its outcome is not awaited when the claim failed
                published.add_done_callback(_retrieved)
        return Answer(200, operation) if operation is not None else Answer(202, queued(stored))

    def _refuse_while_the_broker_does(self) -> None:
        if self.publisher.broker_down:
            self.metrics.jobs_refused.labels("broker_unavailable").inc()
            raise ApiError(503, ApiCode.BROKER_UNAVAILABLE, "the broker is unreachable", retry_after_s=RETRY_AFTER_S)
        if self.publisher.refusing():
            self.metrics.jobs_refused.labels("queue_full").inc()
            raise ApiError(
                429, ApiCode.QUEUE_FULL, "the jobs queue is full, try again later", retry_after_s=RETRY_AFTER_S
            )

    async def _claim(self, claim: Claim) -> OperationRecord:
        stored = await self.records.run(claim)
        assert stored is not None  # a claim is answered with its record (a confirm with None)
        return stored

    def _write_group(self, writes: list[Claim | Confirm]) -> list[OperationRecord | ApiError | None]:
        """On the records thread: the claims and confirms of a group, in one transaction."""
        claims = [write for write in writes if isinstance(write, Claim)]
        confirms = [write.job_id for write in writes if isinstance(write, Confirm)]
        claimed = iter(self._claim_group(claims, confirms))
        return [next(claimed) if isinstance(write, Claim) else None for write in writes]

    def _claim_group(self, claims: list[Claim], confirms: list[str]) -> list[ClaimOutcome]:
        """Check each job; publish at once those under ids made up here (nobody else can hold them); look
        for results under the ids clients chose; then claim the records of the jobs that passed and
        mark ``confirms`` confirmed, in one transaction."""
        outcomes: list[ClaimOutcome | None] = [self._check(claim) for claim in claims]
        passed = [claim for claim, outcome in zip(claims, outcomes, strict=True) if outcome is None]
        early = [(claim.encoded, claim.published) for claim in passed if claim.published is not None]
        if early:
            # NOTE: published before its record is written, to overlap the two round trips (the broker's
            # confirm, the disk's flush). Should the write then fail, the request is answered 503 and the
            # job still runs, under an id nobody was given: a retry is a new job, as it would be anyway.
            self.publishes.hand_over(early, early[0][1].get_loop())
        earlier = self._look_up_results([claim.job.id for claim in passed if claim.published is None])
        for i, claim in enumerate(claims):
            result = earlier.get(claim.job.id)
            if outcomes[i] is None and result is not None and result.job_sha256 != claim.record.job_sha256:
                # An id whose result answers another job (sent without the API, or an id reused) is not
                # free: the job would never run under it.
                self.metrics.jobs_refused.labels("id_conflict").inc()
                outcomes[i] = ApiError(409, ApiCode.ID_CONFLICT, id_conflict_message(claim.job.id))
        admitted = [i for i, outcome in enumerate(outcomes) if outcome is None]
        try:
            records = self.operations.write([claims[i].record for i in admitted], confirms)
        except OSError as exc:
            if confirms:
                # Those jobs are queued and will run; only their "queued" status is missing until their
                # results are stored. A resubmission with the same id publishes again, harmlessly.
                log.warning("operation_confirm_failed", jobs=len(confirms), error=str(exc))
            refused = store_unavailable("the operations store", exc)
            return [refused if outcome is None else outcome for outcome in outcomes]
        stored = dict(zip(admitted, records, strict=True))
        return [stored[i] if outcome is None else outcome for i, outcome in enumerate(outcomes)]

    def _check(self, claim: Claim) -> ApiError | None:
        """Why the job of ``claim`` cannot run, as a worker would say it; ``None`` when it can."""
        try:
            manifest = self.catalog.manifest(claim.job.model, claim.job.version)
            check_job(claim.job, claim.request, manifest, self.limits)
        except JobError as exc:
            self.metrics.jobs_refused.labels("invalid").inc()
            return from_job_error(exc)
        except ApiError as exc:
            self.metrics.jobs_refused.labels("invalid").inc()
            return exc
        except (OSError, StoreError) as exc:
            return store_unavailable("the model store", exc)
        return None

    def _look_up_results(self, job_ids: list[str]) -> dict[str, Result]:
        """The results stored under ``job_ids``; none when the store cannot say now (a worker then
        dead-letters a job whose id holds another job's result, and its operation says so)."""
        if not job_ids:
            return {}
        try:
            return self.results.get_many(job_ids)
        except (OSError, StoreError) as exc:
            log.warning("result_store_unavailable", jobs=len(job_ids), error=str(exc))
            return {}

    async def _confirmed(self, published: asyncio.Future[None]) -> None:
        """Until the broker confirmed the job ``published`` answers for; else 429 or 503."""
        try:
            await _within(published, self.settings.publish_timeout_s)
        except PublishError as exc:
            self.metrics.jobs_refused.labels("queue_full").inc()
            raise ApiError(
                429, ApiCode.QUEUE_FULL, f"the jobs queue is full, try again later ({exc})", retry_after_s=RETRY_AFTER_S
            ) from None
        except (BrokerUnavailable, TimeoutError) as exc:
            self.metrics.jobs_refused.labels("broker_unavailable").inc()
            message = str(exc) or f"the broker did not confirm the job within {self.settings.publish_timeout_s:g}s"
            raise ApiError(503, ApiCode.BROKER_UNAVAILABLE, message, retry_after_s=RETRY_AFTER_S) from None

    # -- waiting ----------------------------------------------------------------------------------

    async def _wait_until_settled(
        self, record: OperationRecord, wait_s: float, heard: asyncio.Future[Result | None], *, look_first: bool
    ) -> Operation | None:
        """The finished operation of ``record``'s job once it is heard of (``heard``: the result's
        notification), within ``wait_s``; ``None`` while it is not finished. The store is read first
        when ``look_first``, then only when told to, or when nothing was heard for a while."""
        deadline = time.monotonic() + wait_s
        look, pause = look_first, self.fallback_poll_s
        self.metrics.waiting.inc()
        try:
            while True:
                if look:
                    operation = await self._settled_now(record)
                    if operation is not None:
                        self.metrics.waits_answered.labels("store").inc()
                        return operation
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.stopping.is_set():
                    return None
                deaf = self.listener is None or not self.listener.listening.is_set()
                word = await _next_word(heard, min(remaining, DEAF_POLL_S if deaf else pause))
                if word is _SILENCE:
                    look, pause = True, min(pause * 2, MAX_FALLBACK_POLL_S)
                    continue
                heard = self.waiters.renew(record.id, heard)
                if isinstance(word, Result) and answers(record, word):
                    self.metrics.waits_answered.labels("notification").inc()
                    return finished(word, record)
                look = True  # told to look (a reconnect, a dead letter, a stop), or a result that is not ours
        finally:
            self.waiters.forget(record.id, heard)
            self.metrics.waiting.dec()

    async def _settled_now(self, record: OperationRecord) -> Operation | None:
        result = await to_thread.run_sync(self._look_up_result, record.id)
        return settled(record, result, self._dead_letter_of(record))

    def _dead_letter_of(self, record: OperationRecord) -> str | None:
        """Why the job of ``record`` was dead-lettered, as its record says or as this replica heard."""
        if record.dead_letter is not None:
            return record.dead_letter
        heard = self.dead_letters.of(record.id, record.job_sha256)
        return None if heard is None else heard.reason

    def _look_up_result(self, job_id: str) -> Result | None:
        try:
            return self.results.get(job_id)
        except ResultNotFound:
            return None
        except (OSError, StoreError) as exc:  # the job is accepted: a slow store only means no result yet
            log.warning("result_store_unavailable", job_id=job_id, error=str(exc))
            return None

    def hear_results(self, messages: list[Heard]) -> None:
        """Wake the requests waiting for the jobs of these result notifications (on the listener's
        thread; only the results someone here waits for are decoded)."""
        heard: dict[str, Result | None] = {}
        for message in messages:
            job_id = message.properties.message_id
            if job_id is None or not self.waiters.wanted(job_id):
                continue
            try:
                heard[job_id] = Result.model_validate_json(message.body)
            except ValidationError:  # not a result we can read: the waiting request reads the store
                heard[job_id] = None
        self.waiters.wake(heard)

    def begin_stop(self) -> None:
        """SIGTERM: waiting requests answer at once (202 for a job not finished), so the stop is not held up."""
        self.stopping.set()
        self.waiters.wake_all()

    # -- reading ----------------------------------------------------------------------------------

    async def operation(self, job_id: str) -> Answer:
        """The operation of ``job_id``: finished (its own result, a conflict, its dead letter), queued, or
        404 when this API never accepted that id (whatever is stored under it)."""
        if not is_valid_job_id(job_id):
            raise ApiError(404, ApiCode.NOT_FOUND, "no operation with that id (ids are 1-128 of [A-Za-z0-9._:-])")
        record, result = await to_thread.run_sync(self._look_up_operation, job_id)
        if record is not None:
            operation = settled(record, result, self._dead_letter_of(record))
            if operation is not None:
                return Answer(200, operation)
            if record.confirmed:
                return Answer(200, queued(record))
        raise ApiError(404, ApiCode.NOT_FOUND, f"no operation {job_id!r} was accepted")

    def _look_up_operation(self, job_id: str) -> tuple[OperationRecord | None, Result | None]:
        try:
            record = self.operations.get(job_id)
        except OSError as exc:
            raise store_unavailable("the operations store", exc) from None
        if record is None:  # not ours: whatever is stored under the id is none of this API's business
            return None, None
        try:
            return record, self.results.get(job_id)
        except ResultNotFound:
            return record, None
        except (OSError, StoreError) as exc:
            raise store_unavailable("the result store", exc) from None

    # -- hearing of dead letters ------------------------------------------------------------------

    def hear_dead_letters(self, messages: list[Heard]) -> None:
        """Note each dead letter on the record of its job, if this API admitted it (on the listener's
        thread; raises ``OSError`` while the operations store cannot be written, to hear them again)."""
        letters = [
            letter
            for message in messages
            if (letter := read_dead_letter(message.properties, message.body, self.settings.max_message_bytes))
        ]
        self.operations.mark_dead_lettered(letters)
        self.dead_letters.add(letters)
        for letter in letters:
            log.info("job_dead_lettered", job_id=letter.job_id, reason=letter.reason)
        self.waiters.wake({letter.job_id: None for letter in letters if self.waiters.wanted(letter.job_id)})

    async def metadata(self, name: str, ref: VersionRef | None) -> ModelMetadata:
        """Open Inference Protocol metadata of ``name`` at ``ref`` (default: latest)."""
        return await to_thread.run_sync(self._metadata, name, LATEST if ref is None else ref)

    def _metadata(self, name: str, ref: VersionRef) -> ModelMetadata:
        try:
            versions = self.catalog.versions(name)
            manifest = self.catalog.manifest(name, ref)
        except JobError as exc:
            raise from_job_error(exc) from None
        except (OSError, StoreError) as exc:
            raise store_unavailable("the model store", exc) from None
        return ModelMetadata(
            name=name,
            versions=[str(v) for v in versions],
            inputs=[_tensor_metadata(spec) for spec in manifest.inputs],
            outputs=[_tensor_metadata(spec) for spec in manifest.outputs],
        )

    async def not_ready(self) -> str | None:
        """Why the gateway cannot accept jobs now, or None when it can."""
        self.metrics.broker_connected.set(1 if self.publisher.connected else 0)
        if self.stopping.is_set():
            return "stopping"
        if self.publisher.broker_down or not self.publisher.connected:
            return "not connected to the broker"
        reading = await to_thread.run_sync(self.probe.read)
        if reading.depth is None:
            return reading.problem or "the jobs queue cannot be read"
        if reading.depth >= self.settings.max_queue_length:
            return f"the jobs queue is full ({reading.depth} of {self.settings.max_queue_length})"
        return None

    def close(self) -> None:
        """Stop in order: publish and confirm what was handed in, stop listening (it writes records), then
        close the stores."""
        self.records.close()
        self.publisher.stop(self.settings.shutdown_grace_s)
        if self.listener is not None:
            self.listener.stop(self.settings.shutdown_grace_s)
        self.operations.close()
        close = getattr(self.results, "close", None)
        if callable(close):
            close()


_SILENCE = object()
"""What :func:`_next_word` returns when nothing was heard in time."""


async def _next_word(heard: asyncio.Future[Result | None], timeout_s: float) -> Result | object | None:
    """What ``heard`` resolves to, or ``_SILENCE`` after ``timeout_s`` (a timer, not a task per wait)."""
    if not heard.done():
        waiting: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        timer = asyncio.get_running_loop().call_later(timeout_s, _wake, waiting)
        heard.add_done_callback(lambda _f: _wake(waiting))
        try:
            await waiting
        finally:
            timer.cancel()
    return heard.result() if heard.done() else _SILENCE


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _tensor_metadata(spec: TensorSpec) -> TensorMetadata:
    return TensorMetadata(name=spec.name, datatype=spec.datatype, shape=[-1 if d is None else d for d in spec.shape])

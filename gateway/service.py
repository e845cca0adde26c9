"""What the HTTP routes do: admit a job, report an operation, describe a model, answer the probes.

Admission, in order: the job id; the job held to the wire contract; its inputs against the manifest of
the version it names (the worker's own checks); no result of another job under the id; the operation
record claimed (one body per id); the job published and confirmed by the broker; the record marked
confirmed. Only then is it "queued". An operation is answered only for an id admitted here, and only
with the result of the job admitted (its job digest), or its dead letter, which every replica hears of.
Blocking work (stores, the model catalog) runs on worker threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

from anyio import to_thread

from inferq.gateway.catalog import Catalog
from inferq.gateway.dead_letters import RecentDeadLetters, read_dead_letter
from inferq.gateway.errors import RETRY_AFTER_S, ApiCode, ApiError, from_job_error, store_unavailable
from inferq.gateway.jobs import (
    build_job,
    check_job,
    id_conflict_message,
    job_id_for,
    prefer_wait_s,
    queued,
    record_for,
    settled,
)
from inferq.gateway.listener import Heard, Listener
from inferq.gateway.metrics import GatewayMetrics
from inferq.gateway.probe import QueueProbe
from inferq.gateway.protocol import InferenceRequest, ModelMetadata, Operation, TensorMetadata
from inferq.gateway.publisher import Publisher
from inferq.gateway.records import OperationRecord, OperationStore
from inferq.gateway.settings import GatewaySettings
from inferq.model_store.manifest import TensorSpec
from inferq.model_store.signature import Limits
from inferq.shared.config.logging import get_logger
from inferq.shared.contract.messages import LATEST, Job, Result, VersionRef, is_valid_job_id
from inferq.shared.errors import BrokerUnavailable, JobError, PublishError, ResultNotFound, StoreError
from inferq.shared.results.base import ResultStore

log = get_logger(__name__)

FIRST_POLL_S = 0.01
MAX_POLL_S = 0.2


@dataclass(frozen=True, slots=True)
class Answer:
    """An operation and the status it is answered with (200 finished or queued, 202 just accepted)."""

    status: int
    operation: Operation


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
    ) -> None:
        self.settings = settings
        self.publisher = publisher
        self.operations = operations
        self.results = results
        self.catalog = catalog
        self.probe = probe
        self.metrics = metrics
        self.listener = listener
        self.dead_letters = RecentDeadLetters()
        self.limits = Limits(settings.max_rows_per_job, settings.max_elements_per_tensor)
        self.stopping = threading.Event()
        """Set on SIGTERM: requests waiting for a result answer 202 at once, so the stop is not held up."""

    # -- submitting -------------------------------------------------------------------------------

    async def submit(
        self, model: str, ref: VersionRef, request: InferenceRequest, idempotency_key: str | None, prefer: str | None
    ) -> Answer:
        """Admit a job (or find the one already admitted under its id) and answer with its operation."""
        job_id = job_id_for(request, idempotency_key)
        job = build_job(model, ref, request, job_id, self.settings.max_message_bytes)
        record = record_for(job, request, time.time())
        stored = await to_thread.run_sync(self._admit, job, request, record)
        if stored.digest != record.digest:
            self.metrics.jobs_refused.labels("id_conflict").inc()
            raise ApiError(409, ApiCode.ID_CONFLICT, f"job id {job_id!r} was already used for a different request")
        resubmitted = stored.confirmed
        if not resubmitted:
            # Claimed but not (yet) confirmed: new, or a publish whose fate is unknown. Publishing the
            # same body again is safe: a job id gets one result, whoever runs it.
            await self._publish(job)
            await to_thread.run_sync(self._confirm, job.id)
            self.metrics.jobs_accepted.inc()
        wait_s = prefer_wait_s(prefer, self.settings.max_prefer_wait_s)
        if wait_s > 0 or resubmitted:
            operation = await self._wait_until_settled(stored, wait_s)
            if operation is not None:
                return Answer(200, operation)
        return Answer(202, queued(stored))

    def _admit(self, job: Job, request: InferenceRequest, record: OperationRecord) -> OperationRecord:
        try:
            manifest = self.catalog.manifest(job.model, job.version)
            check_job(job, request, manifest, self.limits)
        except JobError as exc:
            self.metrics.jobs_refused.labels("invalid").inc()
            raise from_job_error(exc) from None
        except (OSError, StoreError) as exc:
            raise store_unavailable("the model store", exc) from None
        # An id whose result answers another job (sent without the API, or an id reused) is not free: the
        # job would never run under it. A store that cannot say now does not block admission; a worker
        # then dead-letters the job as an id conflict, and its operation says so.
        earlier = self._look_up_result(job.id)
        if earlier is not None and earlier.job_sha256 != record.job_sha256:
            self.metrics.jobs_refused.labels("id_conflict").inc()
            raise ApiError(409, ApiCode.ID_CONFLICT, id_conflict_message(job.id))
        try:
            return self.operations.claim(record)
        except OSError as exc:
            raise store_unavailable("the operations store", exc) from None

    def _confirm(self, job_id: str) -> None:
        try:
            self.operations.confirm(job_id)
        except OSError as exc:
            # The job is queued and will run; only its "queued" status is missing until its result
            # is stored. A resubmission with the same id publishes it again, harmlessly.
            log.warning("operation_confirm_failed", job_id=job_id, error=str(exc))

    async def _publish(self, job: Job) -> None:
        if self.publisher.broker_down:
            self.metrics.jobs_refused.labels("broker_unavailable").inc()
            raise ApiError(503, ApiCode.BROKER_UNAVAILABLE, "the broker is unreachable", retry_after_s=RETRY_AFTER_S)
        if self.publisher.refusing():
            self.metrics.jobs_refused.labels("queue_full").inc()
            raise ApiError(
                429, ApiCode.QUEUE_FULL, "the jobs queue is full, try again later", retry_after_s=RETRY_AFTER_S
            )
        future = self.publisher.submit(job)
        try:
            await asyncio.wait_for(asyncio.wrap_future(future), self.settings.publish_timeout_s)
        except PublishError as exc:
            self.metrics.jobs_refused.labels("queue_full").inc()
            raise ApiError(
                429, ApiCode.QUEUE_FULL, f"the jobs queue is full, try again later ({exc})", retry_after_s=RETRY_AFTER_S
            ) from None
        except (BrokerUnavailable, TimeoutError) as exc:
            self.metrics.jobs_refused.labels("broker_unavailable").inc()
            message = str(exc) or f"the broker did not confirm the job within {self.settings.publish_timeout_s:g}s"
            raise ApiError(503, ApiCode.BROKER_UNAVAILABLE, message, retry_after_s=RETRY_AFTER_S) from None

    async def _wait_until_settled(self, record: OperationRecord, wait_s: float) -> Operation | None:
        """Look for the job's result (or dead letter) now, then with growing pauses until ``wait_s`` has
        passed; the finished operation, or ``None`` while it is not finished."""
        deadline = time.monotonic() + wait_s
        pause = FIRST_POLL_S
        self.metrics.waiting.inc()
        try:
            while True:
                result = await to_thread.run_sync(self._look_up_result, record.id)
                operation = settled(record, result, self._dead_letter_of(record))
                remaining = deadline - time.monotonic()
                if operation is not None or remaining <= 0 or self.stopping.is_set():
                    return operation
                await asyncio.sleep(min(pause, remaining))
                pause = min(pause * 2, MAX_POLL_S)
        finally:
            self.metrics.waiting.dec()

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
        self.publisher.stop(self.settings.shutdown_grace_s)
        if self.listener is not None:
            self.listener.stop(self.settings.shutdown_grace_s)
        self.operations.close()
        close = getattr(self.results, "close", None)
        if callable(close):
            close()


def _tensor_metadata(spec: TensorSpec) -> TensorMetadata:
    return TensorMetadata(name=spec.name, datatype=spec.datatype, shape=[-1 if d is None else d for d in spec.shape])

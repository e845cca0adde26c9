"""From an HTTP request to a job, and from a stored result to an operation: pure logic, no I/O."""

from __future__ import annotations

import hashlib
import os
import re
import time
import uuid
from dataclasses import dataclass

import orjson
from pydantic import ValidationError

from inferq.gateway.errors import ApiCode, ApiError, bad_request
from inferq.gateway.protocol import (
    BinaryOutputTensor,
    ErrorDetail,
    InferenceRequest,
    InferenceResponse,
    Operation,
    OperationStatus,
)
from inferq.gateway.records import OperationRecord
from inferq.model_store.manifest import Manifest
from inferq.model_store.signature import Limits, prepare_inputs
from inferq.producer.client import Encoded
from inferq.shared.contract.codec import describe_validation_error
from inferq.shared.contract.messages import (
    Job,
    OutputTensor,
    Result,
    Status,
    VersionRef,
    is_valid_job_id,
    job_digest,
    parse_version_ref,
)
from inferq.shared.errors import ErrorCode

_encode_job = Job.__pydantic_serializer__.to_json
"""A job's JSON as bytes: what ``model_dump_json`` writes, without the round trip through ``str``."""
_WAIT_VALUE = re.compile(r"\"?(\d{1,9}(?:\.\d{1,9})?)\"?")


def version_ref(raw: str) -> VersionRef:
    """The version named in a path: a number, ``latest`` or an alias; else a 400."""
    try:
        return parse_version_ref(raw)
    except ValueError as exc:
        raise bad_request(f"version: {exc}") from None


class _TimeOrderedIds:
    """New job ids: uuids of version 7 (RFC 9562), the time in milliseconds then 74 random bits.

    Why: ids that grow with time land side by side in the operation records' index (and in a SQL result
    store's), so a group of claims writes one or two pages instead of one page per id; on SQLite a
    record costs a third of the CPU of one under a random (version 4) uuid. The random bits come from
    the system's source 256 ids' worth at a time (one system call per id otherwise): still unguessable."""

    BATCH = 256
    _RANDOM_BYTES = 10

    def __init__(self) -> None:
        self._random: list[int] = []

    def next(self) -> str:
        """A new id, as text (list.pop is atomic: threads may share it)."""
        try:
            bits = self._random.pop()
        except IndexError:
            size = self._RANDOM_BYTES
            raw = os.urandom(size * self.BATCH)
            self._random = [int.from_bytes(raw[i : i + size], "big") for i in range(0, len(raw), size)]
            bits = self._random.pop()
        value = (time.time_ns() // 1_000_000) << 80 | bits
        value = (value & ~_VERSION_MASK) | _VERSION_7  # the version and variant bits over random ones
        return str(uuid.UUID(int=value & ~_VARIANT_MASK | _VARIANT_RFC))


_VERSION_MASK = 0xF << 76
_VERSION_7 = 0x7 << 76
_VARIANT_MASK = 0x3 << 62
_VARIANT_RFC = 0x2 << 62
_new_id = _TimeOrderedIds().next


def job_id_for(request: InferenceRequest, idempotency_key: str | None) -> str:
    """The body's ``id``, else the ``Idempotency-Key`` header, else a new uuid (time-ordered)."""
    job_id = request.id or idempotency_key or _new_id()
    if not is_valid_job_id(job_id):
        raise bad_request("the job id (body 'id' or Idempotency-Key) must be 1-128 characters of [A-Za-z0-9._:-]")
    return job_id


def build_job(
    model: str, ref: VersionRef, request: InferenceRequest, job_id: str, max_message_bytes: int
) -> tuple[Job, Encoded]:
    """The job the request asks for, held to the wire contract (the size limit included), and its
    encoding: the message published, as it was measured."""
    try:
        inputs = [tensor.tensor() for tensor in request.inputs]
        job = Job(id=job_id, model=model, version=ref, inputs=inputs, parameters=request.parameters)
    except ValidationError as exc:
        raise bad_request(describe_validation_error(exc)) from None
    body = _encode_job(job, exclude_none=True)
    if len(body) > max_message_bytes:
        raise bad_request(f"the job is {len(body)} bytes, above the limit of {max_message_bytes}", ApiCode.TOO_LARGE)
    return job, Encoded(job_id, body)


def check_job(job: Job, request: InferenceRequest, manifest: Manifest, limits: Limits) -> None:
    """Refuse at the door what a worker would fail: inputs against the signature, sizes, requested
    outputs against the model's outputs. Raises :class:`JobError` (the worker's codes)."""
    prepare_inputs(job, manifest, limits)
    if request.outputs is not None:
        known = {spec.name for spec in manifest.outputs}
        unknown = sorted({o.name for o in request.outputs} - known)
        if unknown:
            raise ApiError(
                400,
                ApiCode.INPUT_MISMATCH,
                f"model {manifest.name!r} v{manifest.version} has no outputs {unknown} (it has {sorted(known)})",
            )


def digest(job: Job, request: InferenceRequest) -> str:
    """What the job asks for, whatever its id: two bodies with one id must agree on this."""
    content = {
        "model": job.model,
        "version": job.version,
        # What model_dump(mode="json") writes for a tensor, built by hand (a tenth of the time).
        "inputs": [{"name": t.name, "shape": t.shape, "datatype": t.datatype, "data": t.data} for t in job.inputs],
        "parameters": job.parameters,
        "outputs": None if request.outputs is None else [o.model_dump(mode="json") for o in request.outputs],
    }
    return hashlib.sha256(orjson.dumps(content, option=orjson.OPT_SORT_KEYS)).hexdigest()


def record_for(job: Job, request: InferenceRequest, accepted_at: float) -> OperationRecord:
    """The operation record claimed before the job is published."""
    outputs = None if request.outputs is None else tuple(o.name for o in request.outputs)
    return OperationRecord(
        job.id, job.model, str(job.version), digest(job, request), outputs, accepted_at, job_sha256=job_digest(job)
    )


def answers(record: OperationRecord, result: Result) -> bool:
    """True when ``result`` is the result of the job admitted under ``record``: it carries that job's digest.

    NOTE: a record written before job digests were kept (``job_sha256`` is ``None``) cannot tell; its
    result is answered as before."""
    return record.job_sha256 is None or result.job_sha256 == record.job_sha256


def id_conflict_message(job_id: str) -> str:
    """Why a job cannot be admitted, or answered, under an id that has another job's result."""
    return (
        f"job id {job_id!r} already has the result of another job (another model, version, inputs or "
        "parameters); send this job under a new id"
    )


def settled(record: OperationRecord, result: Result | None, dead_letter: str | None) -> Operation | None:
    """The finished operation of the job admitted under ``record``, or ``None`` while it is not finished:
    its own result; a conflict when the id's result is another job's (never that job's outputs); its
    dead letter (``dead_letter``: the reason)."""
    if result is not None:
        return (
            finished(result, record)
            if answers(record, result)
            else _failed(record, ApiCode.ID_CONFLICT, id_conflict_message(record.id))
        )
    if dead_letter is not None:
        message = f"the job was dead-lettered ({dead_letter}); see inferq dlq list"
        return _failed(record, ErrorCode.DEAD_LETTERED, message)
    return None


def _failed(record: OperationRecord, code: str, message: str) -> Operation:
    return Operation(
        id=record.id,
        status=OperationStatus.FAILED,
        model_name=record.model,
        model_version=record.requested_version,
        error=ErrorDetail(code=code, message=message),
    )


def queued(record: OperationRecord) -> Operation:
    """An accepted job without a result yet."""
    return Operation(
        id=record.id, status=OperationStatus.QUEUED, model_name=record.model, model_version=record.requested_version
    )


def finished(result: Result, record: OperationRecord) -> Operation:
    """The operation of a job with its own stored result (see :func:`answers`)."""
    operation = Operation.model_construct(
        id=result.id,
        status=OperationStatus(result.status.value),
        model_name=record.model,
        model_version=record.requested_version,
        result=None,
        error=None,
    )
    if result.status is Status.SUCCEEDED:
        wanted = None if record.outputs is None else set(record.outputs)
        outputs: list[OutputTensor | BinaryOutputTensor] = [
            t for t in result.outputs or [] if wanted is None or t.name in wanted
        ]
        timings = result.timings.model_dump(exclude_none=True)
        response = InferenceResponse.model_construct(
            model_name=result.model or "",
            model_version=None if result.version is None else str(result.version),
            id=result.id,
            parameters=timings,
            outputs=outputs,
        )
        return operation.model_copy(update={"result": response})
    error = result.error
    detail = ErrorDetail(code=error.code, message=error.message) if error is not None else None
    return operation.model_copy(update={"error": detail})


@dataclass(frozen=True, slots=True)
class Preference:
    """What a request's ``Prefer`` header (RFC 7240) asks: an operation at once (``respond-async``),
    and how long to wait for the result (``wait=N``, seconds; ``None`` when not said)."""

    respond_async: bool = False
    wait_s: float | None = None

    def wait(self, default_s: float, max_s: float) -> float:
        """Seconds to wait for the result: ``wait=N`` if given, else none with ``respond-async`` and
        ``default_s`` without; never above ``max_s``."""
        if self.wait_s is not None:
            return min(self.wait_s, max_s)
        return 0.0 if self.respond_async else min(default_s, max_s)


def preference(headers: list[str]) -> Preference:
    """The preferences of every ``Prefer`` header of a request; the ones not understood are ignored,
    as RFC 7240 asks."""
    respond_async = False
    wait_s: float | None = None
    for header in headers:
        for item in header.split(","):
            token, _, value = item.partition(";")[0].partition("=")
            name = token.strip().lower()
            if name == "respond-async":
                respond_async = True
            elif name == "wait" and (match := _WAIT_VALUE.fullmatch(value.strip())) is not None:
                wait_s = float(match.group(1))
    return Preference(respond_async, wait_s)

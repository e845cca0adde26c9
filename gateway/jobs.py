"""From an HTTP request to a job, and from a stored result to an operation: pure logic, no I/O."""

from __future__ import annotations

import hashlib
import re
import uuid

import orjson
from pydantic import ValidationError

from inferq.gateway.errors import ApiCode, ApiError, bad_request
from inferq.gateway.protocol import ErrorDetail, InferenceRequest, InferenceResponse, Operation, OperationStatus
from inferq.gateway.records import OperationRecord
from inferq.model_store.manifest import Manifest
from inferq.model_store.signature import Limits, prepare_inputs
from inferq.shared.contract.codec import describe_validation_error
from inferq.shared.contract.messages import (
    Job,
    Result,
    Status,
    VersionRef,
    is_valid_job_id,
    job_digest,
    parse_version_ref,
)
from inferq.shared.errors import ErrorCode

_PREFER_WAIT = re.compile(r"(?:^|[,;])\s*wait\s*=\s*\"?(\d{1,9}(?:\.\d{1,9})?)\"?\s*(?:$|[,;])", re.IGNORECASE)


def version_ref(raw: str) -> VersionRef:
    """The version named in a path: a number, ``latest`` or an alias; else a 400."""
    try:
        return parse_version_ref(raw)
    except ValueError as exc:
        raise bad_request(f"version: {exc}") from None


def job_id_for(request: InferenceRequest, idempotency_key: str | None) -> str:
    """The body's ``id``, else the ``Idempotency-Key`` header, else a new uuid."""
    job_id = request.id or idempotency_key or str(uuid.uuid4())
    if not is_valid_job_id(job_id):
        raise bad_request("the job id (body 'id' or Idempotency-Key) must be 1-128 characters of [A-Za-z0-9._:-]")
    return job_id


def build_job(model: str, ref: VersionRef, request: InferenceRequest, job_id: str, max_message_bytes: int) -> Job:
    """The job the request asks for, held to the wire contract (the size limit included)."""
    try:
        job = Job(id=job_id, model=model, version=ref, inputs=request.inputs, parameters=request.parameters)
    except ValidationError as exc:
        raise bad_request(describe_validation_error(exc)) from None
    size = len(job.model_dump_json(exclude_none=True))
    if size > max_message_bytes:
        raise bad_request(f"the job is {size} bytes, above the limit of {max_message_bytes}", ApiCode.TOO_LARGE)
    return job


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
        "inputs": [t.model_dump(mode="json") for t in job.inputs],
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
        outputs = result.outputs or []
        if record.outputs is not None:
            wanted = set(record.outputs)
            outputs = [t for t in outputs if t.name in wanted]
        response = InferenceResponse.model_construct(
            model_name=result.model or "",
            model_version=None if result.version is None else str(result.version),
            id=result.id,
            outputs=outputs,
        )
        return operation.model_copy(update={"result": response})
    error = result.error
    detail = ErrorDetail(code=error.code, message=error.message) if error is not None else None
    return operation.model_copy(update={"error": detail})


def prefer_wait_s(prefer: str | None, max_wait_s: float) -> float:
    """Seconds asked for by ``Prefer: wait=N`` (RFC 7240), at most ``max_wait_s``; 0 when absent."""
    if not prefer:
        return 0.0
    match = _PREFER_WAIT.search(prefer)
    if match is None:
        return 0.0
    return min(float(match.group(1)), max_wait_s)

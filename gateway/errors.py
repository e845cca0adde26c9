"""HTTP errors: a status, a stable code and a message, answered as ``{"error": message, "code": code}``.

The codes of a job that cannot run are the workers' own (:class:`inferq.shared.errors.ErrorCode`), so a request
refused at the door carries the code a worker would have given it; the rest belong to HTTP.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from inferq.shared.errors import (
    ErrorCode,
    InputMismatch,
    InvalidPayload,
    JobError,
    ModelLoadError,
    TooLarge,
    UnknownModel,
    UnknownVersion,
)


class ApiCode(StrEnum):
    """Stable codes of HTTP error answers. Never rename: clients switch on them."""

    INVALID_PAYLOAD = ErrorCode.INVALID_PAYLOAD.value
    INPUT_MISMATCH = ErrorCode.INPUT_MISMATCH.value
    TOO_LARGE = ErrorCode.TOO_LARGE.value
    UNKNOWN_MODEL = ErrorCode.UNKNOWN_MODEL.value
    UNKNOWN_VERSION = ErrorCode.UNKNOWN_VERSION.value
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    ID_CONFLICT = "id_conflict"
    UNAUTHORIZED = "unauthorized"
    QUEUE_FULL = "queue_full"
    BROKER_UNAVAILABLE = "broker_unavailable"
    STORE_UNAVAILABLE = "store_unavailable"
    NOT_READY = "not_ready"
    INTERNAL_ERROR = "internal_error"


RETRY_AFTER_S = 1


class ApiError(Exception):
    """An answer other than success; ``retry_after_s`` adds a ``Retry-After`` header."""

    def __init__(self, status: int, code: ApiCode, message: str, *, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


_JOB_ERRORS: dict[type[JobError], tuple[int, ApiCode]] = {
    InvalidPayload: (400, ApiCode.INVALID_PAYLOAD),
    InputMismatch: (400, ApiCode.INPUT_MISMATCH),
    TooLarge: (400, ApiCode.TOO_LARGE),
    UnknownModel: (404, ApiCode.UNKNOWN_MODEL),
    UnknownVersion: (404, ApiCode.UNKNOWN_VERSION),
}


def from_job_error(error: JobError) -> ApiError:
    """The answer to a job refused at the door for the reason a worker would have failed it."""
    if isinstance(error, ModelLoadError):
        # The gateway reads only manifests: this is the model store failing, worth a retry.
        return ApiError(503, ApiCode.STORE_UNAVAILABLE, str(error), retry_after_s=RETRY_AFTER_S)
    for kind, (status, code) in _JOB_ERRORS.items():
        if isinstance(error, kind):
            return ApiError(status, code, str(error))
    return ApiError(400, ApiCode.INVALID_PAYLOAD, str(error))


# What a job that failed after admission answers on the synchronous path, after the Open Inference
# Protocol's habits (KServe, Triton): the caller's fault is 400, a model that is not there 404, the id
# holding another job's result 409 (as at the door); the rest (inference_error, model_load_error,
# dead_lettered, result_refused, expired, no_result) is the server's, 500.
_FAILED_JOB_STATUS: dict[str, int] = {
    ErrorCode.INVALID_PAYLOAD: 400,
    ErrorCode.INPUT_MISMATCH: 400,
    ErrorCode.TOO_LARGE: 400,
    ErrorCode.UNKNOWN_MODEL: 404,
    ErrorCode.UNKNOWN_VERSION: 404,
    ApiCode.ID_CONFLICT: 409,
}


def failed_job_status(code: str) -> int:
    """The HTTP status of a job that failed with ``code``, answered synchronously."""
    return _FAILED_JOB_STATUS.get(code, 500)


def bad_request(message: str, code: ApiCode = ApiCode.INVALID_PAYLOAD) -> ApiError:
    """A body or parameter that breaks the contract."""
    return ApiError(400, code, message)


def store_unavailable(what: str, error: BaseException) -> ApiError:
    """A store (results, operations, models) could not be read or written; a retry may succeed."""
    return ApiError(503, ApiCode.STORE_UNAVAILABLE, f"{what} is unavailable: {error}", retry_after_s=RETRY_AFTER_S)


MAX_VALIDATION_DETAILS = 3
_UNION_MEMBERS = frozenset({"bool", "int", "float", "str"})


def describe_validation(errors: list[Any]) -> str:
    """One short line naming what was wrong in a body, e.g. ``inputs.0.shape: ...`` (as the workers say
    it), from pydantic's errors."""
    seen: dict[str, str] = {}
    for error in errors:
        if error.get("type") == "json_invalid":
            return f"the body is not valid JSON ({error.get('ctx', {}).get('error', 'decode error')})"
        loc = [str(p) for p in error.get("loc", ())]
        member = loc.pop() if loc and loc[-1] in _UNION_MEMBERS else None
        where = ".".join(loc) or "body"
        # One line per field, not one per union member tried; the number's complaint says most.
        if where not in seen or member == "float":
            seen[where] = error.get("msg", "invalid")
    parts = [f"{where}: {msg}" for where, msg in list(seen.items())[:MAX_VALIDATION_DETAILS]]
    if len(seen) > MAX_VALIDATION_DETAILS:
        parts.append(f"and {len(seen) - MAX_VALIDATION_DETAILS} more")
    return "; ".join(parts) or "invalid request"

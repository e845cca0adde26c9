"""Stable error codes and the typed error tree.

A job-level failure is a value: a :class:`JobError` becomes exactly one ``failed`` (or ``expired``)
result whose ``error.code`` is one of :class:`ErrorCode`. Everything else here is an operator-facing
error that the CLI turns into a one-line message and a non-zero exit.
"""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar


class ErrorCode(StrEnum):
    """Stable error codes carried by failed results. Never renumber or rename: clients switch on them."""

    INVALID_PAYLOAD = "invalid_payload"
    UNKNOWN_MODEL = "unknown_model"
    UNKNOWN_VERSION = "unknown_version"
    INPUT_MISMATCH = "input_mismatch"
    MODEL_LOAD_ERROR = "model_load_error"
    INFERENCE_ERROR = "inference_error"
    TOO_LARGE = "too_large"
    EXPIRED = "expired"
    RESULT_REFUSED = "result_refused"
    """The result store refused this result's content (a value it cannot hold); the job ran."""
    DEAD_LETTERED = "dead_lettered"
    """The job was dead-lettered (``inferq dlq list`` shows it, with the reason); it has no result."""
    NO_RESULT = "no_result"
    """The job is neither queued, in flight, stored nor dead-lettered (its queue was purged or deleted)."""


class InferqError(Exception):
    """Base of every error inferq raises on purpose."""


class JobError(InferqError):
    """A failure that belongs to one job (or one batch of jobs) and becomes its result."""

    code: ClassVar[ErrorCode]


class InvalidPayload(JobError):
    """The job message could not be decoded or breaks the contract."""

    code = ErrorCode.INVALID_PAYLOAD


class UnknownModel(JobError):
    """No model of that name exists in the model store."""

    code = ErrorCode.UNKNOWN_MODEL


class UnknownVersion(JobError):
    """The model exists but not that version or alias."""

    code = ErrorCode.UNKNOWN_VERSION


class InputMismatch(JobError):
    """The job's tensors do not match the model's ONNX input signature."""

    code = ErrorCode.INPUT_MISMATCH


class ModelLoadError(JobError):
    """The model version exists but could not be loaded (corrupt file, bad ONNX)."""

    code = ErrorCode.MODEL_LOAD_ERROR


class InferenceError(JobError):
    """onnxruntime raised while running the job."""

    code = ErrorCode.INFERENCE_ERROR


class TooLarge(JobError):
    """The job exceeds a configured size limit."""

    code = ErrorCode.TOO_LARGE


class Expired(JobError):
    """The job's deadline passed before it could run."""

    code = ErrorCode.EXPIRED


class ResultRefused(JobError):
    """The result store refused to keep this one result's content; the job's result says so instead."""

    code = ErrorCode.RESULT_REFUSED


class ConfigError(InferqError):
    """The process's configuration is invalid; raised once at start."""


class BrokerUnavailable(InferqError):
    """The broker could not be reached within the connect timeout."""


class BrokerRefused(ConfigError):
    """The broker refused us for good (wrong credentials, unknown or forbidden virtual host, a queue
    declared with other arguments): retrying cannot help, so it fails at once as a configuration error."""


class ManagementUnavailable(InferqError):
    """The RabbitMQ management API did not answer usefully."""


class PublishError(InferqError):
    """The broker refused a publish (nacked, or returned it as unroutable)."""


class DeadLetterNotFound(InferqError):
    """No dead-lettered message with that id is waiting in the dead-letter queue."""


class InvalidName(InferqError):
    """A model or alias name that could escape the store or is otherwise malformed."""


class StoreError(InferqError):
    """A model or result store operation failed for a reason the caller can act on."""


class VersionExists(StoreError):
    """Publishing over an existing, immutable model version."""


class ResultNotFound(StoreError):
    """No stored result for that job id."""


class NotGuardable(StoreError):
    """A guarded alias move with nothing to return to (the alias does not exist yet, or already points
    there), or one on accuracy for a version that predicts numbers."""


class IdConflict(InferqError):
    """A job id already belongs to another job (another model, inputs or parameters): its result is not
    this job's answer."""


class StoreRefused(StoreError):
    """The store refused us for good (authentication, permission, a missing bucket or table): no retry
    fixes it; the worker stops with it, acking nothing."""


class ValueRefused(StoreError):
    """The store refused the content of particular results (a value it cannot hold); the others may be
    stored. ``ids`` names the refused results when the store can tell, else it is empty."""

    def __init__(self, message: str, ids: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.ids = ids


class StoreUnreachable(OSError):
    """A store could not be reached, or answered with a failure worth retrying (timeout, 5xx, throttling).

    An ``OSError`` on purpose: callers that retry I/O failures with backoff (the worker's result writes)
    treat it like a full disk or a vanished mount, and nothing is acked meanwhile."""

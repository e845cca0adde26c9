"""The HTTP messages: the Open Inference Protocol (KServe V2) request and response bodies, and the
asynchronous operation that wraps them. One frozen pydantic model each, decoded once at the edge."""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from inferq.shared.contract.messages import JOB_ID_PATTERN, Datatype, OutputTensor, Tensor

_FROZEN = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)
MAX_INPUTS = 64
PLATFORM = "onnxruntime_onnx"

TensorName = Annotated[str, StringConstraints(min_length=1, max_length=256)]


def _finite(value: Any) -> bool:
    """True when ``value`` (a JSON value) holds no NaN or infinity anywhere."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


class RequestedOutput(BaseModel):
    """An output the caller wants back; the others are left out of the operation's result."""

    model_config = _FROZEN

    name: TensorName
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferenceRequest(BaseModel):
    """An Open Inference Protocol inference request; ``data`` is flat and row-major, as on the wire."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        allow_inf_nan=False,
        json_schema_extra={
            "example": {
                "id": "order-42",
                "inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}],
            }
        },
    )

    id: Annotated[str, StringConstraints(pattern=JOB_ID_PATTERN)] | None = Field(
        default=None, description="The job id; else the Idempotency-Key header; else a new uuid."
    )
    inputs: Annotated[list[Tensor], Field(min_length=1, max_length=MAX_INPUTS)]
    parameters: dict[str, Any] = Field(default_factory=dict)
    outputs: Annotated[list[RequestedOutput], Field(min_length=1, max_length=MAX_INPUTS)] | None = None

    @field_validator("parameters")
    @classmethod
    def _parameters_are_finite(cls, value: dict[str, Any]) -> dict[str, Any]:
        if not _finite(value):
            raise ValueError("NaN and infinity are not allowed")
        return value


class InferenceResponse(BaseModel):
    """An Open Inference Protocol inference response: what the job computed."""

    model_config = _FROZEN

    model_name: str
    model_version: str | None = Field(description="The concrete version that ran.")
    id: str
    outputs: list[OutputTensor]


class ErrorDetail(BaseModel):
    """Why a job did not succeed: the stable code a worker gave it and a human message."""

    model_config = _FROZEN

    code: str
    message: str


class OperationStatus(StrEnum):
    """Where an accepted job is: waiting or running, or finished one of three ways."""

    QUEUED = "queued"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    EXPIRED = "expired"


class Operation(BaseModel):
    """An accepted job seen from HTTP: its status, and its result or error once finished."""

    model_config = _FROZEN

    id: str
    status: OperationStatus
    model_name: str | None = None
    model_version: str | None = Field(default=None, description="The version as requested.")
    result: InferenceResponse | None = None
    error: ErrorDetail | None = None


class ErrorBody(BaseModel):
    """Every error answer: a human message and a stable code."""

    model_config = _FROZEN

    error: str
    code: str


class TensorMetadata(BaseModel):
    """An input or output of a model; ``-1`` in ``shape`` is a dimension of any size."""

    model_config = _FROZEN

    name: str
    datatype: Datatype
    shape: list[int]


class ModelMetadata(BaseModel):
    """Open Inference Protocol model metadata, from the manifest of the version asked for."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    name: str
    versions: list[str]
    platform: str = PLATFORM
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class Liveness(BaseModel):
    """The process answers."""

    model_config = _FROZEN

    live: bool


class Readiness(BaseModel):
    """The gateway can accept jobs: connected to the broker, and the jobs queue below its bound."""

    model_config = _FROZEN

    ready: bool

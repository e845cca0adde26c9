"""The HTTP messages: the Open Inference Protocol (KServe V2) request and response bodies, the server,
model and readiness documents, and the asynchronous operation that wraps a job. One frozen pydantic
model each, decoded once at the edge (the binary tensor data extension: :mod:`inferq.gateway.binary`)."""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from inferq.shared.contract.messages import (
    JOB_ID_PATTERN,
    MAX_NAME_LENGTH,
    MAX_TENSOR_RANK,
    Datatype,
    OutputTensor,
    Tensor,
    trusted,
)

_FROZEN = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)
_ANSWER = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="strings")
"""Answers carrying outputs: NaN and ±Inf a model computed are written as the wire contract says."""
MAX_INPUTS = 64
PLATFORM = "onnxruntime_onnx"
BINARY_DATA_SIZE = "binary_data_size"
"""Input and output parameter of the binary tensor data extension: the tensor's bytes after the JSON."""
BINARY_DATA = "binary_data"
"""Requested output parameter: send this output's data as bytes after the JSON (or not, when false)."""
BINARY_DATA_OUTPUT = "binary_data_output"
"""Request parameter: send every output not asking otherwise as bytes after the JSON."""

TensorName = Annotated[str, StringConstraints(min_length=1, max_length=MAX_NAME_LENGTH)]
Shape = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=MAX_TENSOR_RANK)]


def _finite(value: Any) -> bool:
    """True when ``value`` (a JSON value) holds no NaN or infinity anywhere."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


class InputTensor(BaseModel):
    """An input as sent: ``data`` flat and row-major, or (binary tensor data extension) no ``data`` and
    ``parameters.binary_data_size`` bytes of it after the JSON."""

    model_config = _FROZEN

    name: TensorName
    shape: Shape
    datatype: Datatype
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: list[bool | int | float | str] | None = None

    @model_validator(mode="after")
    def _data_matches_shape(self) -> InputTensor:
        if self.data is None:
            return self
        expected = math.prod(self.shape)
        if len(self.data) != expected:
            raise ValueError(
                f"tensor {self.name!r}: shape {self.shape} holds {expected} elements but data has {len(self.data)}"
            )
        if self.parameters.get(BINARY_DATA_SIZE) is not None:
            raise ValueError(f"tensor {self.name!r}: data and parameters.binary_data_size are exclusive")
        return self

    def tensor(self) -> Tensor:
        """The job's tensor (``data`` must be there: binary data is read into it first)."""
        assert self.data is not None
        # Held to the same rules as Tensor by this model's validation: no second pass over the data.
        return trusted(Tensor, name=self.name, shape=self.shape, datatype=self.datatype, data=self.data)


class RequestedOutput(BaseModel):
    """An output the caller wants back; the others are left out of the operation's result.
    ``parameters.binary_data`` asks for its data as bytes after the JSON (synchronous answers only)."""

    model_config = _FROZEN

    name: TensorName
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferenceRequest(BaseModel):
    """An Open Inference Protocol inference request; ``data`` is flat and row-major, as on the wire.
    The binary tensor data extension's parameters (``binary_data_output``, ``binary_data``) say how to
    answer, not what to compute: they are taken out before the request becomes a job."""

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
    inputs: Annotated[list[InputTensor], Field(min_length=1, max_length=MAX_INPUTS)]
    parameters: dict[str, Any] = Field(default_factory=dict)
    outputs: Annotated[list[RequestedOutput], Field(min_length=1, max_length=MAX_INPUTS)] | None = None

    @field_validator("parameters")
    @classmethod
    def _parameters_are_finite(cls, value: dict[str, Any]) -> dict[str, Any]:
        if not _finite(value):
            raise ValueError("NaN and infinity are not allowed")
        return value


class BinaryOutputTensor(BaseModel):
    """An output whose data follows the JSON of the answer as raw little-endian bytes (BYTES: each
    element a 4-byte length, then its UTF-8), ``parameters.binary_data_size`` of them."""

    model_config = _FROZEN

    name: str
    shape: list[int]
    datatype: Datatype
    parameters: dict[str, int]


class InferenceResponse(BaseModel):
    """An Open Inference Protocol inference response: what the job computed."""

    model_config = _ANSWER

    model_name: str
    model_version: str | None = Field(description="The concrete version that ran.")
    id: str
    parameters: dict[str, float] | None = Field(
        default=None, description="Where the job's time went: queue_ms, inference_ms, total_ms."
    )
    outputs: list[OutputTensor | BinaryOutputTensor] = Field(
        description="Binary outputs (no data, parameters.binary_data_size) only in a binary answer."
    )


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

    model_config = _ANSWER

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


class ModelReadiness(BaseModel):
    """A version of a model can be served now: it exists, and a worker consumes the jobs queue."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    name: str
    ready: bool


class ServerMetadata(BaseModel):
    """Open Inference Protocol server metadata: what this server is and the extensions it speaks."""

    model_config = _FROZEN

    name: str
    version: str
    extensions: list[str]

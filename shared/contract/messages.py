"""Every wire message, one frozen pydantic model each, decoded once at the edge.

Tensors follow the Open Inference Protocol (KServe V2) JSON form: ``name``, ``shape``, ``datatype`` and
``data`` flat in row-major order.
"""

from __future__ import annotations

import hashlib
import math
import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, TypeVar

import numpy as np
import numpy.typing as npt
import orjson
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from inferq.shared.errors import ErrorCode, InvalidPayload

JOB_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
# Model and alias names become path components and S3 key parts: no '/', no leading '.', no '..'.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
ALIAS_PATTERN = r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$"
LATEST = "latest"

_JOB_ID_RE = re.compile(JOB_ID_PATTERN)
_NAME_RE = re.compile(NAME_PATTERN)
_ALIAS_RE = re.compile(ALIAS_PATTERN)

JobId = Annotated[str, StringConstraints(pattern=JOB_ID_PATTERN)]
ModelName = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
VersionRef = int | str
"""A concrete version (positive int), ``"latest"`` or an alias name."""


def is_valid_job_id(value: object) -> bool:
    """True when ``value`` is a job id the contract accepts."""
    return isinstance(value, str) and _JOB_ID_RE.fullmatch(value) is not None


def is_valid_name(value: str) -> bool:
    """True when ``value`` can name a model without escaping the store."""
    return _NAME_RE.fullmatch(value) is not None and ".." not in value


def is_valid_alias(value: str) -> bool:
    """True when ``value`` can name an alias (must start with a letter; ``latest`` is reserved)."""
    return _ALIAS_RE.fullmatch(value) is not None and ".." not in value and value != LATEST


def parse_version_ref(value: int | str) -> VersionRef:
    """Normalise a version reference: ``3`` and ``"3"`` are version 3; otherwise ``latest`` or an alias."""
    if isinstance(value, bool):
        raise ValueError("version must be a positive integer, 'latest' or an alias name")
    if isinstance(value, int) or value.isdigit():
        number = int(value)
        if number < 1:
            raise ValueError("version numbers start at 1")
        return number
    if value == LATEST or is_valid_alias(value):
        return value
    raise ValueError(f"version {value!r} is neither a positive integer, 'latest' nor a valid alias name")


class Datatype(StrEnum):
    """Tensor element types of the Open Inference Protocol."""

    BOOL = "BOOL"
    UINT8 = "UINT8"
    UINT16 = "UINT16"
    UINT32 = "UINT32"
    UINT64 = "UINT64"
    INT8 = "INT8"
    INT16 = "INT16"
    INT32 = "INT32"
    INT64 = "INT64"
    FP16 = "FP16"
    FP32 = "FP32"
    FP64 = "FP64"
    BYTES = "BYTES"


NUMPY_DTYPES: dict[Datatype, npt.DTypeLike] = {
    Datatype.BOOL: np.bool_,
    Datatype.UINT8: np.uint8,
    Datatype.UINT16: np.uint16,
    Datatype.UINT32: np.uint32,
    Datatype.UINT64: np.uint64,
    Datatype.INT8: np.int8,
    Datatype.INT16: np.int16,
    Datatype.INT32: np.int32,
    Datatype.INT64: np.int64,
    Datatype.FP16: np.float16,
    Datatype.FP32: np.float32,
    Datatype.FP64: np.float64,
    Datatype.BYTES: np.object_,
}
DATATYPE_OF_NUMPY: dict[np.dtype[Any], Datatype] = {
    np.dtype(v): k for k, v in NUMPY_DTYPES.items() if k is not Datatype.BYTES
}

_FROZEN = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)
MAX_TENSOR_RANK = 8
MAX_INPUTS = 64
MAX_NAME_LENGTH = 256

ModelT = TypeVar("ModelT", bound=BaseModel)


def trusted(cls: type[ModelT], **values: Any) -> ModelT:
    """An instance of ``cls`` from values known to be valid, without running validation.

    What ``model_construct`` does, minus its per-field bookkeeping (it costs ~5 µs per object, and the
    worker builds several per job). Only for values this code built or checked itself.
    """
    return _trusted_from(cls, values)


def _trusted_from(cls: type[ModelT], values: dict[str, Any]) -> ModelT:
    obj = _new(cls)
    _set(obj, "__dict__", values)
    _set_fields_set(obj, set(values))
    _set_extra(obj, None)
    _set_private(obj, None)
    return obj


_new = object.__new__
_set = object.__setattr__
# BaseModel's own slots, set through their descriptors: a third cheaper than object.__setattr__ by name.
_set_fields_set = BaseModel.__dict__["__pydantic_fields_set__"].__set__
_set_extra = BaseModel.__dict__["__pydantic_extra__"].__set__
_set_private = BaseModel.__dict__["__pydantic_private__"].__set__


def _fields_of(value: Any) -> Any:
    """orjson's fallback for the models inside a result (its tensors and timings): their fields."""
    if isinstance(value, BaseModel):
        return value.__dict__
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


class Tensor(BaseModel):
    """One named tensor, data flat and row-major."""

    model_config = _FROZEN

    name: Annotated[str, StringConstraints(min_length=1, max_length=MAX_NAME_LENGTH)]
    shape: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=MAX_TENSOR_RANK)]
    datatype: Datatype
    data: list[bool | int | float | str]

    @model_validator(mode="after")
    def _data_matches_shape(self) -> Tensor:
        expected = math.prod(self.shape)
        if len(self.data) != expected:
            raise ValueError(
                f"tensor {self.name!r}: shape {self.shape} holds {expected} elements but data has {len(self.data)}"
            )
        return self

    def to_numpy(self) -> npt.NDArray[Any]:
        """The tensor as a numpy array of its declared datatype; raises :class:`InvalidPayload` on bad data."""
        dtype = NUMPY_DTYPES[self.datatype]
        if self.datatype is Datatype.BYTES:
            if not all(isinstance(x, str) for x in self.data):
                raise InvalidPayload(f"tensor {self.name!r}: BYTES data must be strings")
            return np.array(self.data, dtype=np.object_).reshape(self.shape)
        if any(isinstance(x, str) for x in self.data):
            raise InvalidPayload(f"tensor {self.name!r}: {self.datatype} data must be numbers, found a string")
        try:
            with np.errstate(all="raise"):
                array = np.asarray(self.data, dtype=dtype)
        except (OverflowError, ValueError, FloatingPointError) as exc:
            raise InvalidPayload(f"tensor {self.name!r}: data does not fit {self.datatype}: {exc}") from None
        return array.reshape(self.shape)

    @classmethod
    def from_numpy(cls, name: str, array: npt.NDArray[Any]) -> Tensor:
        """Encode an output array; object arrays (strings) become BYTES."""
        if array.dtype == np.object_ or array.dtype.kind in "US":
            datatype = Datatype.BYTES
            data: list[Any] = [str(x) for x in array.reshape(-1)]
        else:
            datatype = DATATYPE_OF_NUMPY[array.dtype]
            data = array.reshape(-1).tolist()
        return cls.model_construct(name=name, shape=list(array.shape), datatype=datatype, data=data)


FLOAT_DATATYPES = frozenset({Datatype.FP16, Datatype.FP32, Datatype.FP64})
NON_FINITE_STRINGS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
"""How outputs carry the floats JSON has no numbers for (``float()`` reads these strings back too)."""


def non_finite_string(value: float) -> str:
    """The wire string of a NaN or infinite float."""
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


class OutputTensor(Tensor):
    """An output tensor. Unlike inputs, it may hold NaN and ±Inf (a model computes them): on the wire
    they are the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"``, read back as floats here.
    A ``null`` in float data (how such values were once written) reads as NaN."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=True, ser_json_inf_nan="strings")

    @model_validator(mode="before")
    @classmethod
    def _non_finite_from_wire(cls, value: Any) -> Any:
        if isinstance(value, Tensor):
            value = dict(value.__dict__)
        if not isinstance(value, dict) or value.get("datatype") not in FLOAT_DATATYPES:
            return value
        data = value.get("data")
        if isinstance(data, list) and any(x is None or type(x) is str for x in data):
            decoded = [NON_FINITE_STRINGS.get(x, x) if type(x) is str else math.nan if x is None else x for x in data]
            value = {**value, "data": decoded}
        return value


class Job(BaseModel):
    """An inference job: run ``model`` at ``version`` on ``inputs``."""

    model_config = _FROZEN

    id: JobId
    model: ModelName
    version: VersionRef = LATEST
    inputs: Annotated[list[Tensor], Field(min_length=1, max_length=MAX_INPUTS)]
    parameters: dict[str, Any] = Field(default_factory=dict)
    deadline: datetime | None = None

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, value: Any) -> VersionRef:
        if not isinstance(value, int | str):
            raise ValueError("version must be a positive integer, 'latest' or an alias name")
        return parse_version_ref(value)

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        if not is_valid_name(value):
            raise ValueError(f"model name {value!r} is not allowed")
        return value

    @field_validator("deadline")
    @classmethod
    def _deadline_is_aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("deadline must carry a timezone, e.g. 2026-11-24T10:00:00Z")
        return value

    @property
    def rows(self) -> int:
        """Rows in the job: the first dimension of its first input."""
        return self.inputs[0].shape[0]


class Status(StrEnum):
    """Terminal states of a job."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    EXPIRED = "expired"


class ErrorInfo(BaseModel):
    """Why a job failed: a stable code and a human message."""

    model_config = _FROZEN

    code: ErrorCode
    message: str


class Timings(BaseModel):
    """Where a job's time went, in milliseconds."""

    model_config = _FROZEN

    queue_ms: float | None = None
    inference_ms: float | None = None
    total_ms: float | None = None


class Result(BaseModel):
    """The one result of a job, published to the result queue and kept in the result store."""

    # The wire form, encoded once: the worker both stores and publishes every result. A slot, not a
    # field or private attribute, so it takes no part in equality, copies or validation.
    __slots__ = ("_wire",)
    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="strings")

    id: JobId
    model: str | None
    requested_version: VersionRef | None
    version: int | None = None
    model_sha256: str | None = None
    job_sha256: str | None = None
    """Digest of the job this result answers (model, requested version, inputs, parameters): a later job
    reusing the id for other work is told apart from a redelivery of this one."""
    status: Status
    outputs: list[OutputTensor] | None = None
    error: ErrorInfo | None = None
    worker: str
    timings: Timings = Field(default_factory=Timings)

    @model_validator(mode="after")
    def _status_matches_payload(self) -> Result:
        if self.status is Status.SUCCEEDED and (self.outputs is None or self.error is not None):
            raise ValueError("a succeeded result carries outputs and no error")
        if self.status is not Status.SUCCEEDED and self.error is None:
            raise ValueError(f"a {self.status} result carries an error")
        return self

    @classmethod
    def encoded(cls, values: dict[str, Any]) -> Result:
        """A result built from trusted ``values`` (every field, in order, taken as the result's own: the
        caller must not change the dict afterwards) and encoded once, from those same values (the
        worker's hot path: no validation, no second encoding, no copy)."""
        wire = orjson.dumps(values, default=_fields_of)
        result = _trusted_from(cls, values)
        _set(result, "_wire", wire)
        return result

    def to_json(self) -> bytes:
        """The wire form (UTF-8 JSON), encoded on first use.

        NOTE: the model is frozen, so the encoding stays valid; mutating a list inside it (which
        frozen does not prevent) would not be seen by a second call.
        """
        wire: bytes | None = getattr(self, "_wire", None)
        if wire is None:
            wire = self.model_dump_json().encode()
            object.__setattr__(self, "_wire", wire)
        return wire


def job_digest(job: Job) -> str:
    """SHA-256 of what a job asks for (model, requested version, inputs, parameters), not of its id: a
    stored result carries it, so whoever reads a result can tell whether it answers their job."""
    # NOTE: stored results carry this digest: any change to what it hashes makes every redelivery of a
    # job stored before the change look like an id conflict. (orjson writes a StrEnum as its value, and
    # sorting keys only matters for the parameters, the one object here.)
    inputs = [(t.name, t.shape, t.datatype, t.data) for t in job.inputs]
    option = orjson.OPT_SORT_KEYS if job.parameters else 0
    material = orjson.dumps([job.model, job.version, inputs, job.parameters], option=option)
    return hashlib.sha256(material).hexdigest()

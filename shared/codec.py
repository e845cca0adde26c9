"""Decoding job deliveries at the edge: a message becomes a :class:`Job`, a :class:`Rejected` job
(its id is readable, so it gets a ``failed`` result) or an :class:`Undecodable` message (no readable id,
so it goes to the dead-letter queue with a reason)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import ValidationError

from shared.errors import InvalidPayload, JobError, TooLarge
from shared.messages import (
    LATEST,
    MAX_INPUTS,
    MAX_NAME_LENGTH,
    MAX_TENSOR_RANK,
    Datatype,
    Job,
    Tensor,
    is_valid_job_id,
    is_valid_name,
    parse_version_ref,
    trusted,
)

MAX_ERROR_DETAILS = 3
_UNION_MEMBERS = frozenset({"bool", "int", "float", "str"})


@dataclass(frozen=True, slots=True)
class Rejected:
    """A job whose id is known but which cannot run: it gets exactly one failed result."""

    job_id: str
    model: str | None
    requested_version: int | str | None
    error: JobError


@dataclass(frozen=True, slots=True)
class Undecodable:
    """A message with no usable job id: dead-lettered, body unchanged, with ``reason`` in a header."""

    reason: str


Decoded = Job | Rejected | Undecodable


def decode_job(body: bytes, message_id: str | None, max_message_bytes: int) -> Decoded:
    """Decode one delivery. Never raises: every outcome is a value."""
    if len(body) > max_message_bytes:
        error = TooLarge(f"message is {len(body)} bytes, above the limit of {max_message_bytes}")
        if is_valid_job_id(message_id):
            assert message_id is not None
            return Rejected(message_id, None, None, error)
        return Undecodable(f"too_large: {error}")
    try:
        fast = _fast_job(orjson.loads(body))
    except (orjson.JSONDecodeError, RecursionError):
        fast = None
    if fast is not None:
        return fast
    # Anything the fast path is not sure about gets the contract's own, precise validation.
    try:
        return Job.model_validate_json(body)
    except ValidationError as exc:
        return _reject(body, message_id, describe_validation_error(exc))
    except RecursionError:
        return _reject(b"", message_id, "JSON nested too deeply")


_JOB_KEYS = frozenset({"id", "model", "version", "inputs", "parameters", "deadline"})
_TENSOR_KEYS = frozenset({"name", "shape", "datatype", "data"})
_DATATYPES = {d.value: d for d in Datatype}
_NUMBER_TYPES = frozenset({bool, int, float})
_INT_LIMIT = float(2**63)


def _fast_job(value: Any) -> Job | None:
    """The job in ``value`` (parsed JSON) when it is plainly valid, built without pydantic's validation;
    ``None`` when in any doubt, so the caller validates it the slow, precise way.

    NOTE: every check here must be at least as strict as :class:`Job`'s own; ``None`` is always safe.
    """
    if type(value) is not dict or not value.keys() <= _JOB_KEYS:
        return None
    job_id, model, version = value.get("id"), value.get("model"), value.get("version", LATEST)
    parameters = value.get("parameters", {})
    if not (is_valid_job_id(job_id) and type(model) is str and is_valid_name(model)) or value.get("deadline"):
        return None
    if type(parameters) is not dict:
        return None
    if (type(version) is str and version != LATEST) or type(version) is int:
        try:
            version = parse_version_ref(version)
        except ValueError:
            return None
    elif version != LATEST:
        return None
    inputs = value.get("inputs")
    if type(inputs) is not list or not 1 <= len(inputs) <= MAX_INPUTS:
        return None
    tensors = []
    for tensor in inputs:
        built = _fast_tensor(tensor)
        if built is None:
            return None
        tensors.append(built)
    return trusted(Job, id=job_id, model=model, version=version, inputs=tensors, parameters=parameters, deadline=None)


def _fast_tensor(value: Any) -> Tensor | None:
    if type(value) is not dict or value.keys() != _TENSOR_KEYS:
        return None
    name, shape, datatype, data = value["name"], value["shape"], _DATATYPES.get(value["datatype"]), value["data"]
    if type(name) is not str or not 1 <= len(name) <= MAX_NAME_LENGTH or datatype is None or type(data) is not list:
        return None
    if type(shape) is not list or not 1 <= len(shape) <= MAX_TENSOR_RANK:
        return None
    for dim in shape:
        if type(dim) is not int or dim < 0:
            return None
    if len(data) != math.prod(shape):
        return None
    types = set(map(type, data))
    if not types <= _NUMBER_TYPES:
        return None  # strings (BYTES, or a mistake) and anything else: the precise path
    if float in types and not (min(data) > -_INT_LIMIT and max(data) < _INT_LIMIT):
        return None  # orjson reads integers beyond 64 bits as floats, pydantic as integers
    return trusted(Tensor, name=name, shape=shape, datatype=datatype, data=data)


def _reject(body: bytes, message_id: str | None, problem: str) -> Decoded:
    fields = _loose_fields(body)
    job_id = fields.get("id")
    if not is_valid_job_id(job_id):
        job_id = message_id if is_valid_job_id(message_id) else None
    if job_id is None:
        return Undecodable(f"invalid_payload: no readable job id ({problem})")
    model = fields.get("model")
    model = model if isinstance(model, str) and is_valid_name(model) else None
    return Rejected(job_id, model, _loose_version(fields.get("version")), InvalidPayload(problem))


def _loose_fields(body: bytes) -> dict[str, Any]:
    """Best-effort look at a body that failed validation, to find its id, model and version."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        try:  # the stdlib parser also reads NaN and Infinity, which the contract forbids but may carry an id
            value = json.loads(body)
        except (ValueError, RecursionError):
            return {}
    return value if isinstance(value, dict) else {}


def _loose_version(value: object) -> int | str | None:
    if isinstance(value, int | str):
        try:
            return parse_version_ref(value)
        except ValueError:
            return None
    return None


def describe_validation_error(exc: ValidationError) -> str:
    """A short, human line naming what was wrong, e.g. ``inputs.0.shape: ...``."""
    seen: dict[str, str] = {}
    for error in exc.errors(include_url=False, include_input=False):
        loc = list(error["loc"])
        member = loc.pop() if loc and loc[-1] in _UNION_MEMBERS else None
        where = ".".join(str(p) for p in loc) or "message"
        # One line per field, not one per union member tried; the number's complaint says most.
        if where not in seen or member == "float":
            seen[where] = error["msg"]
    parts = [f"{where}: {msg}" for where, msg in list(seen.items())[:MAX_ERROR_DETAILS]]
    if len(seen) > MAX_ERROR_DETAILS:
        parts.append(f"and {len(seen) - MAX_ERROR_DETAILS} more")
    return "; ".join(parts)

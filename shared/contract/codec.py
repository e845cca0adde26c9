"""Decoding job deliveries at the edge: a message becomes a :class:`Job`, a :class:`Rejected` job
(its id is readable, so it gets a ``failed`` result) or an :class:`Undecodable` message (no readable id,
so it goes to the dead-letter queue with a reason)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
import orjson
from pydantic import ValidationError

from inferq.shared.contract.messages import (
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
from inferq.shared.errors import InvalidPayload, JobError, TooLarge

MAX_ERROR_DETAILS = 3
_UNION_MEMBERS = frozenset({"bool", "int", "float", "str"})


@dataclass(frozen=True, slots=True)
class Rejected:
    """A job whose id is known but which cannot run: it gets exactly one failed result."""

    job_id: str
    model: str | None
    requested_version: int | str | None
    error: JobError
    body_sha256: str
    """:func:`rejected_digest` of the message: the failed result's job digest, so that a corrected job sent
    later under the same id is told apart from this one."""


REJECTED_DIGEST_PREFIX = b"inferq rejected message\n"
"""What a rejected message's digest hashes before its body. ``job_digest`` hashes a JSON array, which
never starts with these bytes: the two digests cannot be equal (short of a SHA-256 collision)."""


def rejected_digest(body: bytes) -> str:
    """SHA-256 of a rejected message's body as it arrived, never equal to the digest of a valid job."""
    return hashlib.sha256(REJECTED_DIGEST_PREFIX + body).hexdigest()


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
            return Rejected(message_id, None, None, error, rejected_digest(body))
        return Undecodable(f"too_large: {error}")
    try:
        fast = _fast_job(_read_wire_job(body))
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        fast = None
    if fast is not None:
        return fast
    # Anything the fast path is not sure about gets the contract's own, precise validation.
    try:
        return Job.model_validate_json(body)
    except ValidationError as exc:
        return _reject(body, message_id, describe_validation_error(exc))
    except RecursionError:
        return _reject(body, message_id, "JSON nested too deeply", readable=False)


_DATATYPES = {d.value: d for d in Datatype}
_Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
"""Integers pydantic and every reader agree on (beyond 64 bits, the precise path decides)."""


class _WireTensor(msgspec.Struct, forbid_unknown_fields=True):
    """A tensor as the fast path reads it: every field required, data of the types :class:`Tensor` takes.

    Strings too: a table's text columns (BYTES) are most of a tabular job's decoding, and the precise path
    would spend ten times as long on them (measured: 5,000 rows of two text and three number columns,
    3.4 ms through pydantic, 0.5 ms here). Whether data fits its datatype is, on both paths, for the
    conversion to arrays to say."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME_LENGTH)]
    shape: Annotated[list[Annotated[int, msgspec.Meta(ge=0)]], msgspec.Meta(min_length=1, max_length=MAX_TENSOR_RANK)]
    datatype: str
    data: list[bool | _Int64 | float | str]


class _WireJob(msgspec.Struct, forbid_unknown_fields=True):
    """A job as the fast path reads it (a deadline, to be parsed, takes the precise path)."""

    id: str
    model: str
    inputs: Annotated[list[_WireTensor], msgspec.Meta(min_length=1, max_length=MAX_INPUTS)]
    version: int | str = LATEST
    parameters: dict[str, Any] = msgspec.field(default_factory=dict)
    deadline: None = None


_read_wire_job = msgspec.json.Decoder(_WireJob).decode
_known_names: set[str] = set()
_KNOWN_NAMES_MAX = 4096


def _is_known_name(name: str) -> bool:
    """:func:`is_valid_name`, remembered for the few model names a worker sees again and again."""
    if name in _known_names:
        return True
    if not is_valid_name(name):
        return False
    if len(_known_names) < _KNOWN_NAMES_MAX:
        _known_names.add(name)
    return True


def _fast_job(wire: _WireJob) -> Job | None:
    """The :class:`Job` read by msgspec (types, lengths and bounds checked in C) when it is plainly
    valid, built without pydantic's validation; ``None`` when in any doubt, so the caller validates it
    the slow, precise way.

    NOTE: every check here and in :class:`_WireJob` must be at least as strict as :class:`Job`'s own;
    ``None`` is always safe.
    """
    version = wire.version
    if not (is_valid_job_id(wire.id) and _is_known_name(wire.model)):
        return None
    if version != LATEST:
        try:
            version = parse_version_ref(version)
        except ValueError:
            return None
    tensors = []
    for tensor in wire.inputs:
        datatype = _DATATYPES.get(tensor.datatype)
        if datatype is None or len(tensor.data) != math.prod(tensor.shape):
            return None
        tensors.append(trusted(Tensor, name=tensor.name, shape=tensor.shape, datatype=datatype, data=tensor.data))
    return trusted(
        Job, id=wire.id, model=wire.model, version=version, inputs=tensors, parameters=wire.parameters, deadline=None
    )


def _reject(body: bytes, message_id: str | None, problem: str, *, readable: bool = True) -> Decoded:
    fields = _loose_fields(body) if readable else {}
    job_id = fields.get("id")
    if not is_valid_job_id(job_id):
        job_id = message_id if is_valid_job_id(message_id) else None
    if job_id is None:
        return Undecodable(f"invalid_payload: no readable job id ({problem})")
    model = fields.get("model")
    model = model if isinstance(model, str) and is_valid_name(model) else None
    version = _loose_version(fields.get("version"))
    return Rejected(job_id, model, version, InvalidPayload(problem), rejected_digest(body))


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

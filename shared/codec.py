"""Decoding job deliveries at the edge: a message becomes a :class:`Job`, a :class:`Rejected` job
(its id is readable, so it gets a ``failed`` result) or an :class:`Undecodable` message (no readable id,
so it goes to the dead-letter queue with a reason)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import ValidationError

from shared.errors import InvalidPayload, JobError, TooLarge
from shared.messages import Job, is_valid_job_id, is_valid_name, parse_version_ref

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
        return Job.model_validate_json(body)
    except ValidationError as exc:
        return _reject(body, message_id, describe_validation_error(exc))
    except RecursionError:
        return _reject(b"", message_id, "JSON nested too deeply")


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

"""Dead letters as the API sees them: which job a dead letter is (its id and job digest) and why it was
dead-lettered, so the operation of exactly that job is answered ``failed`` / ``dead_lettered``."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from pika.spec import BasicProperties

from inferq.shared.broker.topology import REASON_HEADER
from inferq.shared.contract.codec import decode_job
from inferq.shared.contract.messages import Job, job_digest

UNKNOWN_REASON = "unknown"
REMEMBERED = 65_536
"""Dead letters a replica keeps in memory (the newest), to answer callers waiting on ``Prefer: wait``."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A job that was dead-lettered: its id, the digest of the job itself, and the reason."""

    job_id: str
    job_sha256: str
    reason: str


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def reason_of(headers: dict[str, Any]) -> str:
    """Why a message was dead-lettered: inferq's own header (the worker's), else the broker's
    ``x-death`` (``delivery_limit`` for a job redelivered too often, ``expired``, ``rejected``)."""
    if REASON_HEADER in headers:
        return _text(headers[REASON_HEADER])
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict) and "reason" in deaths[0]:
        return _text(deaths[0]["reason"])
    if "x-first-death-reason" in headers:
        return _text(headers["x-first-death-reason"])
    return UNKNOWN_REASON


def read_dead_letter(properties: BasicProperties, body: bytes, max_message_bytes: int) -> DeadLetter | None:
    """The dead letter of a job, or ``None`` for a message that is not a readable job (the API publishes
    only jobs that decode, so such a message is never one of its operations)."""
    decoded = decode_job(body, properties.message_id, max_message_bytes)
    if not isinstance(decoded, Job):
        return None
    return DeadLetter(decoded.id, job_digest(decoded), reason_of(dict(properties.headers or {})))


class RecentDeadLetters:
    """The newest dead letters this replica heard of, by job id: a caller waiting for a result learns of
    its job's dead letter without reading the operation store on every look."""

    def __init__(self, size: int = REMEMBERED) -> None:
        self._size = size
        self._letters: OrderedDict[str, DeadLetter] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, letters: list[DeadLetter]) -> None:
        """Remember ``letters``, forgetting the oldest beyond the size."""
        with self._lock:
            for letter in letters:
                self._letters[letter.job_id] = letter
            while len(self._letters) > self._size:
                self._letters.popitem(last=False)

    def of(self, job_id: str, job_sha256: str | None) -> DeadLetter | None:
        """The dead letter of the job with ``job_id`` and ``job_sha256``, if one was heard of."""
        with self._lock:
            letter = self._letters.get(job_id)
        return letter if letter is not None and letter.job_sha256 == job_sha256 else None

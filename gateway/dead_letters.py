"""Dead letters as the API sees them: which job a dead letter is (its id and job digest) and why it was
dead-lettered, so the operation of exactly that job is answered ``failed`` / ``dead_lettered``."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from pika.spec import BasicProperties

from inferq.shared.broker.topology import death_of
from inferq.shared.contract.codec import decode_job
from inferq.shared.contract.messages import Job, job_digest

REMEMBERED = 65_536
"""Dead letters a replica keeps in memory (the newest), to answer callers waiting on ``Prefer: wait``."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A job that was dead-lettered: its id, the digest of the job itself, and the reason."""

    job_id: str
    job_sha256: str
    reason: str


def read_dead_letter(properties: BasicProperties, body: bytes, max_message_bytes: int) -> DeadLetter | None:
    """The dead letter of a job, or ``None`` for a message that is not a readable job (the API publishes
    only jobs that decode, so such a message is never one of its operations)."""
    decoded = decode_job(body, properties.message_id, max_message_bytes)
    if not isinstance(decoded, Job):
        return None
    return DeadLetter(decoded.id, job_digest(decoded), death_of(dict(properties.headers or {}))[0])


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

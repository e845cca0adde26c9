"""Returns that say nothing about a job, and how every worker learns of them.

The quorum queue counts every return of a delivery (``x-delivery-count``): a worker's crash, but also a
lost connection, a channel the broker closed for its consumer timeout, a stop past its grace time. The
broker cannot tell these apart; a worker that lost a channel and lives on can: it knows exactly which
deliveries it lost, and that none of them crashed it. Once connected again it *announces* them, one
message per loss, on a fanout exchange (``<jobs>.returns``) every worker listens to on a private queue.
Every worker keeps the returns it heard of (the most recent ones, bounded) and suspects a delivery only
when the returns *not* announced reach the suspect threshold: only a job in flight at crashes.

A loss is named by the job's message id, its copy number (``x-inferq-copy``: a job a worker handed back
as a copy is a new message whose count starts over) and the delivery count it had when it was lost; so an
announcement heard twice counts once. NOTE: one loss may raise the count by more than one (seen on
RabbitMQ 3.10: a closed connection sometimes raised a quorum queue's count by two), so a loss explains
the returns from its count up to the next loss's count, or the present one, up to ``RETURNS_PER_LOSS``.
A worker that starts listening (after starting, or reconnecting)
says so on the same exchange, and every worker repeats the announcements it made in the last
``RECENT_S``: workers that reconnect together after a broker restart hear each other's whatever their
order.

NOTE: a worker that joins later than that never hears of those returns; a job lost that way and then
once more is suspected like a job of two crashes: it runs alone, from the retry queue, and is
dead-lettered only at the delivery limit. An announcement is a per-loss cost; a delivery's own path pays
a dictionary lookup only when its count already reached the threshold.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from inferq.shared.config.logging import get_logger

log = get_logger(__name__)

MAX_MESSAGES = 100_000
"""Jobs whose announced returns a worker remembers (least recently announced forgotten first): tens of
losses of a full prefetch, fleet-wide, a few megabytes."""
MAX_COUNT = 1024
"""Highest delivery count kept (above any delivery limit the queues accept)."""
RETURNS_PER_LOSS = 2
"""Most returns one announced loss explains (a crash right after a loss may go unsuspected once)."""
RECENT_S = 120.0
"""How long a worker repeats its announcements to workers that start listening."""
REPEAT_AFTER_S = 0.2
"""Workers that start listening within this long of each other are answered with one repeat."""

Return = tuple[str, int, int]
"""A delivery lost through no fault of its own: its message id, copy number and delivery count then."""
Send = Callable[[bytes, Callable[[bool], None]], None]
Later = Callable[[float, Callable[[], None]], object]


class ReturnsAnnounced(BaseModel):
    """Deliveries a worker lost, and so returned to their queue through no fault of theirs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    worker: str
    cause: Literal["connection lost", "stop", "listening"]
    """Why they returned; ``listening``: none did, the worker started listening and asks for recent ones."""
    returns: list[Return]


@dataclass(slots=True, eq=False)
class _Announcement:
    body: bytes
    sending: bool = False
    sent_at: float | None = None


class Absolutions:
    """Announced returns (I/O thread only): the ones this worker lost, sent to every worker, and the ones
    heard from every worker (its own included)."""

    def __init__(
        self,
        send: Send,
        later: Later,
        worker: str,
        *,
        max_messages: int = MAX_MESSAGES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._send_body = send
        self._later = later
        self._worker = worker
        self._max_messages = max_messages
        self._clock = clock
        self._absolved: OrderedDict[str, int] = OrderedDict()  # "<copy>:<id>" -> bit n set: lost at count n
        self._unsent: list[_Announcement] = []
        self._sent: list[_Announcement] = []  # confirmed, repeated to workers that start listening
        self._repeat_timer: object | None = None

    def __len__(self) -> int:
        """Jobs with announced returns remembered now."""
        return len(self._absolved)

    def explained(self, message_id: str | None, copy: int, count: int) -> int:
        """How many of a delivery's ``count`` returns so far announced losses explain."""
        if message_id is None:
            return 0
        mask = self._absolved.get(f"{copy}:{message_id}")
        if not mask:
            return 0
        lost_at = [n for n in range(min(count, MAX_COUNT + 1)) if mask >> n & 1]
        following = [*lost_at[1:], count]
        return sum(min(RETURNS_PER_LOSS, after - before) for before, after in zip(lost_at, following, strict=True))

    def lost(self, returns: list[Return], cause: Literal["connection lost", "stop"]) -> None:
        """This worker lost these deliveries: remember them, and announce them once connected."""
        if not returns:
            return
        self._remember(returns)
        self._unsent.append(_Announcement(self._encode(cause, returns)))

    def heard(self, body: bytes) -> None:
        """An announcement arrived (from any worker, this one included)."""
        try:
            announced = ReturnsAnnounced.model_validate_json(body)
        except ValidationError:
            log.warning("returns_announcement_unreadable", bytes=len(body))
            return
        if announced.cause == "listening":
            if announced.worker != self._worker and self._repeat_timer is None:
                self._repeat_timer = self._later(REPEAT_AFTER_S, self._repeat)
            return
        self._remember(announced.returns)

    def listening(self) -> None:
        """A new session listens: send what is not sent yet, and ask the others for their recent ones."""
        self.send_unsent()
        self._send_body(self._encode("listening", []), _ignored)

    def send_unsent(self) -> None:
        """Send every announcement not confirmed yet (again, if a session was lost meanwhile)."""
        for announcement in list(self._unsent):
            if not announcement.sending:
                self._send(announcement)

    def _encode(self, cause: Literal["connection lost", "stop", "listening"], returns: list[Return]) -> bytes:
        return ReturnsAnnounced(worker=self._worker, cause=cause, returns=returns).model_dump_json().encode()

    def _send(self, announcement: _Announcement) -> None:
        announcement.sending = True
        self._send_body(announcement.body, partial(self._confirmed, announcement))

    def _confirmed(self, announcement: _Announcement, ok: bool) -> None:
        announcement.sending = False
        if not ok:
            return  # sent again by the next session
        self._unsent = [a for a in self._unsent if a is not announcement]
        announcement.sent_at = self._clock()
        self._forget_old_sent()
        self._sent.append(announcement)

    def _repeat(self) -> None:
        """Another worker started listening: repeat the recent announcements (it may have missed them)."""
        self._repeat_timer = None
        self._forget_old_sent()
        for announcement in self._sent:
            self._send_body(announcement.body, _ignored)

    def _forget_old_sent(self) -> None:
        since = self._clock() - RECENT_S
        self._sent = [a for a in self._sent if a.sent_at is not None and a.sent_at >= since]

    def _remember(self, returns: Iterable[Return]) -> None:
        absolved = self._absolved
        for message_id, copy, count in returns:
            if not 0 <= count <= MAX_COUNT:
                continue
            key = f"{copy}:{message_id}"
            absolved[key] = absolved.pop(key, 0) | (1 << count)  # (re)inserted last: the most recent
        while len(absolved) > self._max_messages:
            absolved.popitem(last=False)


def _ignored(_ok: bool) -> None:
    """A repeat, or a request for repeats: a lost one changes nothing the next session will not redo."""

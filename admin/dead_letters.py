"""The dead-letter queue, for operators: look at what is there and why, and replay it.

Listing takes messages with ``basic.get`` *without* acking them and hands every one back at the end,
so a look changes nothing but the DLQ's delivery counts. Replaying republishes a message to the jobs
queue with publisher confirms and acks (removes) the dead letter only once the broker confirmed the
new copy: a crash between the two leaves a duplicate job, never a lost one, and the worker's result
store turns the duplicate into a republish of the stored result.

:class:`DeadLetterWatch` is for a client waiting on jobs of its own (``backfill --out``): it listens on
the dead-letters exchange, looks at what the DLQ already holds, and tells when no job can still be
queued or in flight (:class:`QueueLook`), so that the wait ends.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, KeysView
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import orjson
import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import BasicProperties

from inferq.admin.status import QueueStatus, management_queues
from inferq.shared.broker.amqp import PUBLISHED_MS_HEADER, forwarded_properties
from inferq.shared.broker.connection import open_blocking
from inferq.shared.broker.topology import ALL_RESULTS, REASON_HEADER, dead_letters_exchange, death_of, retry_queue
from inferq.shared.config.logging import get_logger
from inferq.shared.config.settings import OperatorSettings
from inferq.shared.errors import (
    BrokerRefused,
    BrokerUnavailable,
    DeadLetterNotFound,
    ManagementUnavailable,
    PublishError,
)

log = get_logger(__name__)

REPLAYED_HEADER = "x-inferq-replayed"
"""How many times an operator replayed this job from the dead-letter queue."""

# Headers that describe the *previous* life of a message; a replayed job starts a fresh one.
_DEATH_HEADERS = frozenset(
    {
        REASON_HEADER,
        "x-death",
        "x-delivery-count",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
    }
)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One message in the dead-letter queue and why it is there."""

    message_id: str | None
    reason: str
    source_queue: str | None
    size_bytes: int
    model: str | None


def _body_field(body: bytes, name: str) -> str | None:
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    field = value.get(name) if isinstance(value, dict) else None
    return field if isinstance(field, str) and field else None


def describe(properties: BasicProperties, body: bytes) -> DeadLetter:
    """What an operator needs to know about one dead letter; its id from the AMQP message id or, failing
    that, from the body."""
    reason, source = death_of(dict(properties.headers or {}))
    message_id = properties.message_id or _body_field(body, "id")
    return DeadLetter(message_id, reason, source, len(body), _body_field(body, "model"))


@contextmanager
def _dlq_channel(settings: OperatorSettings, name: str) -> Iterator[tuple[BlockingChannel, int]]:
    """A channel on which every message taken and not acked goes back to the DLQ at exit, and the
    number of messages the DLQ held at the start (a bound, so replays dead-lettered again meanwhile
    are never taken twice in one run)."""
    connection = open_blocking(settings, name)
    try:
        channel = connection.channel()
        try:
            frame = channel.queue_declare(settings.dlq_queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                raise DeadLetterNotFound(f"there is no dead-letter queue {settings.dlq_queue!r}") from None
            raise
        yield channel, int(frame.method.message_count)
        if channel.is_open:
            channel.basic_nack(0, multiple=True, requeue=True)  # everything not replayed goes back
    except pika.exceptions.AMQPConnectionError as exc:
        raise BrokerUnavailable(f"lost the broker: {type(exc).__name__}: {exc}") from None
    finally:
        if connection.is_open:
            connection.close()  # unacked messages return to the queue in any case


def _taken(channel: BlockingChannel, queue: str, bound: int) -> Iterator[tuple[int, BasicProperties, bytes]]:
    for _ in range(bound):
        method, properties, body = channel.basic_get(queue, auto_ack=False)
        if method is None:
            return
        yield method.delivery_tag, properties, body


def list_dead_letters(settings: OperatorSettings, limit: int) -> tuple[list[DeadLetter], int]:
    """Up to ``limit`` dead letters, oldest first, and how many the DLQ holds in all. Nothing is removed."""
    with _dlq_channel(settings, "inferq-dlq-list") as (channel, total):
        letters = [describe(p, b) for _tag, p, b in _taken(channel, settings.dlq_queue, min(limit, total))]
    return letters, total


def replay(
    settings: OperatorSettings,
    *,
    job_id: str | None = None,
    on_replayed: Callable[[DeadLetter], None] = lambda _letter: None,
) -> list[DeadLetter]:
    """Republish dead letters to the jobs queue, each removed from the DLQ only once its copy is
    confirmed: the one with ``job_id``, or all of them when it is ``None``."""
    replayed: list[DeadLetter] = []
    with _dlq_channel(settings, "inferq-dlq-replay") as (channel, total):
        channel.confirm_delivery()
        for tag, properties, body in _taken(channel, settings.dlq_queue, total):
            letter = describe(properties, body)
            if job_id is not None and letter.message_id != job_id:
                continue  # held unacked until the end, then handed back
            _republish(channel, settings.jobs_queue, properties, body)
            channel.basic_ack(tag)
            replayed.append(letter)
            on_replayed(letter)
            if job_id is not None:
                break
    if job_id is not None and not replayed:
        raise DeadLetterNotFound(f"no dead-lettered job with id {job_id!r} in {settings.dlq_queue!r}")
    return replayed


def _republish(channel: BlockingChannel, jobs_queue: str, original: BasicProperties, body: bytes) -> None:
    headers = {k: v for k, v in (original.headers or {}).items() if k not in _DEATH_HEADERS}
    headers[REPLAYED_HEADER] = int(headers.get(REPLAYED_HEADER, 0)) + 1
    headers[PUBLISHED_MS_HEADER] = int(time.time() * 1000)  # its latency starts again now
    properties = forwarded_properties(original, headers)
    try:
        channel.basic_publish("", jobs_queue, body, properties, mandatory=True)
    except pika.exceptions.UnroutableError:
        raise PublishError(f"job {original.message_id!r} not replayed: no queue {jobs_queue!r}") from None
    except pika.exceptions.NackError:
        raise PublishError(
            f"job {original.message_id!r} not replayed: {jobs_queue!r} refused it (full?); it stays in the DLQ"
        ) from None


# -- waiting on jobs of one's own -----------------------------------------------------------------

MANAGEMENT_QUIET_S = 12.0
"""How long the management API must show the jobs and retry queues empty, nothing ready and nothing
unacked, before no job can be in flight: its numbers are samples (every 5 s by default), so two of them."""
AMQP_QUIET_MARGIN_S = 5.0
"""Without the management API, where a passive declare tells only ready messages and consumers, the queues
must show nothing ready and no consumer for the workers' shutdown grace (``INFERQ_SHUTDOWN_GRACE_S``,
25 s by default) and this much more: a consumer holds every unacked delivery, except a stopping worker's,
which cancels first and then finishes its in-flight batch within its grace, storing each result before
its ack."""
LOOK_EVERY_S = 1.0
"""How often the queues are looked at while a job is missing."""
LOOK_IDLE_S = 2.0
"""A look at the DLQ ends when no message came for this long (fewer than counted: another reader holds some)."""


@dataclass(slots=True)
class QueueLook:
    """Whether jobs can still be queued or in flight: true once every look for ``quiet_s`` saw the jobs
    and retry queues empty (pure logic, with the time given)."""

    quiet_s: float
    _empty_since: float | None = None

    def saw(self, empty: bool, now: float) -> bool:
        """Take one look (``empty``: nothing ready or held); true when nothing can be in flight."""
        if not empty:
            self._empty_since = None
            return False
        if self._empty_since is None:
            self._empty_since = now
        return now - self._empty_since >= self.quiet_s


def _management_empty(queues: list[QueueStatus]) -> bool:
    """Nothing ready and nothing unacked on each queue (a queue that does not exist holds nothing)."""
    return all(not q.exists or (q.ready == 0 and q.unacked == 0) for q in queues)


Source = Literal["management", "amqp"]


class DeadLetterWatch:
    """Which jobs were dead-lettered (by the worker or the broker), and whether any job can still be queued
    or in flight, for a client waiting on results.

    On entry it binds a private queue (exclusive, deleted with the connection) to the dead-letters
    exchange with ``#``, and only then looks at the DLQ: a dead letter is in one or the other, never in
    neither. The connection is opened again the same way if it was lost (a long publish lets heartbeats
    lapse). Blocking, and on one thread."""

    def __init__(self, settings: OperatorSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._reasons: dict[str, str] = {}
        self._connection: pika.BlockingConnection | None = None
        self._source: Source = "management"
        self._look: QueueLook | None = None
        self._last_look = float("-inf")
        self._settled = False

    def __enter__(self) -> DeadLetterWatch:
        self._open()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (its private queue goes with it)."""
        connection, self._connection = self._connection, None
        if connection is not None and connection.is_open:
            # Closing after a lost connection or a Ctrl-C mid-frame: nothing is left to release.
            with contextlib.suppress(pika.exceptions.AMQPError, OSError):
                connection.close()

    @property
    def dead_lettered(self) -> KeysView[str]:
        """The ids of every dead letter seen so far."""
        return self._reasons.keys()

    def reason(self, job_id: str) -> str | None:
        """Why ``job_id`` was dead-lettered, if it was (as far as seen)."""
        return self._reasons.get(job_id)

    def wait(self, timeout_s: float) -> None:
        """Listen for dead letters for up to ``timeout_s``."""
        try:
            if self._connection is None or not self._connection.is_open:
                self._open()
            assert self._connection is not None
            self._connection.process_data_events(time_limit=timeout_s)
        except pika.exceptions.AMQPError as exc:
            log.warning("dead_letter_watch_lost", error=f"{type(exc).__name__}: {exc}")
            self.close()  # opened again on the next wait: bound first, then a new look at the DLQ

    def nothing_in_flight(self) -> bool:
        """True once no job can still be queued or unacked (see :data:`MANAGEMENT_QUIET_S`,
        :data:`AMQP_QUIET_MARGIN_S`); from then on, true. When it turns true, the DLQ is looked at once more."""
        now = self._clock()
        if self._settled or now - self._last_look < LOOK_EVERY_S:
            return self._settled
        self._last_look = now
        try:
            empty = self._queues_empty()
        except pika.exceptions.AMQPError as exc:
            log.warning("dead_letter_watch_lost", error=f"{type(exc).__name__}: {exc}")
            self.close()
            return False
        assert self._look is not None
        if self._look.saw(empty, now):
            self._look_at_dlq()  # one that a reader held during the first look is back now
            self._settled = True
        return self._settled

    # -- the connection, the listener and the look at the DLQ ------------------------------------

    def _open(self) -> None:
        self._connection = open_blocking(self.settings, "inferq-backfill-watch")
        channel = self._connection.channel()
        exchange = dead_letters_exchange(self.settings)
        try:
            channel.exchange_declare(exchange, exchange_type="topic", durable=True)
        except pika.exceptions.ChannelClosedByBroker as exc:  # e.g. an exchange of that name of another type
            refused = f"the broker refused the dead-letters exchange {exchange!r}: {exc.reply_text}"
            raise BrokerRefused(refused) from None
        private = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
        channel.queue_bind(private, exchange, ALL_RESULTS)
        self._look_at_dlq()  # NOTE: after the bind: a dead letter arriving meanwhile is in one of the two
        channel.basic_consume(private, self._on_letter, auto_ack=True)

    def _on_letter(self, _channel: Any, _method: Any, properties: BasicProperties, body: bytes) -> None:
        self._remember(describe(properties, body))

    def _remember(self, letter: DeadLetter) -> None:
        if letter.message_id is not None:
            self._reasons[letter.message_id] = letter.reason

    def _look_at_dlq(self) -> None:
        """Every dead letter the DLQ holds now, taken unacked and handed back (the channel closes)."""
        assert self._connection is not None
        channel = self._connection.channel()
        try:
            total = int(channel.queue_declare(self.settings.dlq_queue, passive=True).method.message_count)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                return  # no DLQ yet: nothing was ever dead-lettered
            raise
        seen = 0
        if total:
            for method, properties, body in channel.consume(self.settings.dlq_queue, inactivity_timeout=LOOK_IDLE_S):
                if method is None:
                    break
                self._remember(describe(properties, body))
                seen += 1
                if seen == total:
                    break
        channel.close()  # every message taken goes back, unchanged
        log.info("dead_letter_queue_read", queue=self.settings.dlq_queue, letters=seen)

    # -- the jobs and retry queues ----------------------------------------------------------------

    def _queues_empty(self) -> bool:
        names = [self.settings.jobs_queue, retry_queue(self.settings).name]
        if self._source == "management":
            try:
                return self._looked(_management_empty(management_queues(self.settings, [(n, n) for n in names])))
            except ManagementUnavailable as exc:
                log.info("management_unavailable", error=str(exc), using="amqp")
                self._source, self._look = "amqp", None
        return self._looked(all(self._amqp_empty(name) for name in names))

    def _looked(self, empty: bool) -> bool:
        if self._look is None:
            amqp_quiet_s = self.settings.shutdown_grace_s + AMQP_QUIET_MARGIN_S
            self._look = QueueLook(MANAGEMENT_QUIET_S if self._source == "management" else amqp_quiet_s)
        return empty

    def _amqp_empty(self, name: str) -> bool:
        """Nothing ready and no consumer (so nothing unacked) on ``name``, or no such queue."""
        if self._connection is None or not self._connection.is_open:
            self._open()
        assert self._connection is not None
        channel = self._connection.channel()  # a passive declare of a missing queue closes its channel
        try:
            frame = channel.queue_declare(name, passive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                return True
            raise
        channel.close()
        return int(frame.method.message_count) == 0 and int(frame.method.consumer_count) == 0

"""One way to reach the broker, for every process: connect, retry, reconnect, declare the topology.

The policy, the same for the producer, the worker and the operator commands:

- Reaching the broker is retried with capped exponential backoff (:class:`inferq.shared.broker.amqp.Backoff`) for up
  to ``connect_timeout_s``, then fails with :class:`BrokerUnavailable` naming the URL (password masked)
  and the reason (``connection refused (host:port)``, ``unknown host``, ``timed out``).
- A refusal no retry can fix fails at once with :class:`BrokerRefused` (a configuration error, exit 2):
  wrong credentials, an unknown or forbidden virtual host, a queue that exists with other arguments.
- After a loss, the owner decides whether to reconnect (:meth:`LinkHandler.on_lost`). A command gets
  ``connect_timeout_s`` again; a service (``reconnect_forever``, the worker) keeps trying until stopped.
- Each connection gets one channel, with publisher confirms, and the queues it needs declared before
  the owner sees it (:class:`Session`). Sessions are numbered (``epoch``): a delivery tag, a confirm or
  a reply queue belongs to one session only.

The broker's address is a list of URLs (:func:`broker_urls`): ``INFERQ_AMQP_URL`` names one node or a
cluster's nodes separated by commas. Each client tries them in its own shuffled order (a fleet spreads
over the nodes) and moves to the next one after a failed attempt or a lost connection.

A session whose publishes the broker keeps refusing (a long run of nacks and no ack) is dropped and a
new one opened, on the next node: a RabbitMQ channel that published to a quorum queue whose leader was
lost can go on nacking nearly everything until it is replaced. Owners see this as a lost session, so
every guarantee of a reconnect holds (unconfirmed publishes are reported refused; tags die).

:class:`Link` is for pika ``SelectConnection`` clients that own an I/O loop (the worker runs it on one
I/O thread; the producer drives it in its caller's thread). :func:`open_blocking` is for the operator
commands: it blocks, so it must never be called on an I/O loop's thread.
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import pika
import pika.exceptions
import pika.frame
from pika.adapters.select_connection import IOLoop
from pika.channel import Channel

from inferq.shared.broker.amqp import Backoff, ConfirmTracker, declare_queues, redacted_url, topology_error
from inferq.shared.broker.frames import Delivered, Unread, read_delivery
from inferq.shared.broker.topology import QueueSpec
from inferq.shared.config.logging import get_logger
from inferq.shared.config.settings import InferqSettings
from inferq.shared.errors import BrokerRefused, BrokerUnavailable, ConfigError, InferqError

log = get_logger(__name__)

ACCESS_REFUSED = 403
NOT_ALLOWED = 530

CONNECT_BACKOFF_BASE_S = 0.2
CONNECT_BACKOFF_CAP_S = 10.0

SILENCE_HEARTBEATS = 1.5
"""A connection on which nothing arrived for this many heartbeat intervals is dead. The broker sends a
heartbeat every half interval, so that is three missed in a row. pika's own check waits up to
``2 * (heartbeat + 5)`` s, too long for a node that vanished without a reset (its traffic dropped)."""

WATCH_EVERY_HEARTBEATS = 0.25
"""How often (in heartbeat intervals) the link looks at its connection; a check is also timed for the
moment the silence would reach its limit, so a dead link is noticed on time, not up to a period late."""

UNANSWERED_HEARTBEATS = 2.0
"""A session with a publish neither confirmed nor refused for this many heartbeat intervals is replaced:
a node cut off from its cluster (pausing, or not yet) can keep the connection alive with heartbeats
while the queues behind it never answer."""

NACK_STREAK_LIMIT = 64
"""Nacks in a row, without an ack, after which a session is replaced (doubled after each replacement
that brings no ack, so a full queue refusing publishes costs few reconnects)."""
NACK_STREAK_LIMIT_CAP = 8192
NACK_STREAK_S = 10.0
"""Seconds of refusals in a row, without an ack, after which a session is replaced too (doubled with the
count). A publisher that sends little, one job retried with backoff, never reaches the count; and a channel
can go on refusing publishes to a quorum queue whose leader moved while a new channel is served at once
(seen on RabbitMQ 3.10 just after a node was cut off from its cluster)."""
NACK_STREAK_CAP_S = 600.0


def connect_backoff() -> Backoff:
    """The backoff between connection attempts, the same for every process."""
    return Backoff(base_s=CONNECT_BACKOFF_BASE_S, cap_s=CONNECT_BACKOFF_CAP_S)


# -- where the broker is ---------------------------------------------------------------------------


def broker_urls(settings: InferqSettings, rng: random.Random | None = None) -> list[str]:
    """The broker's URLs in the order this client tries them: shuffled, so that a fleet of clients
    given the same list spreads over a cluster's nodes instead of all starting on the first."""
    urls = list(settings.amqp_urls)
    if settings.amqp_shuffle:
        (rng or random.Random()).shuffle(urls)
    return urls


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One broker URL: the parameters pika needs and the same URL with its password masked."""

    parameters: pika.URLParameters
    shown: str

    @property
    def address(self) -> str:
        """``host:port``."""
        return f"{self.parameters.host}:{self.parameters.port}"


class Endpoints:
    """The broker URLs of a client, handed out in turn (round robin), one per connection attempt."""

    def __init__(self, settings: InferqSettings, name: str) -> None:
        self._all = [Endpoint(_parameters(settings, url, name), redacted_url(url)) for url in broker_urls(settings)]
        self._next = 0

    @property
    def upcoming(self) -> Endpoint:
        """The endpoint :meth:`next` hands out next, without moving on."""
        return self._all[self._next % len(self._all)]

    def next(self) -> Endpoint:
        """The endpoint for the next attempt."""
        endpoint = self._all[self._next % len(self._all)]
        self._next += 1
        return endpoint

    def __len__(self) -> int:
        return len(self._all)

    @property
    def shown(self) -> str:
        """Every URL, passwords masked, for messages."""
        return ", ".join(e.shown for e in self._all)


def _parameters(settings: InferqSettings, url: str, name: str) -> pika.URLParameters:
    params = pika.URLParameters(url)
    params.heartbeat = settings.heartbeat_s
    params.blocked_connection_timeout = 300
    params.connection_attempts = 1  # retries are ours, with our backoff and deadline
    params.socket_timeout = 10
    params.client_properties = {"connection_name": name}
    return params


# -- why a connection failed -----------------------------------------------------------------------


def _root_cause(error: BaseException) -> BaseException:
    """The innermost exception pika wrapped (it nests workflow, connector and socket errors)."""
    seen = 0
    while seen < 10:
        seen += 1
        inner: Any = None
        if getattr(error, "exceptions", None):
            inner = error.exceptions[-1]  # type: ignore[attr-defined]
        elif isinstance(getattr(error, "exception", None), BaseException):
            inner = error.exception  # type: ignore[attr-defined]
        elif error.args and isinstance(error.args[0], BaseException):
            inner = error.args[0]
        if inner is None:
            return error
        error = inner
    return error


def describe_failure(error: BaseException, endpoint: Endpoint) -> str:
    """A short human reason for a failed connection, with the address it concerns; never the password."""
    cause = _root_cause(error)
    if isinstance(cause, ConnectionRefusedError):
        return f"connection refused ({endpoint.address})"
    if isinstance(cause, socket.gaierror):
        return f"unknown host ({endpoint.address})"
    if isinstance(cause, TimeoutError | socket.timeout):
        return f"timed out ({endpoint.address})"
    if isinstance(cause, pika.exceptions.ConnectionClosedByBroker):
        return f"closed by the broker at {endpoint.address}: ({cause.reply_code}) {cause.reply_text}"
    text = str(cause) or type(cause).__name__
    return f"{text} ({endpoint.address})"


def refusal(error: BaseException, endpoint: Endpoint) -> BrokerRefused | None:
    """The broker refused us for a reason no retry will fix (credentials, virtual host), or ``None``."""
    params = endpoint.parameters
    user = getattr(params.credentials, "username", "?")
    cause = _root_cause(error)
    code = cause.reply_code if isinstance(cause, pika.exceptions.ConnectionClosedByBroker) else None
    if isinstance(error, pika.exceptions.ProbableAuthenticationError | pika.exceptions.AuthenticationError) or (
        code == ACCESS_REFUSED
    ):
        return BrokerRefused(
            f"the broker at {endpoint.shown} refused the login of user {user!r} (wrong user or password?)"
        )
    if isinstance(error, pika.exceptions.ProbableAccessDeniedError) or code == NOT_ALLOWED:
        return BrokerRefused(
            f"the broker at {endpoint.shown} refused virtual host {params.virtual_host!r} for user {user!r} "
            "(it does not exist, or the user may not use it)"
        )
    return None


def _channel_refusal(reason: BaseException, declaring: bool) -> ConfigError | None:
    """A channel closed for a reason no reconnect fixes: a queue declared with other arguments, or a
    queue this user may not use."""
    if declaring:
        fatal = topology_error(reason)
        if fatal is not None:
            return fatal
    if isinstance(reason, pika.exceptions.ChannelClosedByBroker) and reason.reply_code == ACCESS_REFUSED:
        return BrokerRefused(f"the broker refused access: {reason.reply_text}")
    return None


# -- blocking, for the operator commands ---------------------------------------------------------


def open_blocking(settings: InferqSettings, name: str) -> pika.BlockingConnection:
    """A blocking connection, with the same retries and errors as every other client.

    NOTE: it blocks for up to ``connect_timeout_s``: never call it on an I/O loop's thread."""
    endpoints = Endpoints(settings, name)
    backoff = connect_backoff()
    deadline = time.monotonic() + settings.connect_timeout_s
    while True:
        endpoint = endpoints.next()
        try:
            return pika.BlockingConnection(endpoint.parameters)
        except (pika.exceptions.AMQPError, OSError) as exc:
            refused = refusal(exc, endpoint)
            if refused is not None:
                raise refused from None
            reason = describe_failure(exc, endpoint)
        delay = backoff.next_delay()
        if time.monotonic() + delay >= deadline:
            raise BrokerUnavailable(_unreachable(endpoints, settings, reason)) from None
        log.warning("broker_unavailable", reason=reason, retry_in_s=round(delay, 2))
        time.sleep(delay)


def _unreachable(endpoints: Endpoints, settings: InferqSettings, reason: str) -> str:
    return f"cannot reach the broker at {endpoints.shown} within {settings.connect_timeout_s:g}s: {reason}"


# -- asynchronous, for clients that own an I/O loop ----------------------------------------------


class _HearingConnection(pika.SelectConnection):  # type: ignore[misc]
    """A ``SelectConnection`` that notes when the broker last sent anything (``heard_at``, monotonic).

    pika counts the bytes it received but not when: a watchdog comparing counts on a timer knows the
    time of the last byte only to within its period, and later still when the I/O loop is busy."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.heard_at = time.monotonic()
        self.whole_deliveries = 0
        """Messages read in one go by :meth:`_read_frame` (the others went through pika frame by frame)."""
        super().__init__(*args, **kwargs)

    @property
    def silent_s(self) -> float:
        """Seconds since the broker last sent anything."""
        return time.monotonic() - self.heard_at

    def _proto_data_received(self, data: bytes) -> None:
        # NOTE: pika's hook for every chunk read from the socket (BaseConnection); the time is taken
        # before the chunk's frames are dispatched, which may take long.
        self.heard_at = time.monotonic()
        super()._proto_data_received(data)

    def _read_frame(self) -> tuple[int, Any]:
        # NOTE: pika's loop reads one frame at a time from its buffer and hands each to _process_frame.
        # A job message is three frames, each decoded through generic code and routed through pika's
        # callback registry and content assembler: most of what a delivery costs the worker. A whole
        # message at the head of the buffer is read here in one go instead (shared/broker/frames.py), and
        # anything else is left to pika.
        delivered = read_delivery(self._frame_buffer)
        if delivered is Unread.PARTIAL:
            return 0, None  # as pika does with a frame not wholly read: the loop waits for more bytes
        if delivered is not Unread.OTHER and delivered.channel_number in self._channels:
            return delivered.size, delivered
        return super()._read_frame()  # type: ignore[no-any-return]

    def _process_frame(self, frame_value: Any) -> None:
        if type(frame_value) is not Delivered:
            super()._process_frame(frame_value)
            return
        self.frames_received += frame_value.frames
        self.whole_deliveries += 1
        number = frame_value.channel_number
        # What pika's content assembler hands its channel once a message's last frame arrived: the
        # channel then finds the consumer (or returns a delivery for a cancelled one).
        self._channels[number]._on_deliver(
            pika.frame.Method(number, frame_value.method),
            pika.frame.Header(number, len(frame_value.body), frame_value.properties),
            frame_value.body,
        )


@dataclass(frozen=True, slots=True)
class Session:
    """An open connection with one channel, publisher confirms on, and the queues declared.

    Valid until the link reports it lost; ``epoch`` tells it from the sessions before and after."""

    connection: pika.SelectConnection
    channel: Channel
    confirms: ConfirmTracker
    epoch: int

    @property
    def is_open(self) -> bool:
        """True while the channel may be used."""
        return bool(self.channel.is_open)


class LinkHandler(Protocol):
    """What the owner of a :class:`Link` is told. Every call comes on the I/O loop's thread."""

    def on_ready(self, session: Session) -> None:
        """A session is open and its queues are declared (after each (re)connect)."""

    def on_lost(self, reason: str) -> bool:
        """The session was lost (unconfirmed publishes were reported refused first). Return ``True`` to
        reconnect now, ``False`` to stay disconnected until :meth:`Link.open`."""

    def on_failed(self, error: InferqError) -> None:
        """The link gave up: a permanent refusal, or no broker within the connect timeout."""

    def on_closed(self) -> None:
        """:meth:`Link.close` finished."""


class Link:
    """A pika ``SelectConnection`` on the owner's I/O loop that connects with the common retry policy,
    opens one confirmed channel, declares ``queues``, and reconnects after a loss."""

    def __init__(
        self,
        settings: InferqSettings,
        name: str,
        ioloop: IOLoop,
        handler: LinkHandler,
        *,
        queues: Sequence[QueueSpec] = (),
        reconnect_forever: bool = False,
    ) -> None:
        self.settings = settings
        self._ioloop = ioloop
        self._handler = handler
        self._queues = list(queues)
        self._reconnect_forever = reconnect_forever
        self._endpoints = Endpoints(settings, name)
        # NOTE: not next(): the first attempt goes to the first URL (an unshuffled list names the
        # preferred node first).
        self._endpoint = self._endpoints.upcoming
        self._backoff = connect_backoff()
        self._connection: _HearingConnection | None = None
        self._session: Session | None = None
        self._confirms: ConfirmTracker | None = None
        self._timer: object | None = None
        self._deadline = 0.0
        self._epoch = 0
        self._connected_once = False
        self._declaring = False
        self._closing = False
        self._failed = False
        self._reopen = False
        self._recycling = False
        self._nack_limit = NACK_STREAK_LIMIT
        self._nack_limit_s = NACK_STREAK_S
        self._watchdog: object | None = None

    @property
    def session(self) -> Session | None:
        """The open session, or ``None`` while (re)connecting or closed."""
        session = self._session
        return session if session is not None and session.is_open else None

    @property
    def epoch(self) -> int:
        """Generation of the current session (counts every connection opened)."""
        return self._epoch

    @property
    def connecting(self) -> bool:
        """Connected, or an attempt is under way or scheduled."""
        return self._timer is not None or (self._connection is not None and not self._connection.is_closed)

    def open(self) -> None:
        """Start connecting, with a fresh deadline, unless connected or already connecting."""
        if self._closing:
            return
        if self._connection is not None and self._connection.is_closing:
            self._reopen = True  # once this connection has finished closing
            return
        if self.connecting:
            return
        self._failed = False
        self._deadline = time.monotonic() + self.settings.connect_timeout_s
        self._attempt()

    def close(self) -> None:
        """Close the connection; :meth:`LinkHandler.on_closed` runs once it is closed (at once if it is)."""
        self._closing = True
        self._cancel_timer()
        connection = self._connection
        if connection is None or connection.is_closed:
            self._closing = False
            self._handler.on_closed()
        elif connection.is_open:
            connection.close()
        # NOTE: a connection still opening is closed once it opens (_on_open), or ends when its opening
        # fails (_retry): pika cannot close one mid-handshake (its connection workflow then fails an
        # assertion instead of reporting the close).

    def redeclare(self, on_done: Callable[[], None]) -> None:
        """Declare the queues again on the open session (the broker cancelled a consumer: its queue was
        deleted, or lost), then call ``on_done``. A refusal fails the link as it would at connect
        (:meth:`LinkHandler.on_failed`); without an open session, nothing: the next one declares them."""
        session = self.session
        if session is None:
            return
        self._declaring = True

        def declared() -> None:
            if self._session is session:
                self._declaring = False
                on_done()

        declare_queues(session.channel, self._queues, declared)

    # -- connecting -------------------------------------------------------------------------------

    def _attempt(self) -> None:
        self._timer = None
        self._endpoint = self._endpoints.next()
        log.debug("broker_connecting", url=self._endpoint.shown, attempt=self._backoff.attempt + 1)
        self._connection = _HearingConnection(
            self._endpoint.parameters,
            on_open_callback=self._on_open,
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_close,
            custom_ioloop=self._ioloop,
        )

    def _on_open_error(self, _connection: Any, error: BaseException) -> None:
        self._connection = None
        refused = refusal(error, self._endpoint)
        if refused is not None:
            self._fail(refused)
        else:
            self._retry(describe_failure(error, self._endpoint))

    def _retry(self, reason: str) -> None:
        if self._closing:
            self._closing = False
            self._handler.on_closed()
            return
        # A service that was connected before keeps trying; anything else has connect_timeout_s.
        patient = self._reconnect_forever and self._connected_once
        delay = self._backoff.next_delay()
        if not patient and time.monotonic() + delay >= self._deadline:
            self._fail(BrokerUnavailable(_unreachable(self._endpoints, self.settings, reason)))
            return
        log.warning("broker_unavailable", reason=reason, retry_in_s=round(delay, 2))
        self._timer = self._ioloop.call_later(delay, self._attempt)

    def _on_open(self, connection: pika.SelectConnection) -> None:
        if self._closing:  # closed while it was opening
            connection.close()
            return
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_channel_open(self, channel: Channel) -> None:
        channel.add_on_close_callback(self._on_channel_closed)
        self._confirms = ConfirmTracker(channel, on_streak=self._on_nack_streak)
        self._declaring = True
        declare_queues(channel, self._queues, lambda: self._on_declared(channel))

    def _on_declared(self, channel: Channel) -> None:
        assert self._connection is not None and self._confirms is not None
        self._declaring = False
        self._connected_once = True
        self._backoff.reset()
        self._epoch += 1
        self._session = Session(self._connection, channel, self._confirms, self._epoch)
        self._watch(self._connection)
        if self._epoch > 1:  # the first connection is the expected case; a failover is worth a line
            log.info("broker_reconnected", url=self._endpoint.shown, epoch=self._epoch)
        self._handler.on_ready(self._session)

    # -- a node that went silent ------------------------------------------------------------------

    def _watch(self, connection: _HearingConnection) -> None:
        if self.settings.heartbeat_s <= 0:
            return
        self._watchdog = self._ioloop.call_later(self._until_next_check(connection), lambda: self._check(connection))

    def _until_next_check(self, connection: _HearingConnection) -> float:
        heartbeat_s = self.settings.heartbeat_s
        limit_s = SILENCE_HEARTBEATS * heartbeat_s - connection.silent_s
        return max(0.01, min(WATCH_EVERY_HEARTBEATS * heartbeat_s, limit_s + 0.01))

    def _check(self, connection: _HearingConnection) -> None:
        """Runs on the I/O loop's thread, on a timer: a silent connection is ended at once (the next
        node is tried); a session whose publishes go unanswered is replaced."""
        self._watchdog = None
        if id(connection) != id(self._connection) or not connection.is_open:
            return  # (ids: an `is not` against the Optional attribute would widen `connection` for mypy)
        heartbeat_s = self.settings.heartbeat_s
        silent_s = connection.silent_s
        unanswered_s = self._confirms.oldest_wait_s() if self._confirms is not None else 0.0
        unanswered = unanswered_s > UNANSWERED_HEARTBEATS * heartbeat_s
        # Unanswered publishes on a link that also missed two heartbeats: the node is gone, not just
        # not serving; a polite close would only wait for an answer that never comes.
        if silent_s > SILENCE_HEARTBEATS * heartbeat_s or (unanswered and silent_s > heartbeat_s):
            self._end_silent(connection, silent_s)
        elif unanswered:
            self._replace(connection, "broker_not_answering", waited_s=round(unanswered_s, 1))
        else:
            self._watch(connection)

    def _end_silent(self, connection: _HearingConnection, silent_s: float) -> None:
        log.warning("broker_silent", url=self._endpoint.shown, silent_s=round(silent_s, 1))
        # NOTE: a close handshake would wait for an answer that never comes; end the stream as
        # pika's own heartbeat check does.
        connection._terminate_stream(
            pika.exceptions.AMQPHeartbeatTimeout(f"nothing heard from the broker for {silent_s:.1f}s")
        )

    # -- a session the broker keeps refusing --------------------------------------------------------

    def _on_nack_streak(self, nacks: int, for_s: float) -> None:
        if nacks == 0:
            self._nack_limit, self._nack_limit_s = NACK_STREAK_LIMIT, NACK_STREAK_S  # an ack: the session works
            return
        connection = self._connection
        if nacks < self._nack_limit and for_s < self._nack_limit_s:
            return
        if self._recycling or connection is None or not connection.is_open:
            return
        self._nack_limit = min(self._nack_limit * 2, NACK_STREAK_LIMIT_CAP)
        self._nack_limit_s = min(self._nack_limit_s * 2, NACK_STREAK_CAP_S)
        self._replace(connection, "broker_refusing_publishes", nacks=nacks, refused_for_s=round(for_s, 1))

    def _replace(self, connection: pika.SelectConnection, event: str, **fields: object) -> None:
        log.warning(event, url=self._endpoint.shown, action="new session", **fields)
        self._recycling = True
        # Closing the connection (not just the channel) also moves the client to the next node.
        connection.close(reply_text="replacing a session the broker does not serve")
        # NOTE: a node that does not answer may not answer the close either: give it one heartbeat.
        self._ioloop.call_later(max(self.settings.heartbeat_s, 1), lambda: self._abandon(connection))

    def _abandon(self, connection: pika.SelectConnection) -> None:
        if id(connection) == id(self._connection) and not connection.is_closed:
            connection._terminate_stream(pika.exceptions.AMQPConnectionError("the broker did not answer the close"))

    # -- losing it ----------------------------------------------------------------------------------

    def _drop_session(self) -> None:
        # The session is gone before anyone hears of its unconfirmed publishes, so that nothing is
        # published again on the dead channel from inside those callbacks.
        self._session = None
        confirms, self._confirms = self._confirms, None
        if confirms is not None:
            confirms.fail_all()

    def _on_channel_closed(self, _channel: Channel, reason: BaseException) -> None:
        declaring, self._declaring = self._declaring, False
        self._drop_session()
        connection = self._connection
        if self._closing or self._failed or connection is None or not connection.is_open:
            return  # the connection's close handler takes it from here
        fatal = _channel_refusal(reason, declaring)
        if fatal is not None:
            self._fail(fatal)
            return
        # Any other channel error (e.g. an ack of an unknown tag) costs this connection, not the process.
        log.error("broker_channel_closed", reason=str(reason))
        connection.close()

    def _on_close(self, _connection: Any, reason: BaseException) -> None:
        self._connection = None
        if self._watchdog is not None:
            self._ioloop.remove_timeout(self._watchdog)
            self._watchdog = None
        self._drop_session()
        recycled, self._recycling = self._recycling, False
        if self._closing:
            self._closing = False
            self._handler.on_closed()
            return
        if self._reopen:
            self._reopen = False
            self.open()
            return
        if self._failed:
            return
        refused = None if recycled else refusal(reason, self._endpoint)
        if refused is not None:
            self._fail(refused)
            return
        text = "replaced: the broker did not serve it" if recycled else describe_failure(reason, self._endpoint)
        log.warning("broker_connection_lost", reason=text)
        if self._handler.on_lost(text) and not self._closing and not self.connecting:
            self._deadline = time.monotonic() + self.settings.connect_timeout_s
            delay = self._backoff.next_delay()
            self._timer = self._ioloop.call_later(delay, self._attempt)

    def _fail(self, error: InferqError) -> None:
        self._failed = True
        self._cancel_timer()
        connection = self._connection
        if connection is not None and connection.is_open:
            connection.close()
        self._handler.on_failed(error)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._ioloop.remove_timeout(self._timer)
            self._timer = None

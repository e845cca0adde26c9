"""The asynchronous side of the connection layer on the real broker: a session with its queues declared,
publisher confirms that answer every publish even when one callback raises, reconnects with a new
epoch, and a deadline for a broker that is not there."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable, Iterator

import pika
import pytest
from pika.adapters.select_connection import IOLoop
from private_broker import BlackHole
from support import AMQP_URL

from inferq.shared.broker.connection import Link, Session
from inferq.shared.broker.topology import QueueSpec
from inferq.shared.config.settings import InferqSettings
from inferq.shared.errors import BrokerUnavailable, InferqError

pytestmark = pytest.mark.broker

MESSAGES = 2000


class Recorder:
    """A link handler that records what it is told and runs the test's steps on each new session."""

    def __init__(self, ioloop: IOLoop, on_session: Callable[[Session], None]) -> None:
        self.ioloop = ioloop
        self.on_session = on_session
        self.epochs: list[int] = []
        self.lost: list[str] = []
        self.failed: InferqError | None = None
        self.reconnect = True

    def on_ready(self, session: Session) -> None:
        self.epochs.append(session.epoch)
        self.on_session(session)

    def on_lost(self, reason: str) -> bool:
        self.lost.append(reason)
        return self.reconnect

    def on_failed(self, error: InferqError) -> None:
        self.failed = error
        self.ioloop.stop()

    def on_closed(self) -> None:
        self.ioloop.stop()


@pytest.fixture
def queue() -> Iterator[QueueSpec]:
    spec = QueueSpec(f"test.link.{uuid.uuid4().hex[:12]}", {"x-queue-type": "quorum"})
    yield spec
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    connection.channel().queue_delete(spec.name)
    connection.close()


def run_link(queue: QueueSpec, on_session: Callable[[Recorder, Link, Session], None], **settings: object) -> Recorder:
    ioloop = IOLoop()
    recorder = Recorder(ioloop, lambda session: on_session(recorder, link, session))
    settings = {"amqp_url": AMQP_URL, **settings}
    link = Link(InferqSettings(**settings), "test-link", ioloop, recorder, queues=[queue])
    link.open()
    timeout = ioloop.call_later(60, ioloop.stop)
    ioloop.start()
    ioloop.remove_timeout(timeout)
    ioloop.close()
    return recorder


def publish(session: Session, queue: QueueSpec, count: int, on_confirm: Callable[[int, bool], None]) -> None:
    for i in range(count):
        props = pika.BasicProperties(message_id=str(i), delivery_mode=2)
        session.confirms.publish(queue.name, b"{}", props, lambda ok, i=i: on_confirm(i, ok))


def test_every_publish_is_answered_even_when_one_confirm_callback_raises(queue: QueueSpec) -> None:
    answered: dict[int, bool] = {}

    def steps(recorder: Recorder, link: Link, session: Session) -> None:
        if len(recorder.epochs) > 1:  # the raising callback cost the first connection
            link.close()
            return

        def on_confirm(i: int, ok: bool) -> None:
            answered[i] = ok
            if i == 0:
                raise RuntimeError("a bug in a confirm callback")
            if len(answered) == MESSAGES:
                link.close()

        publish(session, queue, MESSAGES, on_confirm)

    recorder = run_link(queue, steps)
    assert recorder.failed is None
    assert sorted(answered) == list(range(MESSAGES)), "no publish left without an answer"
    assert any(answered.values())


def test_a_lost_connection_is_reopened_with_a_new_epoch_and_the_queues_declared_again(queue: QueueSpec) -> None:
    def steps(recorder: Recorder, link: Link, session: Session) -> None:
        if len(recorder.epochs) == 1:
            session.connection.close()  # not through the link: for the link, a loss
        else:
            link.close()

    recorder = run_link(queue, steps)
    assert recorder.epochs == [1, 2]
    assert len(recorder.lost) == 1
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    assert connection.channel().queue_declare(queue.name, passive=True).method.consumer_count == 0
    connection.close()


def test_no_broker_within_the_connect_timeout_fails_with_the_reason(queue: QueueSpec) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ioloop = IOLoop()
    recorder = Recorder(ioloop, lambda _session: None)
    settings = InferqSettings(amqp_url=f"amqp://guest:guest@127.0.0.1:{port}/%2F", connect_timeout_s=1)
    Link(settings, "test-link", ioloop, recorder, queues=[queue]).open()
    ioloop.start()
    ioloop.close()
    assert isinstance(recorder.failed, BrokerUnavailable)
    assert str(recorder.failed).endswith(f"within 1s: connection refused (127.0.0.1:{port})")
    assert recorder.epochs == []


@pytest.fixture
def hole() -> Iterator[BlackHole]:
    """A proxy in front of the broker that can start dropping every byte both ways."""
    port = pika.URLParameters(AMQP_URL).port
    hole = BlackHole(port)
    yield hole
    hole.close()


def test_an_unshuffled_list_is_tried_from_its_first_url(queue: QueueSpec, hole: BlackHole) -> None:
    ports: list[int] = []

    def steps(_recorder: Recorder, link: Link, session: Session) -> None:
        ports.append(session.connection.params.port)
        link.close()

    recorder = run_link(queue, steps, amqp_url=f"{hole.url},{AMQP_URL}", amqp_shuffle=False)
    assert recorder.failed is None
    assert ports == [hole.port], "the first connection goes to the first URL given"


def test_a_broker_gone_silent_is_left_within_two_heartbeats_for_the_next_url(queue: QueueSpec, hole: BlackHole) -> None:
    heartbeat_s = 2
    dropped_at: list[float] = []
    sessions: list[tuple[int, float]] = []

    def steps(_recorder: Recorder, link: Link, session: Session) -> None:
        sessions.append((session.connection.params.port, time.monotonic()))
        if len(sessions) == 1:
            # When every byte to and from the broker is dropped, with no reset and no FIN
            hole.dropping.set()
            dropped_at.append(time.monotonic())
        else:
            link.close()

    recorder = run_link(queue, steps, amqp_url=f"{hole.url},{AMQP_URL}", amqp_shuffle=False, heartbeat_s=heartbeat_s)
    # Then the link gives up on it within two heartbeat intervals and goes on with the next URL
    assert recorder.failed is None
    assert [port for port, _at in sessions] == [hole.port, pika.URLParameters(AMQP_URL).port]
    assert len(recorder.lost) == 1 and "nothing heard from the broker" in recorder.lost[0]
    detected_s = sessions[1][1] - dropped_at[0]
    assert detected_s <= 2 * heartbeat_s, f"took {detected_s:.1f}s"

"""The hot path's frames (shared/broker/frames.py) are byte for byte what pika writes and reads: publishes
encoded without pika equal pika's own marshalling, and a delivery read in one go equals what pika's
frame-by-frame decoder gives, for any names, properties and body, split into any frame size."""

from __future__ import annotations

import random
import struct
import time
import uuid
from collections.abc import Callable
from functools import partial
from typing import Any

import pika
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pika import frame, spec
from pika.exceptions import ShortStringTooLong
from support import AMQP_URL

from inferq.shared.broker.amqp import ConfirmTracker
from inferq.shared.broker.connection import _HearingConnection
from inferq.shared.broker.frames import WAIT_MAX_BYTES, Delivered, PublishFrames, Unread, read_delivery

CONTENT_TYPE = "application/json"


def short_strings(min_size: int = 0) -> st.SearchStrategy[str]:
    return st.text(min_size=min_size, max_size=80).filter(lambda s: len(s.encode()) <= 255)


def pika_message(channel: int, method: Any, properties: spec.BasicProperties, body: bytes, body_max: int) -> bytes:
    """What pika's Connection._send_message writes for one message (the same chunking)."""
    parts = [frame.Method(channel, method).marshal(), frame.Header(channel, len(body), properties).marshal()]
    parts += [frame.Body(channel, body[i : i + body_max]).marshal() for i in range(0, len(body), body_max)]
    return b"".join(parts)


@settings(max_examples=300, deadline=None)
@given(
    channel=st.integers(1, 65535),
    exchange=short_strings(),
    routing_key=short_strings(),
    message_id=short_strings(min_size=1),
    correlation_id=st.none() | short_strings(),
    body=st.binary(max_size=300),
    body_max=st.integers(1, 128),
)
def test_a_publish_is_what_pika_would_send(
    channel: int,
    exchange: str,
    routing_key: str,
    message_id: str,
    correlation_id: str | None,
    body: bytes,
    body_max: int,
) -> None:
    frames = PublishFrames(channel, CONTENT_TYPE, body_max)
    properties = spec.BasicProperties(
        content_type=CONTENT_TYPE, delivery_mode=2, message_id=message_id, correlation_id=correlation_id
    )
    expected = pika_message(
        channel, spec.Basic.Publish(exchange=exchange, routing_key=routing_key), properties, body, body_max
    )
    assert frames.encode(exchange, routing_key, body, message_id, correlation_id) == expected
    # The method frame is kept per (exchange, routing key): a second message reuses it correctly.
    assert frames.encode(exchange, routing_key, body, message_id, correlation_id) == expected


def test_a_name_longer_than_a_short_string_is_refused_as_pika_refuses_it() -> None:
    frames = PublishFrames(1, CONTENT_TYPE, 1024)
    with pytest.raises(ShortStringTooLong):
        frames.encode("results", "m" * 250 + ".succeeded", b"{}", "job-1", None)
    with pytest.raises(ShortStringTooLong):
        frames.encode("results", "m.succeeded", b"{}", "job-1", "é" * 128)
    with pytest.raises(ValueError, match="positive"):
        PublishFrames(1, CONTENT_TYPE, 0)


header_values = st.one_of(st.integers(-(2**63), 2**63 - 1), st.booleans(), short_strings())  # what pika encodes
deliveries = st.fixed_dictionaries(
    {
        "channel": st.integers(1, 65535),
        "consumer_tag": short_strings(),
        "delivery_tag": st.integers(0, 2**64 - 1),
        "redelivered": st.booleans(),
        "exchange": short_strings(),
        "routing_key": short_strings(),
        "message_id": st.none() | short_strings(),
        "correlation_id": st.none() | short_strings(),
        "reply_to": st.none() | short_strings(),
        "timestamp": st.none() | st.integers(0, 2**63 - 1),
        "headers": st.none() | st.dictionaries(short_strings(min_size=1), header_values, max_size=4),
        "body": st.binary(max_size=600),
        "body_max": st.integers(1, 256),
    }
)


def encoded_delivery(d: dict[str, Any]) -> tuple[bytes, spec.Basic.Deliver, spec.BasicProperties]:
    method = spec.Basic.Deliver(d["consumer_tag"], d["delivery_tag"], d["redelivered"], d["exchange"], d["routing_key"])
    properties = spec.BasicProperties(
        content_type=CONTENT_TYPE,
        message_id=d["message_id"],
        correlation_id=d["correlation_id"],
        reply_to=d["reply_to"],
        timestamp=d["timestamp"],
        headers=d["headers"],
    )
    return pika_message(d["channel"], method, properties, d["body"], d["body_max"]), method, properties


def read_by_pika(data: bytes) -> tuple[spec.Basic.Deliver, spec.BasicProperties, bytes, int]:
    """pika's reading of one message at the start of ``data``: frame by frame."""
    offset, body, frames = 0, b"", []
    while True:
        consumed, value = frame.decode_frame(data[offset:])
        assert value is not None
        frames.append(value)
        offset += consumed
        if isinstance(value, frame.Body):
            body += value.fragment
        header = next((f for f in frames if isinstance(f, frame.Header)), None)
        if header is not None and len(body) == header.body_size:
            return frames[0].method, header.properties, body, offset


@settings(max_examples=300, deadline=None)
@given(d=deliveries, trailing=st.binary(max_size=40))
def test_a_whole_delivery_is_read_as_pika_reads_it(d: dict[str, Any], trailing: bytes) -> None:
    message, _, _ = encoded_delivery(d)
    method, properties, body, size = read_by_pika(message)
    read = read_delivery(message + trailing)
    assert isinstance(read, Delivered)
    assert (read.size, read.channel_number, read.body) == (size, d["channel"], body)
    assert read.frames == 2 + -(-len(body) // d["body_max"])
    assert vars(read.method) == vars(method)
    assert vars(read.properties) == vars(properties)


@settings(max_examples=100, deadline=None)
@given(d=deliveries, cut=st.floats(0, 1, exclude_max=True))
def test_a_delivery_not_wholly_read_waits_once_its_method_frame_is_there(d: dict[str, Any], cut: float) -> None:
    message, method, _ = encoded_delivery(d)
    method_size = len(frame.Method(d["channel"], method).marshal())
    prefix = message[: int(cut * len(message))]
    expected = Unread.PARTIAL if len(prefix) >= method_size else Unread.OTHER
    assert read_delivery(prefix) is expected


def test_a_large_delivery_not_wholly_read_is_left_to_pika() -> None:
    d = {"channel": 1, "consumer_tag": "c", "delivery_tag": 1, "redelivered": False, "exchange": "", "routing_key": "q"}
    d |= {"message_id": None, "correlation_id": None, "reply_to": None, "timestamp": None, "headers": None}
    d |= {"body": b"x" * (WAIT_MAX_BYTES + 1), "body_max": 131064}
    message, _, _ = encoded_delivery(d)
    assert isinstance(read_delivery(message), Delivered)
    assert read_delivery(message[:-1]) is Unread.OTHER
    d["body"] = b"x" * WAIT_MAX_BYTES
    message, _, _ = encoded_delivery(d)
    assert read_delivery(message[:-1]) is Unread.PARTIAL


def test_anything_but_a_delivery_on_one_channel_is_left_to_pika() -> None:
    d = {"channel": 3, "consumer_tag": "c", "delivery_tag": 7, "redelivered": True, "exchange": "", "routing_key": "q"}
    d |= {"message_id": "m", "correlation_id": None, "reply_to": None, "timestamp": None, "headers": {"a": 1}}
    d |= {"body": b"0123456789", "body_max": 4}
    message, method, _ = encoded_delivery(d)
    method_size = len(frame.Method(3, method).marshal())
    ack = frame.Method(3, spec.Basic.Ack(delivery_tag=5, multiple=True)).marshal()
    heartbeat = frame.Heartbeat().marshal()
    assert read_delivery(ack + message) is Unread.OTHER
    assert read_delivery(heartbeat + message) is Unread.OTHER
    # Another channel's frame between the method and the header: pika assembles it frame by frame.
    assert read_delivery(message[:method_size] + heartbeat + message[method_size:]) is Unread.OTHER
    # The header on another channel, a broken end marker, an empty buffer.
    moved = message[:method_size] + message[method_size : method_size + 1] + struct.pack(">H", 4)
    assert read_delivery(moved + message[method_size + 3 :]) is Unread.OTHER
    broken = bytearray(message)
    broken[method_size - 1] = 0
    assert read_delivery(bytes(broken)) is Unread.OTHER
    assert read_delivery(b"") is Unread.OTHER


# -- against the broker -----------------------------------------------------------------------------


@pytest.mark.broker
def test_deliveries_and_publishes_of_every_size_cross_a_real_broker_intact(broker_is_up: None) -> None:
    """Deliveries read by the worker's connection, in one go or left to pika (partial, large, split into
    frames), and results it publishes through PublishFrames, against the real broker."""
    queue, out = f"test-frames-{uuid.uuid4().hex}", f"test-frames-out-{uuid.uuid4().hex}"
    sizes = [0, 1, 500, WAIT_MAX_BYTES - 100, WAIT_MAX_BYTES + 100, 300_000] + [
        random.randrange(50, 900) for _ in range(3000)
    ]
    sent = [(f"m{n}", {"n": n, "x-tag": "é" * (n % 5)}, random.randbytes(size)) for n, size in enumerate(sizes)]
    blocking = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = blocking.channel()
        channel.queue_declare(queue, auto_delete=False)
        channel.queue_declare(out, auto_delete=False)
        for message_id, headers, body in sent:
            channel.basic_publish("", queue, body, pika.BasicProperties(message_id=message_id, headers=headers))
        received, confirmed, whole = consume_and_republish(queue, out, len(sent))
        # Most were read whole; the one of 300 kB (three frames, each larger than a socket read) was not.
        assert len(sent) / 2 < whole < len(sent)
        assert [(p.message_id, p.headers, body) for p, body in received] == sent
        assert confirmed == [True] * len(sent)
        for message_id, _headers, body in sent:
            method, properties, got = channel.basic_get(out, auto_ack=True)
            assert method is not None, f"{message_id} was confirmed but is not in {out}"
            assert (properties.message_id, properties.correlation_id, got) == (message_id, "c-" + message_id, body)
            assert (properties.content_type, properties.delivery_mode) == (CONTENT_TYPE, 2)
    finally:
        channel.queue_delete(queue)
        channel.queue_delete(out)
        blocking.close()


def consume_and_republish(
    queue: str, out: str, count: int
) -> tuple[list[tuple[spec.BasicProperties, bytes]], list[bool], int]:
    """Consume ``count`` messages of ``queue`` on the worker's connection class, publishing each body
    to ``out`` with ``ConfirmTracker.publish_json``; what arrived, and each publish's answer."""
    received: list[tuple[spec.BasicProperties, bytes]] = []
    confirmed: list[bool] = []

    def on_channel(channel: Any) -> None:
        tracker = ConfirmTracker(channel)

        def on_message(ch: Any, method: spec.Basic.Deliver, properties: spec.BasicProperties, body: bytes) -> None:
            received.append((properties, body))
            message_id = properties.message_id
            tracker.publish_json("", out, body, message_id, "c-" + message_id, confirmed.append)
            ch.basic_ack(method.delivery_tag)

        channel.basic_consume(queue, on_message)

    connection = run_connection(on_channel, lambda: len(confirmed) == count, timeout_s=60)
    return received, confirmed, connection.whole_deliveries


def run_connection(
    on_channel: Callable[[Any], None], finished: Callable[[], bool], timeout_s: float
) -> _HearingConnection:
    """Open the worker's connection class with one channel handed to ``on_channel``, and run its I/O
    loop until ``finished()`` or ``timeout_s``; the connection, closed."""

    def check() -> None:
        if finished() or time.monotonic() > deadline:
            connection.close()
        else:
            connection.ioloop.call_later(0.05, check)

    deadline = time.monotonic() + timeout_s
    connection = _HearingConnection(
        pika.URLParameters(AMQP_URL),
        on_open_callback=lambda c: c.channel(on_open_callback=on_channel),
        on_close_callback=lambda *_: connection.ioloop.stop(),
    )
    connection.ioloop.call_later(0.05, check)
    try:
        connection.ioloop.start()
    finally:
        connection.ioloop.close()
    return connection


@pytest.mark.broker
def test_packed_and_pika_publishes_in_one_pass_are_confirmed_in_order(broker_is_up: None) -> None:
    """publish_json's frames wait for the end of the loop pass; a publish through pika in between
    writes them first, so the broker numbers every publish in the order it was made (else the answers
    of a queue that refuses some would land on the wrong publishes)."""
    bounded, unbounded = f"test-frames-bounded-{uuid.uuid4().hex}", f"test-frames-{uuid.uuid4().hex}"
    answers: dict[int, bool] = {}

    def on_channel(channel: Any) -> None:
        tracker = ConfirmTracker(channel)

        def publish_all() -> None:
            for n in range(300):
                answer = partial(answers.__setitem__, n)
                if n % 3 == 1:
                    tracker.publish(unbounded, b"{}", pika.BasicProperties(message_id=f"p{n}"), answer, mandatory=False)
                else:
                    tracker.publish_json("", bounded, b"{}", f"m{n}", None, answer)

        arguments = {"x-max-length": 100, "x-overflow": "reject-publish"}
        channel.queue_declare(
            bounded,
            arguments=arguments,
            callback=lambda _f: channel.queue_declare(unbounded, callback=lambda _f: publish_all()),
        )

    try:
        run_connection(on_channel, lambda: len(answers) == 300, timeout_s=30)
    finally:
        blocking = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        blocking.channel().queue_delete(bounded)
        blocking.channel().queue_delete(unbounded)
        blocking.close()
    packed = [n for n in range(300) if n % 3 != 1]
    expected = {n: True for n in range(300)} | {n: False for n in packed[100:]}  # the bounded queue took 100
    assert answers == expected

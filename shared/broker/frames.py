"""AMQP 0-9-1 frames of the hot path, encoded without pika's per-frame objects.

A worker publishes one result per job. pika builds a method, a header and a properties object per
message and marshals each field through generic code: several times what the bytes cost. Results all
have the same shape (a JSON body, persistent, a message id, perhaps a correlation id), so their frames
are packed here directly, byte for byte what pika would send (``tests/shared/test_frames.py`` holds
the two to each other), and handed to the connection in one write.

Each job, likewise, arrives as three frames that pika decodes one by one and routes through its
callback registry and content assembler. :func:`read_delivery` reads a whole message at once; the
connection (``shared/broker/connection.py``) hands it to the channel where pika's assembler would.

NOTE: this leans on pika internals (``Connection._read_frame``, ``_process_frame``, ``_frame_buffer``,
``_output_marshaled_frames``, ``_body_max_length``, ``Channel._on_deliver``), stable across pika 1.x;
the byte-for-byte and real-broker tests in ``tests/shared/test_frames.py`` fail if an upgrade moves them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum

from pika.data import decode_table
from pika.exceptions import ShortStringTooLong
from pika.spec import Basic, BasicProperties

_BASIC = 60
_PUBLISH = 40
_FRAME_METHOD, _FRAME_HEADER, _FRAME_BODY = 1, 2, 3
_FRAME_END = b"\xce"
_FLAG_CONTENT_TYPE = 1 << 15
_FLAG_DELIVERY_MODE = 1 << 12
_FLAG_CORRELATION_ID = 1 << 10
_FLAG_MESSAGE_ID = 1 << 7
_PERSISTENT = b"\x02"

_FRAME_HEAD = struct.Struct(">BHI")  # type, channel, payload size
_frame_start = _FRAME_HEAD.pack
_method_start = struct.Struct(">HHH").pack
_header_start = struct.Struct(">HHQH").pack


def short_string(value: str) -> bytes:
    """An AMQP short string: one length byte, then at most 255 bytes of UTF-8."""
    data = value.encode()
    if len(data) > 255:
        raise ShortStringTooLong(data)
    return bytes((len(data),)) + data


class PublishFrames:
    """Encodes ``basic.publish`` messages of one kind (JSON, persistent, with a message id) for one
    channel: the method, header and body frames of a message, as one ``bytes``."""

    def __init__(self, channel_number: int, content_type: str, body_max: int) -> None:
        if body_max < 1:
            raise ValueError(f"body_max must be positive, not {body_max}")
        self._channel = channel_number
        self._content_type = short_string(content_type)
        self._body_max = body_max
        self._methods: dict[tuple[str, str], bytes] = {}  # (exchange, routing key): the whole method frame

    def encode(
        self, exchange: str, routing_key: str, body: bytes, message_id: str, correlation_id: str | None
    ) -> bytes:
        """The frames of one message: not mandatory, not immediate, persistent."""
        method = self._methods.get((exchange, routing_key))
        if method is None:
            method = self._method_frame(exchange, routing_key)
        flags = _FLAG_CONTENT_TYPE | _FLAG_DELIVERY_MODE | _FLAG_MESSAGE_ID
        correlation = b""
        if correlation_id is not None:
            flags |= _FLAG_CORRELATION_ID
            correlation = short_string(correlation_id)
        header = b"".join(
            (
                _header_start(_BASIC, 0, len(body), flags),
                self._content_type,
                _PERSISTENT,
                correlation,
                short_string(message_id),
            )
        )
        parts = [method, _frame_start(_FRAME_HEADER, self._channel, len(header)), header, _FRAME_END]
        size, step = len(body), self._body_max
        for start in range(0, size, step):
            chunk = body[start : start + step] if size > step else body
            parts += (_frame_start(_FRAME_BODY, self._channel, len(chunk)), chunk, _FRAME_END)
        return b"".join(parts)

    def _method_frame(self, exchange: str, routing_key: str) -> bytes:
        payload = b"".join(
            (_method_start(_BASIC, _PUBLISH, 0), short_string(exchange), short_string(routing_key), b"\x00")
        )
        frame = _frame_start(_FRAME_METHOD, self._channel, len(payload)) + payload + _FRAME_END
        if len(self._methods) < 4096:  # a few routing keys per model: bounded all the same
            self._methods[(exchange, routing_key)] = frame
        return frame


_DELIVER_ID = (_BASIC << 16) | 60
_frame_head = _FRAME_HEAD.unpack_from
_method_id = struct.Struct(">I").unpack_from
_u64 = struct.Struct(">Q").unpack_from  # a delivery tag, a timestamp
_content_head = struct.Struct(">HHQ").unpack_from
_CONTENT_HEAD_SIZE = 12
_FRAME_END_BYTE = 0xCE
_FRAME_OVERHEAD = 8  # type, channel, size; the end marker


WAIT_MAX_BYTES = 65536
"""A message at most this large is read whole once all of it arrived; a larger one is left to pika as
soon as it is seen to be incomplete (waiting for it whole would copy pika's growing buffer on every
socket read)."""


class Unread(Enum):
    """Why :func:`read_delivery` read nothing."""

    OTHER = "other"
    """Not a whole message this reader takes: pika reads the next frame."""
    PARTIAL = "partial"
    """A message whose frames are not all here yet: wait for more bytes."""


@dataclass(slots=True, eq=False)
class Delivered:
    """A whole ``basic.deliver`` message read at once: its method, properties and body, and the bytes
    and frames it took."""

    size: int
    frames: int
    channel_number: int
    method: Basic.Deliver
    properties: BasicProperties
    body: bytes
    frame_type: int = _FRAME_METHOD


def _short_string(data: bytes, offset: int) -> tuple[str | bytes, int]:
    end = offset + 1 + data[offset]
    raw = data[offset + 1 : end]
    try:
        return raw.decode(), end
    except UnicodeDecodeError:  # what pika's decoder gives back, too
        return raw, end


def read_delivery(data: bytes) -> Delivered | Unread:
    """The message at the start of ``data`` when it is a ``basic.deliver`` whose method, header and
    body frames are all there, in a row, on one channel. Otherwise :attr:`Unread.OTHER` (another frame,
    or a message this reader does not take), which pika then reads frame by frame as usual, or
    :attr:`Unread.PARTIAL`: a small message whose first frames are here and the rest is on its way."""
    method = _read_method(data)
    if method is None:
        return Unread.OTHER
    channel, deliver, start = method
    header = _frame(data, start, _FRAME_HEADER, channel, WAIT_MAX_BYTES)
    if isinstance(header, Unread):
        return header
    if header - start - 7 < _CONTENT_HEAD_SIZE + 2:
        return Unread.OTHER  # no room for the property flags: pika reports what is wrong
    class_id, _weight, body_size = _content_head(data, start + 7)
    if class_id != _BASIC:
        return Unread.OTHER
    wait_for = WAIT_MAX_BYTES if body_size <= WAIT_MAX_BYTES else -1
    position, frames, chunks, remaining = header + 1, 2, [], body_size
    while remaining > 0:
        end = _frame(data, position, _FRAME_BODY, channel, wait_for)
        if isinstance(end, Unread):
            return end
        if end - position - 7 > remaining:
            return Unread.OTHER
        chunks.append(data[position + 7 : end])
        remaining -= end - position - 7
        position, frames = end + 1, frames + 1
    properties = read_properties(data[start + 7 + _CONTENT_HEAD_SIZE : header])
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)  # b"" for an empty body
    return Delivered(position, frames, channel, deliver, properties, body)


def _read_method(data: bytes) -> tuple[int, Basic.Deliver, int] | None:
    """The channel, method and end of a whole ``basic.deliver`` method frame at the start of ``data``."""
    if len(data) < _FRAME_OVERHEAD + 4 or data[0] != _FRAME_METHOD:
        return None
    _, channel, size = _frame_head(data, 0)
    end = 7 + size
    if end >= len(data) or data[end] != _FRAME_END_BYTE or _method_id(data, 7)[0] != _DELIVER_ID:
        return None
    try:
        consumer_tag, offset = _short_string(data, 11)
        delivery_tag = _u64(data, offset)[0]
        redelivered = bool(data[offset + 8] & 1)
        exchange, offset = _short_string(data, offset + 9)
        routing_key, offset = _short_string(data, offset)
    except (IndexError, struct.error):
        return None  # lengths that run past the data: malformed, and pika's decoder says so
    if offset != end:
        return None  # not the layout this reader knows: pika's own decoder says what it is
    return channel, Basic.Deliver(consumer_tag, delivery_tag, redelivered, exchange, routing_key), end + 1


def _frame(data: bytes, start: int, kind: int, channel: int, wait_for: int) -> int | Unread:
    """Where the frame at ``start`` ends (its end marker) when it is of ``kind`` on ``channel`` and all
    here; :attr:`Unread.PARTIAL` when it is not all here and the message is at most ``wait_for`` bytes."""
    if start + 7 > len(data):
        return Unread.PARTIAL if wait_for >= 0 else Unread.OTHER
    frame_kind, frame_channel, size = _frame_head(data, start)
    if frame_kind != kind or frame_channel != channel:
        return Unread.OTHER
    end = start + 7 + size
    if end >= len(data):
        return Unread.PARTIAL if 0 <= size <= wait_for else Unread.OTHER
    return end if data[end] == _FRAME_END_BYTE else Unread.OTHER


_SHORT, _OCTET, _TIMESTAMP, _TABLE = range(4)
_PROPERTIES = (  # (flag, attribute, kind), in the order AMQP puts them on the wire
    (1 << 15, "content_type", _SHORT),
    (1 << 14, "content_encoding", _SHORT),
    (1 << 13, "headers", _TABLE),
    (1 << 12, "delivery_mode", _OCTET),
    (1 << 11, "priority", _OCTET),
    (1 << 10, "correlation_id", _SHORT),
    (1 << 9, "reply_to", _SHORT),
    (1 << 8, "expiration", _SHORT),
    (1 << 7, "message_id", _SHORT),
    (1 << 6, "timestamp", _TIMESTAMP),
    (1 << 5, "type", _SHORT),
    (1 << 4, "user_id", _SHORT),
    (1 << 3, "app_id", _SHORT),
    (1 << 2, "cluster_id", _SHORT),
)
_NONE = dict.fromkeys(name for _, name, _ in _PROPERTIES)
_plans: dict[int, tuple[tuple[str, int], ...]] = {}
_flags = struct.Struct(">H").unpack_from


def read_properties(data: bytes) -> BasicProperties:
    """What ``BasicProperties().decode(data)`` gives, decoding only the properties present: the
    messages of a queue mostly share one set of them, so the list of what to decode is kept per set."""
    flags = _flags(data, 0)[0]
    plan = _plans.get(flags)
    if plan is None:
        if flags & 1:  # a second flag word: never sent by RabbitMQ, so pika's own decoder reads it
            properties = BasicProperties()
            properties.decode(data)
            return properties
        plan = tuple((name, kind) for flag, name, kind in _PROPERTIES if flags & flag)
        _plans[flags] = plan  # at most 2**13 distinct sets: bounded
    values = dict(_NONE)
    offset = 2
    for name, kind in plan:
        if kind == _SHORT:
            values[name], offset = _short_string(data, offset)
        elif kind == _OCTET:
            values[name] = data[offset]
            offset += 1
        elif kind == _TIMESTAMP:
            values[name] = _u64(data, offset)[0]
            offset += 8
        else:
            values[name], offset = decode_table(data, offset)
    properties = _new(BasicProperties)
    properties.__dict__ = values
    return properties


_new = object.__new__

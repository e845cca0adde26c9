"""Readiness: can the gateway accept jobs? Its broker connection is up and the jobs queue is below its
bound. Can a model be served? Its version exists and a worker consumes the jobs queue. The queue's
depth and consumers are read with a passive declare on a short-lived connection of its own (the
publisher's connection belongs to its thread) and cached, so probes cost the broker little."""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass

import pika

from inferq.gateway.catalog import Catalog
from inferq.shared.config.settings import InferqSettings
from inferq.shared.contract.messages import VersionRef

PROBE_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class QueueReading:
    """The jobs queue's depth and consumer count, or why they could not be read."""

    depth: int | None
    problem: str | None = None
    consumers: int | None = None


class QueueProbe:
    """Reads the jobs queue's depth at most once per ``cache_s``."""

    def __init__(self, settings: InferqSettings, cache_s: float) -> None:
        self._settings = settings
        self._cache_s = cache_s
        self._lock = threading.Lock()
        self._last: tuple[float, QueueReading] | None = None

    def read(self) -> QueueReading:
        """The depth now (or at most ``cache_s`` ago)."""
        with self._lock:
            if self._last is not None and time.monotonic() - self._last[0] < self._cache_s:
                return self._last[1]
            reading = self._read()
            self._last = (time.monotonic(), reading)
            return reading

    def _read(self) -> QueueReading:
        params = pika.URLParameters(self._settings.amqp_url.get_secret_value())
        params.connection_attempts = 1
        params.socket_timeout = PROBE_TIMEOUT_S
        params.blocked_connection_timeout = PROBE_TIMEOUT_S
        params.client_properties = {"connection_name": "inferq-gateway-probe"}
        try:
            connection = pika.BlockingConnection(params)
        except pika.exceptions.AMQPError as exc:
            return QueueReading(None, f"broker unreachable ({type(exc).__name__})")
        except OSError as exc:
            return QueueReading(None, f"broker unreachable ({exc.strerror or type(exc).__name__})")
        try:
            frame = connection.channel().queue_declare(self._settings.jobs_queue, passive=True)
            return QueueReading(int(frame.method.message_count), consumers=int(frame.method.consumer_count))
        except pika.exceptions.ChannelClosedByBroker as exc:
            return QueueReading(None, f"queue {self._settings.jobs_queue} not declared ({exc.reply_code})")
        except pika.exceptions.AMQPError as exc:
            return QueueReading(None, f"broker unreachable ({type(exc).__name__})")
        finally:
            with contextlib.suppress(pika.exceptions.AMQPError):  # already closed by the broker or the network
                connection.close()


def model_not_ready(catalog: Catalog, probe: QueueProbe, name: str, ref: VersionRef) -> str | None:
    """Why version ``ref`` of model ``name`` cannot be served now (no worker consumes the jobs queue, or
    it cannot be read), or ``None`` when it can; raises ``UnknownModel``/``UnknownVersion`` when it does
    not exist, and the catalog's store errors."""
    catalog.manifest(name, ref)
    reading = probe.read()
    if reading.consumers is None:
        return reading.problem or "the jobs queue cannot be read"
    if reading.consumers == 0:
        return "no worker consumes the jobs queue"
    return None

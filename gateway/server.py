"""``inferq serve``: the gateway on uvicorn, with a graceful stop.

On SIGTERM (or SIGINT) uvicorn stops accepting connections and lets the requests in flight finish
(each waits for its broker confirm), for at most ``shutdown_grace_s``; requests waiting for a result
are woken and answer 202 at once instead of holding the stop up. Then the app's lifespan ends:
the publisher publishes and confirms whatever was handed to it, and the stores are closed.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

import uvicorn

from inferq.gateway.app import create_app
from inferq.gateway.catalog import Catalog
from inferq.gateway.listener import Listener, Subscription
from inferq.gateway.metrics import GatewayMetrics
from inferq.gateway.probe import QueueProbe
from inferq.gateway.publisher import Publisher
from inferq.gateway.records import default_location, open_operation_store
from inferq.gateway.service import FALLBACK_POLL_S, Gateway
from inferq.gateway.settings import GatewaySettings
from inferq.model_store.stores import open_model_store
from inferq.shared.broker.topology import dead_letters_exchange
from inferq.shared.config.logging import get_logger, redact_text
from inferq.shared.results.stores import open_result_store

log = get_logger(__name__)


def build_gateway(settings: GatewaySettings, *, fallback_poll_s: float = FALLBACK_POLL_S) -> Gateway:
    """Open the stores, start the publisher, then listen for dead letters and results; raises
    ``ConfigError`` for a configuration that cannot work."""
    operations = open_operation_store(settings.operations_store or default_location(settings.result_store))
    publisher = Publisher(settings)
    gateway = Gateway(
        settings,
        publisher=publisher,
        operations=operations,
        results=open_result_store(settings.result_store),
        catalog=Catalog(open_model_store(settings.model_store), settings.alias_refresh_s),
        probe=QueueProbe(settings, settings.ready_cache_s),
        metrics=GatewayMetrics(),
        fallback_poll_s=fallback_poll_s,
    )
    try:
        publisher.start(timeout_s=settings.connect_timeout_s + 5)
    except BaseException:
        operations.close()
        raise
    # Every replica hears every dead letter on a queue of its own and notes those of the jobs this API
    # admitted in the shared records: any replica then answers for them.
    dead_letters = Subscription("gateway-dead-letters", dead_letters_exchange(settings), gateway.hear_dead_letters)
    # And every result notification, to wake the requests of this replica waiting for theirs (only those
    # are decoded). After a reconnect, what was published meanwhile went unheard: the waiting requests
    # look in the store.
    results = Subscription("gateway-results", settings.results_exchange_name, gateway.hear_results)
    gateway.listener = Listener(
        settings, [dead_letters, results], name="inferq-gateway-listener", on_listening=gateway.waiters.wake_all
    )
    gateway.listener.start()
    return gateway


class GatewayServer(uvicorn.Server):
    """uvicorn's server, telling the gateway when a stop begins."""

    def __init__(self, config: uvicorn.Config, gateway: Gateway) -> None:
        super().__init__(config)
        self.gateway = gateway

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's handlers, without raising the signal again once stopped: a graceful stop exits 0
        (as a worker does), so a supervisor can tell it from a crash."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.gateway.stopping.is_set():
            log.info("gateway_stopping", signal=sig)
        self.gateway.begin_stop()
        super().handle_exit(sig, frame)


def server_for(gateway: Gateway) -> GatewayServer:
    """A server for ``gateway`` on ``INFERQ_HTTP_HOST:INFERQ_HTTP_PORT``."""
    settings = gateway.settings
    config = uvicorn.Config(
        create_app(gateway),
        host=settings.http_host,
        port=settings.http_port,
        timeout_keep_alive=settings.http_keep_alive_s,
        log_config=None,  # our structlog set-up already owns the root logger
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=max(1, int(settings.shutdown_grace_s)),
        lifespan="on",
    )
    return GatewayServer(config, gateway)


def serve(settings: GatewaySettings) -> None:
    """Run the gateway until SIGTERM or SIGINT."""
    gateway = build_gateway(settings)
    log.info(
        "gateway_starting",
        host=settings.http_host,
        port=settings.http_port,
        jobs_queue=settings.jobs_queue,
        result_store=redact_text(settings.result_store),
        operations=gateway.operations.describe(),
        auth="bearer" if settings.api_token is not None else "off",
    )
    server_for(gateway).run()
    log.info("gateway_stopped")

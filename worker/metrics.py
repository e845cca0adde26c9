"""The worker's numbers and probes: Prometheus metrics, ``/healthz`` and ``/readyz`` on one HTTP port.

The metrics live on a registry of their own (no process-global state), so several workers in one
test process never share counters. Everything is recorded from the worker's I/O thread or its
processing thread; prometheus-client's metrics are thread-safe, and the HTTP server runs on a daemon
thread that only *reads* worker state.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol

import numpy as np
import numpy.typing as npt
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from inferq.model_store.base import ModelStore
from inferq.model_store.cache import ModelCache
from inferq.model_store.manifest import Manifest
from inferq.model_store.registry import Registry
from inferq.shared.config.logging import get_logger
from inferq.shared.config.settings import WorkerSettings
from inferq.shared.contract.messages import Status
from inferq.shared.errors import ErrorCode
from inferq.worker.live_performance import LivePerformance
from inferq.worker.processor import BatchRun, Outcome
from inferq.worker.runner import LoadedModel

log = get_logger(__name__)

# A failed job may name a model that does not exist: never turn caller-chosen text into a label value
# (one time series per typo would grow without bound).
UNTRUSTED_MODEL_CODES = frozenset({ErrorCode.UNKNOWN_MODEL, ErrorCode.INVALID_PAYLOAD})
OTHER_MODEL = "_other"
_Key = tuple[str | None, int | None, Status, ErrorCode | None]
"""A result's model, version, status and error code: what its labels are made of."""

ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384, 65536)
INFERENCE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
LOAD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class BatchHistogram:
    """A histogram with one label, filled a batch at a time: one numpy call per batch and label value,
    where prometheus-client's :class:`Histogram` takes a lock and a bucket search per job."""

    def __init__(
        self, name: str, documentation: str, label: str, buckets: Sequence[float], registry: CollectorRegistry
    ) -> None:
        self._name, self._documentation, self._label = name, documentation, label
        self._bounds = np.array([*buckets, float("inf")], dtype=np.float64)
        self._counts: dict[str, npt.NDArray[np.int64]] = {}
        self._sums: dict[str, float] = {}
        self._lock = threading.Lock()
        registry.register(self)

    def observe_many(self, label_value: str, values: Sequence[float]) -> None:
        """Count every one of ``values`` under ``label_value``."""
        if not values:
            return
        array = np.asarray(values, dtype=np.float64)
        # A value equal to a bucket's upper bound belongs to that bucket (le), as in Prometheus.
        per_bucket = np.bincount(np.searchsorted(self._bounds, array, side="left"), minlength=len(self._bounds))
        with self._lock:
            counts = self._counts.get(label_value)
            if counts is None:
                counts = self._counts[label_value] = np.zeros(len(self._bounds), dtype=np.int64)
                self._sums[label_value] = 0.0
            counts += per_bucket[: len(self._bounds)]
            self._sums[label_value] += float(array.sum())

    def collect(self) -> Iterator[HistogramMetricFamily]:
        """The histogram, for the registry's scrape."""
        family = HistogramMetricFamily(self._name, self._documentation, labels=[self._label])
        with self._lock:
            snapshot = [(value, counts.cumsum(), self._sums[value]) for value, counts in self._counts.items()]
        for value, cumulative, total in snapshot:
            buckets = [(_bound(b), float(c)) for b, c in zip(self._bounds, cumulative, strict=True)]
            family.add_metric([value], buckets, total)
        yield family

    def describe(self) -> Iterator[HistogramMetricFamily]:
        """The family without samples (the registry checks names with it)."""
        yield HistogramMetricFamily(self._name, self._documentation, labels=[self._label])


def _bound(upper: float) -> str:
    """A bucket's ``le`` label, written as prometheus-client writes it (``+Inf``, ``0.005``, ``1.0``)."""
    text: str = floatToGoString(upper)  # type: ignore[no-untyped-call]
    return text


# -- the age of the backlog ------------------------------------------------------------------------
# RabbitMQ does not tell the age of a quorum queue's oldest message, so the worker tells how long the jobs
# it takes had waited: a FIFO queue hands out its head, so that wait is the head's age when it was taken.


class QueueWait:
    """How long the newest job a worker finished had waited in the jobs queue, and when it was delivered.

    Only first deliveries from the jobs queue say how old the queue's head is: a redelivered job or one
    from the retry queue carries its first publish time, so its wait includes time it was not queued."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.wait_seconds = Gauge(
            "inferq_job_queue_wait_seconds",
            "Publish to delivery of the newest first delivery from the jobs queue this worker finished.",
            registry=registry,
        )
        self.received_timestamp = Gauge(
            "inferq_job_received_timestamp_seconds",
            "When (Unix time) the newest job this worker finished was delivered to it (its start until then).",
            registry=registry,
        )
        # A worker that has finished nothing yet reads as one that last made progress when it started, so
        # "nothing finished for N minutes" also holds for workers that never finish their first job.
        self.received_timestamp.set(time.time())

    def observe(self, outcomes: Sequence[Outcome]) -> None:
        """Record the newest delivery among ``outcomes``, and the wait of the newest first delivery."""
        newest_received_ms: float | None = None
        newest_wait: tuple[float, float] | None = None  # (received_ms, waited_ms)
        for outcome in outcomes:
            delivery = outcome.delivery
            received = delivery.received_ms
            if newest_received_ms is None or received > newest_received_ms:
                newest_received_ms = received
            published = delivery.published_ms
            first = not (delivery.redelivered or delivery.suspect)
            if first and published is not None and (newest_wait is None or received > newest_wait[0]):
                newest_wait = (received, max(received - published, 0.0))
        if newest_received_ms is not None:
            self.received_timestamp.set(newest_received_ms / 1000)
        if newest_wait is not None:
            self.wait_seconds.set(newest_wait[1] / 1000)


class WorkerState(Protocol):
    """What the probes and gauges read from a running worker."""

    @property
    def ready(self) -> bool:
        """Connected, consuming, and not stopping."""

    @property
    def stopping(self) -> bool:
        """A graceful stop (drain) is under way."""

    @property
    def in_flight(self) -> int:
        """Deliveries received and not yet acked."""


class WatchedWorker(WorkerState, Protocol):
    """A running worker whose settings name its stores (for the live performance gauges)."""

    settings: WorkerSettings


class WorkerMetrics:
    """Every metric a worker exports. Names are the contract of the Grafana dashboard and alerts."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.jobs = Counter(
            "inferq_jobs",
            "Jobs finished, by model, version and status (succeeded, failed, expired, dead_lettered) and error code.",
            ["model", "version", "status", "code"],
            registry=r,
        )
        self.batch_rows = Histogram(
            "inferq_batch_rows",
            "Rows per micro-batch (one onnxruntime call).",
            ["model"],
            buckets=ROWS_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "inferq_inference_seconds",
            "Time of one onnxruntime call for a micro-batch.",
            ["model"],
            buckets=INFERENCE_BUCKETS,
            registry=r,
        )
        self.job_latency_seconds = BatchHistogram(
            "inferq_job_latency_seconds",
            "End to end, from the producer's publish to the stored result.",
            "model",
            LATENCY_BUCKETS,
            r,
        )
        self.in_flight = Gauge("inferq_jobs_in_flight", "Deliveries received and not yet acked.", registry=r)
        self.model_load_seconds = Histogram(
            "inferq_model_load_seconds",
            "Time to read, verify and load a model version that was not cached.",
            ["model"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.model_cache_hits = Counter(
            "inferq_model_cache_hits", "Batches that found their model version already loaded.", ["model"], registry=r
        )
        self.model_cache_misses = Counter(
            "inferq_model_cache_misses", "Batches that had to load their model version.", ["model"], registry=r
        )
        self.info = Gauge(
            "inferq_worker_info",
            "1, labelled with the onnxruntime execution provider in use.",
            ["provider"],
            registry=r,
        )
        self.draining = Gauge(
            "inferq_worker_draining", "1 while the worker finishes its in-flight work before exiting.", registry=r
        )
        self.queue_wait = QueueWait(r)

    def watch(self, worker: WatchedWorker) -> None:
        """Read the in-flight and draining gauges from ``worker`` at every scrape, and serve live
        performance (labeled predictions, accuracy) from its result store."""
        self.in_flight.set_function(lambda: worker.in_flight)
        self.draining.set_function(lambda: 1.0 if worker.stopping else 0.0)
        self.registry.register(LivePerformance(worker.settings.result_store, worker.settings.model_store))

    # -- recording --------------------------------------------------------------------------------

    def set_provider(self, provider: str) -> None:
        """The onnxruntime execution provider sessions are created with (first choice)."""
        self.info.labels(provider).set(1)

    def observe_processed(self, runs: Sequence[BatchRun], outcomes: Sequence[Outcome]) -> None:
        """One unit of work came back: count every job once (a result stored earlier and sent again
        is not a second success), and time every onnxruntime call."""
        # Per job only a tally by (model, version, status, error code) and its latency; labels are made
        # once per distinct key, not once per job.
        counts: dict[_Key, int] = {}
        latencies: dict[_Key, list[float]] = {}
        for outcome in outcomes:
            if outcome.counted:
                result = outcome.result
                error = result.error
                key = (result.model, result.version, result.status, None if error is None else error.code)
                counts[key] = counts.get(key, 0) + 1
                total_ms = result.timings.total_ms
                if total_ms is not None:
                    seconds = latencies.get(key)
                    if seconds is None:
                        seconds = latencies[key] = []
                    seconds.append(total_ms / 1000)
        for key, count in counts.items():
            self.jobs.labels(*self._labels(*key)).inc(count)
        by_model: dict[str, list[float]] = {}
        for key, seconds in latencies.items():
            by_model.setdefault(self._labels(*key)[0], []).extend(seconds)
        for model, seconds in by_model.items():
            self.job_latency_seconds.observe_many(model, seconds)
        for run in runs:
            self.batch_rows.labels(run.model).observe(run.rows)
            self.inference_seconds.labels(run.model).observe(run.seconds)
        self.queue_wait.observe(outcomes)

    def dead_lettered(self) -> None:
        """A message without a usable job id went to the dead-letter queue."""
        self.jobs.labels(OTHER_MODEL, "", "dead_lettered", "").inc()

    @staticmethod
    def _labels(
        model: str | None, version: int | None, status: Status, code: ErrorCode | None
    ) -> tuple[str, str, str, str]:
        model = OTHER_MODEL if model is None or code in UNTRUSTED_MODEL_CODES else model
        return model, "" if version is None else str(version), status.value, "" if code is None else code.value

    def render(self) -> bytes:
        """The metrics in the Prometheus text format."""
        return generate_latest(self.registry)


class MeteredRegistry(Registry[LoadedModel]):
    """The model registry, timing each load and counting cache hits per model."""

    def __init__(
        self,
        store: ModelStore,
        loader: Callable[[Manifest, bytes], LoadedModel],
        *,
        metrics: WorkerMetrics,
        max_loaded: int,
        refresh_s: float,
        cache: ModelCache | None = None,
        load_retry_s: float = 10.0,
    ) -> None:
        super().__init__(
            store, loader, max_loaded=max_loaded, refresh_s=refresh_s, cache=cache, load_retry_s=load_retry_s
        )
        self._metrics = metrics
        # -- alias guards: each rollback counted once, by the worker that carried it out (sum over workers)
        self.alias_rollbacks = Counter(
            "inferq_alias_rollbacks",
            "Guarded alias moves this worker rolled back (too many of the new version's jobs failed).",
            ["model", "alias"],
            registry=metrics.registry,
        )

    def alias_rolled_back(self, name: str, alias: str) -> None:
        super().alias_rolled_back(name, alias)
        self.alias_rollbacks.labels(name, alias).inc()

    def loaded_model(self, name: str, version: int) -> tuple[Manifest, LoadedModel] | None:
        loaded = super().loaded_model(name, version)
        if loaded is not None:
            self._metrics.model_cache_hits.labels(name).inc()
        return loaded

    def get(self, name: str, version: int) -> tuple[Manifest, LoadedModel]:
        cached = (name, version) in self.loaded()
        started = time.perf_counter()
        loaded = super().get(name, version)
        if not cached:
            self._metrics.model_cache_misses.labels(name).inc()
            self._metrics.model_load_seconds.labels(name).observe(time.perf_counter() - started)
        return loaded


# -- the HTTP endpoint ------------------------------------------------------------------------------


def _handler(metrics: WorkerMetrics, ready: Callable[[], bool]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        """``/metrics``, ``/healthz`` (the process answers) and ``/readyz`` (connected and consuming)."""

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(HTTPStatus.OK, metrics.render(), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._reply(HTTPStatus.OK, b"ok\n")
            elif path == "/readyz":
                is_ready = ready()
                status = HTTPStatus.OK if is_ready else HTTPStatus.SERVICE_UNAVAILABLE
                self._reply(status, b"ready\n" if is_ready else b"not ready\n")
            else:
                self._reply(HTTPStatus.NOT_FOUND, b"not found\n")

        def _reply(self, status: HTTPStatus, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # probes hit these every few seconds: not worth a log line each

    return Handler


class MetricsServer:
    """The worker's HTTP port, served from a daemon thread until :meth:`close`."""

    def __init__(self, metrics: WorkerMetrics, worker: WorkerState, host: str, port: int) -> None:
        self._server = ThreadingHTTPServer((host, port), _handler(metrics, lambda: worker.ready))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="inferq-metrics", daemon=True)

    @property
    def port(self) -> int:
        """The bound port (useful when asked for port 0)."""
        return int(self._server.server_address[1])

    def start(self) -> MetricsServer:
        """Serve in the background."""
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()


def start_metrics_server(metrics: WorkerMetrics, worker: WorkerState, host: str, port: int) -> MetricsServer | None:
    """Serve the worker's metrics and probes on ``port``; ``None`` when it is 0 (turned off)."""
    if port == 0:
        return None
    try:
        server = MetricsServer(metrics, worker, host, port).start()
    except OSError as exc:
        # Observability must not stop the work: several workers on one host without their own ports
        # (e.g. drain-mode runs) still process jobs; the failing probes make it visible where they matter.
        log.error("metrics_unavailable", host=host, port=port, error=str(exc))
        return None
    log.info("metrics_serving", host=host, port=server.port, paths=["/metrics", "/healthz", "/readyz"])
    return server

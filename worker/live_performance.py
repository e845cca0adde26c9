"""Live performance as Prometheus gauges on the worker's ``/metrics``: labeled predictions and accuracy per
model version, from the labels and results beside each other in the result store.

Computed at a scrape, at most once per ``refresh_s`` (the join reads only the labeled predictions, not
every result); between two computations a scrape gets the last numbers. Every worker serves the same
numbers, so rules and panels take ``max by (model, version)``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily

from inferq.model_store.base import ModelStore
from inferq.model_store.stores import open_model_store
from inferq.monitoring.performance import VersionPerformance, live_performance
from inferq.shared.config.logging import get_logger
from inferq.shared.errors import InferqError
from inferq.shared.results.base import ResultStore
from inferq.shared.results.stores import open_result_store

log = get_logger(__name__)

REFRESH_S = 30.0
LABELED = "inferq_labeled_total"
ACCURACY = "inferq_live_accuracy"
_Snapshot = dict[tuple[str, int], VersionPerformance]


class LivePerformance:
    """A collector of ``inferq_labeled_total`` and ``inferq_live_accuracy`` (``model``, ``version``)."""

    def __init__(
        self,
        result_store: str,
        model_store: str,
        refresh_s: float = REFRESH_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._locations = (result_store, model_store)
        self._refresh_s, self._clock = refresh_s, clock
        self._stores: tuple[ResultStore, ModelStore] | None = None  # opened at the first scrape
        self._snapshot: _Snapshot = {}
        self._computed_at: float | None = None
        self._lock = threading.Lock()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """The gauges, for the registry's scrape."""
        labeled, accuracy = self._families()
        for (model, version), performance in sorted(self._current().items()):
            labeled.add_metric([model, str(version)], performance.labeled)
            if performance.accuracy is not None:
                accuracy.add_metric([model, str(version)], performance.accuracy)
        yield labeled
        yield accuracy

    def describe(self) -> Iterator[GaugeMetricFamily]:
        """The families without samples (the registry checks names with them, and must not compute)."""
        yield from self._families()

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                LABELED, "Predictions that have a label, per model version.", labels=["model", "version"]
            ),
            GaugeMetricFamily(
                ACCURACY,
                "Share of labeled predictions that were right (classifiers), 0..1.",
                labels=["model", "version"],
            ),
        )

    def _current(self) -> _Snapshot:
        with self._lock:
            now = self._clock()
            if self._computed_at is None or now - self._computed_at >= self._refresh_s:
                self._computed_at = now
                try:
                    self._snapshot = self._compute()
                except (InferqError, OSError) as exc:
                    # A store that is down must not break the scrape: the last numbers stay until it is back.
                    log.warning("live_performance_unavailable", error=str(exc))
            return self._snapshot

    def _compute(self) -> _Snapshot:
        if self._stores is None:
            self._stores = (open_result_store(self._locations[0]), open_model_store(self._locations[1]))
        results, models = self._stores
        labels = results.labels()
        snapshot: _Snapshot = {}
        for model in labels.labeled_models():
            for version, performance in live_performance(models, labels, model).items():
                snapshot[(model, version)] = performance
        return snapshot

    def close(self) -> None:
        """Release the result store's connections."""
        with self._lock:
            if self._stores is not None:
                self._stores[0].close()
                self._stores = None

"""Drift counting in the worker: every batch's rows binned against its version's reference.

Per (model, version) the worker keeps integer counts per input feature and output bin in tumbling
windows of ``INFERQ_MONITOR_WINDOW_S`` aligned to the clock (so windows of different workers line up).
A closed window is written to the monitor store as soon as the next batch notices it closed; the open
one when the worker stops or finishes a drain. Prometheus reads running totals at scrape time, so the
hot path adds no metric calls. A version without a reference costs one attribute read per batch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from model_store.manifest import Manifest
from model_store.reference import BinnedColumn, Reference, bin_counts, column_values
from shared.errors import JobError
from shared.logging import get_logger
from shared.messages import OutputTensor
from shared.monitor_store import MonitorStore, WindowCounts

log = get_logger(__name__)

Arrays = dict[str, npt.NDArray[Any]]
MAX_UNWRITTEN_WINDOWS = 10_000
"""Closed windows kept while the store refuses them; beyond this the oldest are dropped, and logged."""


@dataclass(slots=True)
class _Running:
    """Counts of one version since the worker started, for Prometheus."""

    reference: Reference
    rows: int
    inputs: list[npt.NDArray[np.int64]]
    outputs: list[npt.NDArray[np.int64]]


def _concat(parts: list[npt.NDArray[Any]]) -> npt.NDArray[Any]:
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


def _output_arrays(names: set[str], outputs: list[list[OutputTensor]]) -> Arrays:
    """Whole-batch arrays of the named outputs, rebuilt from each job's output tensors."""
    arrays: Arrays = {}
    for name in names:
        tensors = [t for job in outputs for t in job if t.name == name]
        flat = [x for t in tensors for x in t.data] if len(tensors) > 1 else list(tensors[0].data) if tensors else []
        rows = sum(t.shape[0] for t in tensors if t.shape)
        try:  # NOTE: the wire spells NaN and ±Inf as strings; numpy parses those when asked for floats.
            array = np.asarray(flat, dtype=np.float64)
        except (ValueError, TypeError):  # string labels
            array = np.asarray(flat, dtype=object)
        arrays[name] = array.reshape(rows, -1) if rows and array.size % rows == 0 else array
    return arrays


class Monitor:
    """Counts batches of monitored versions into windows and writes closed windows to a store."""

    def __init__(self, store: MonitorStore, window_s: int, worker: str, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.window_s = window_s
        self.worker = worker
        self._clock = clock
        self._lock = threading.Lock()  # observe runs on the processing thread, flush on the I/O thread
        self._write_lock = threading.Lock()
        self._open: dict[tuple[str, int], WindowCounts] = {}
        self._unwritten: list[WindowCounts] = []
        self._running: dict[tuple[str, int], _Running] = {}
        self.dropped_windows = 0

    # -- the seam: one call per batch -------------------------------------------------------------

    def observe(self, manifest: Manifest, inputs: Sequence[Arrays], results: Sequence[object]) -> None:
        """Count the rows of the jobs of one batch that ran (``results[i]`` is job i's output tensors, or
        its :class:`JobError`)."""
        reference = manifest.reference
        if reference is None:
            return
        ran = [(a, r) for a, r in zip(inputs, results, strict=True) if not isinstance(r, JobError)]
        if not ran:
            return
        feeds = {name: _concat([a[name] for a, _ in ran]) for name in ran[0][0]}
        rows = next(iter(feeds.values())).shape[0]
        feature_counts = [bin_counts(c, column_values(c, feeds[c.tensor])) for c in reference.features]
        outputs = _output_arrays({c.tensor for c in reference.outputs}, [r for _, r in ran])  # type: ignore[misc]
        output_counts = [self._count_output(c, outputs) for c in reference.outputs]
        closed = self._add(manifest, rows, feature_counts, output_counts)
        if closed:
            self._write(closed)

    @staticmethod
    def _count_output(column: BinnedColumn, outputs: Arrays) -> npt.NDArray[np.int64]:
        array = outputs.get(column.tensor)
        if array is None or array.size == 0:
            return np.zeros(column.bins, dtype=np.int64)
        return bin_counts(column, column_values(column, array))

    def _add(
        self,
        manifest: Manifest,
        rows: int,
        inputs: list[npt.NDArray[np.int64]],
        outputs: list[npt.NDArray[np.int64]],
    ) -> list[WindowCounts]:
        key = (manifest.name, manifest.version)
        start = int(self._clock() // self.window_s) * self.window_s
        with self._lock:
            closed = self._close_before(start)
            window = self._open.get(key)
            if window is None:
                window = WindowCounts(manifest.name, manifest.version, start, self.window_s, self.worker)
                self._open[key] = window
            window.rows += rows
            _merge(window.inputs, inputs)
            _merge(window.outputs, outputs)
            running = self._running.get(key)
            if running is None:
                assert manifest.reference is not None
                self._running[key] = _Running(manifest.reference, rows, list(inputs), list(outputs))
            else:
                running.rows += rows
                running.inputs = [a + b for a, b in zip(running.inputs, inputs, strict=True)]
                running.outputs = [a + b for a, b in zip(running.outputs, outputs, strict=True)]
        return closed

    def _close_before(self, start: int) -> list[WindowCounts]:
        """Windows that ended before ``start`` leave the open set (called with the lock held)."""
        closed = [w for w in self._open.values() if w.window_start < start]
        for window in closed:
            del self._open[(window.model, window.version)]
        return closed

    # -- writing ----------------------------------------------------------------------------------

    def _write(self, windows: list[WindowCounts]) -> bool:
        """Write ``windows`` and any earlier ones the store refused; True when nothing is left unwritten."""
        with self._write_lock:
            pending = [*self._unwritten, *windows]
            self._unwritten = []
            for number, window in enumerate(pending):
                try:
                    self.store.put_window(window)
                except OSError as exc:
                    self._keep_unwritten(pending[number:])
                    log.warning("monitor_window_not_written", windows=len(pending) - number, error=str(exc))
                    return False
                log.info("monitor_window_written", model=window.model, version=window.version, rows=window.rows)
            return True

    def _keep_unwritten(self, windows: list[WindowCounts]) -> None:
        excess = len(windows) - MAX_UNWRITTEN_WINDOWS
        if excess > 0:
            self.dropped_windows += excess
            log.error("monitor_windows_dropped", windows=excess, reason="the store refused them for too long")
            windows = windows[excess:]
        self._unwritten = windows

    def flush(self) -> bool:
        """Write every window, the open ones included (at stop and at the end of a drain)."""
        with self._lock:
            closed = self._close_before(2**62)
        return self._write(closed)

    # -- Prometheus -------------------------------------------------------------------------------

    def register(self, registry: CollectorRegistry) -> None:
        """Export the running counts on ``registry``."""
        registry.register(_MonitorCollector(self))

    def snapshot(self) -> list[tuple[str, int, _Running]]:
        """Running counts per (model, version), copied under the lock."""
        with self._lock:
            return [(m, v, _Running(r.reference, r.rows, r.inputs, r.outputs)) for (m, v), r in self._running.items()]


def _merge(into: dict[int, list[int]], counts: list[npt.NDArray[np.int64]]) -> None:
    for index, array in enumerate(counts):
        current = into.get(index)
        into[index] = (
            array.tolist() if current is None else [a + b for a, b in zip(current, array.tolist(), strict=True)]
        )


class _MonitorCollector(Collector):
    """Reads the monitor's running counts at scrape time."""

    def __init__(self, monitor: Monitor) -> None:
        self._monitor = monitor

    def describe(self) -> list[Metric]:
        return list(self._families())

    def collect(self) -> Iterator[Metric]:
        yield from self._families(self._monitor.snapshot())

    @staticmethod
    def _families(snapshot: list[tuple[str, int, _Running]] | None = None) -> Iterator[Metric]:
        labels = ["model", "version", "feature", "bin"]
        features = CounterMetricFamily(
            "inferq_feature_bin", "Input rows per feature bin of the version's reference.", labels=labels
        )
        outputs = CounterMetricFamily(
            "inferq_output_bin", "Output values per bin of the version's reference.", labels=labels
        )
        rows = CounterMetricFamily(
            "inferq_monitored_rows", "Rows counted for drift (versions with a reference).", labels=["model", "version"]
        )
        # The reference shares beside the live counts let a dashboard compute PSI in PromQL.
        feature_reference = GaugeMetricFamily(
            "inferq_feature_reference_ratio", "Reference share of each feature bin (fixed at publish).", labels=labels
        )
        output_reference = GaugeMetricFamily(
            "inferq_output_reference_ratio", "Reference share of each output bin (fixed at publish).", labels=labels
        )
        for model, version, running in snapshot or []:
            for family, shares, columns, counts in (
                (features, feature_reference, running.reference.features, running.inputs),
                (outputs, output_reference, running.reference.outputs, running.outputs),
            ):
                for column, array in zip(columns, counts, strict=True):
                    for label, count, share in zip(column.labels(), array.tolist(), column.proportions, strict=True):
                        family.add_metric([model, str(version), column.name, label], count)
                        shares.add_metric([model, str(version), column.name, label], share)
            rows.add_metric([model, str(version)], running.rows)
        yield from (features, outputs, rows, feature_reference, output_reference)

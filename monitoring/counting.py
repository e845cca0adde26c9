"""Drift counting in the worker: every batch's rows binned against its version's reference.

Per (model, version) the worker keeps integer counts per input feature and output bin in tumbling
windows of ``INFERQ_MONITOR_WINDOW_S`` aligned to the clock (so windows of different workers line up).
A closed window is written to the monitor store by the next batch that notices it closed, or by a
timer thread within a few seconds when no batch comes; the open one when the worker stops or finishes
a drain. Prometheus reads running totals at scrape time, so the
hot path adds no metric calls. A version without a reference costs one attribute read per batch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from itertools import chain
from typing import Any

import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from inferq.model_store.manifest import Manifest
from inferq.monitoring.reference import Binner, Reference
from inferq.monitoring.store import MonitorStore, WindowCounts
from inferq.shared.config.logging import get_logger
from inferq.shared.contract.messages import OutputTensor
from inferq.shared.errors import JobError
from inferq.worker.runner import Feed

log = get_logger(__name__)

Arrays = dict[str, npt.NDArray[Any]]
MAX_UNWRITTEN_WINDOWS = 10_000
"""Closed windows kept while the store refuses them; beyond this the oldest are dropped, and logged."""


class _Version:
    """One monitored version: its binners, its open window's counts and its running totals."""

    def __init__(self, manifest: Manifest, reference: Reference) -> None:
        self.model, self.version, self.reference = manifest.name, manifest.version, reference
        self.inputs = Binner(reference.features)
        self.outputs = Binner(reference.outputs)
        self.window_start: int | None = None
        self.window = np.zeros(self.inputs.size + self.outputs.size, dtype=np.int64)
        self.window_rows = 0
        self.running = self.window.copy()
        self.running_rows = 0

    def add(self, start: int, rows: int, counts: npt.NDArray[np.int64]) -> WindowCounts | None:
        """Count a batch into the window starting at ``start``; the window it closed, if any."""
        closed = self.close() if self.window_start is not None and self.window_start != start else None
        self.window_start = start
        self.window += counts
        self.window_rows += rows
        self.running += counts
        self.running_rows += rows
        return closed

    def close(self) -> WindowCounts | None:
        """The open window as a record to write (``None`` when empty), and a fresh one."""
        if self.window_start is None or not self.window_rows:
            self.window_start = None
            return None
        split = self.inputs.size
        closed = WindowCounts(
            self.model,
            self.version,
            self.window_start,
            0,
            "",
            self.window_rows,
            self.inputs.split(self.window[:split]),
            self.outputs.split(self.window[split:]),
        )
        self.window = np.zeros_like(self.window)
        self.window_rows = 0
        self.window_start = None
        return closed


def _concat(parts: list[npt.NDArray[Any]]) -> npt.NDArray[Any]:
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


def _output_arrays(names: list[str], outputs: list[list[OutputTensor]]) -> Arrays:
    """Whole-batch arrays of the named outputs, rebuilt from each job's output tensors."""
    arrays: Arrays = {}
    first = outputs[0]
    for position, tensor in enumerate(first):
        if tensor.name not in names:
            continue
        parts = [job[position] for job in outputs]
        flat = list(chain.from_iterable(t.data for t in parts)) if len(parts) > 1 else list(tensor.data)
        rows = sum(t.shape[0] for t in parts) if tensor.shape else 0
        try:  # NOTE: the wire spells NaN and ±Inf as strings; numpy parses those when asked for floats.
            array = np.asarray(flat, dtype=np.float64)
        except (ValueError, TypeError):  # string labels
            array = np.asarray(flat, dtype=object)
        arrays[tensor.name] = array.reshape(rows, -1) if rows and array.size % rows == 0 else array
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
        self._versions: dict[tuple[str, int], _Version] = {}
        self._unwritten: list[WindowCounts] = []
        self.dropped_windows = 0

    # -- the seam: one call per batch -------------------------------------------------------------

    def observe(self, manifest: Manifest, inputs: Sequence[Arrays], results: Sequence[object]) -> None:
        """Count the rows of the jobs of one batch that ran (``results[i]`` is job i's output tensors, or
        its :class:`JobError`)."""
        reference = manifest.reference
        if reference is None:
            return
        ran = [i for i, r in enumerate(results) if not isinstance(r, JobError)]
        if not ran:
            return
        key = (manifest.name, manifest.version)
        state = self._versions.get(key)
        if state is None:
            state = self._versions.setdefault(key, _Version(manifest, reference))
        if isinstance(inputs, Feed) and len(ran) == len(inputs):
            feeds = inputs.arrays  # every job ran: the batch's own stacked rows
        else:
            feeds = {name: _concat([inputs[i][name] for i in ran]) for name in inputs[ran[0]]}
        rows = next(iter(feeds.values())).shape[0]
        wanted = [c.tensor for c in reference.outputs]
        outputs = _output_arrays(wanted, [results[i] for i in ran])  # type: ignore[misc]
        counts = np.concatenate([state.inputs.counts(feeds), state.outputs.counts(outputs)])
        start = int(self._clock() // self.window_s) * self.window_s
        with self._lock:
            closed = self._close_before(start, keep=state)
            done = state.add(start, rows, counts)
        if done is not None:
            closed.append(done)
        if closed:
            self._write(closed)

    def _close_before(self, start: int, keep: _Version | None = None) -> list[WindowCounts]:
        """Windows of other versions that ended before ``start`` (called with the lock held)."""
        closed = []
        for state in self._versions.values():
            if state is not keep and state.window_start is not None and state.window_start < start:
                window = state.close()
                if window is not None:
                    closed.append(window)
        return closed

    def start_timer(self) -> None:
        """Write windows that closed while no batch came, from a daemon thread (checked every few seconds)."""

        def tick() -> None:
            while True:
                time.sleep(min(5.0, self.window_s))
                start = int(self._clock() // self.window_s) * self.window_s
                with self._lock:
                    closed = self._close_before(start)
                if closed:
                    self._write(closed)

        threading.Thread(target=tick, name="inferq-monitor", daemon=True).start()

    # -- writing ----------------------------------------------------------------------------------

    def _write(self, windows: list[WindowCounts]) -> bool:
        """Write ``windows`` and any earlier ones the store refused; True when nothing is left unwritten."""
        with self._write_lock:
            pending = [*self._unwritten, *windows]
            self._unwritten = []
            for number, window in enumerate(pending):
                window.window_s, window.worker = self.window_s, self.worker
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
            closed = [w for w in (state.close() for state in self._versions.values()) if w is not None]
        return self._write(closed)

    # -- Prometheus -------------------------------------------------------------------------------

    def register(self, registry: CollectorRegistry) -> None:
        """Export the running counts on ``registry``."""
        registry.register(_MonitorCollector(self))

    def snapshot(self) -> list[tuple[Reference, str, int, int, dict[int, list[int]], dict[int, list[int]]]]:
        """Running counts per version: reference, model, version, rows, input and output counts."""
        with self._lock:
            return [
                (
                    s.reference,
                    s.model,
                    s.version,
                    s.running_rows,
                    s.inputs.split(s.running[: s.inputs.size]),
                    s.outputs.split(s.running[s.inputs.size :]),
                )
                for s in self._versions.values()
            ]


class _MonitorCollector(Collector):
    """Reads the monitor's running counts at scrape time."""

    def __init__(self, monitor: Monitor) -> None:
        self._monitor = monitor

    def describe(self) -> list[Metric]:
        return list(self._families())

    def collect(self) -> Iterator[Metric]:
        yield from self._families(self._monitor.snapshot())

    @staticmethod
    def _families(
        snapshot: list[tuple[Reference, str, int, int, dict[int, list[int]], dict[int, list[int]]]] | None = None,
    ) -> Iterator[Metric]:
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
        for reference, model, version, running_rows, inputs, outputs_counts in snapshot or []:
            for family, shares, columns, counts in (
                (features, feature_reference, reference.features, inputs),
                (outputs, output_reference, reference.outputs, outputs_counts),
            ):
                for column in columns:
                    per_bin = counts[column.index]
                    for label, count, share in zip(column.labels(), per_bin, column.proportions, strict=True):
                        family.add_metric([model, str(version), column.name, label], count)
                        shares.add_metric([model, str(version), column.name, label], share)
            rows.add_metric([model, str(version)], running_rows)
        yield from (features, outputs, rows, feature_reference, output_reference)

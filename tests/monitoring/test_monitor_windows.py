"""The worker's drift counting: tumbling windows by the clock, closed windows written, the open one on flush."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from inferq.model_store.manifest import Manifest
from inferq.monitoring.counting import Monitor
from inferq.monitoring.reference import Reference, describe_inputs, describe_outputs
from inferq.monitoring.store import FileMonitorStore
from inferq.shared.contract.messages import Datatype, OutputTensor
from inferq.shared.errors import InferenceError

ROWS = np.array([[0.0, 10.0], [1.0, 11.0], [2.0, 12.0], [3.0, 13.0]], dtype=np.float32)


def manifest() -> Manifest:
    reference = Reference(
        rows=4,
        features=describe_inputs("X", ROWS, ["a", "b"]),
        outputs=describe_outputs({"label": np.array([0, 1, 0, 1])}),
    )
    return Manifest.model_construct(name="m", version=3, reference=reference)


def labels(*values: int) -> list[OutputTensor]:
    return [OutputTensor(name="label", shape=[len(values)], datatype=Datatype.INT64, data=list(values))]


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_closed_window_is_written_by_the_next_batch_and_the_open_one_on_flush(tmp_path: Path) -> None:
    store, clock = FileMonitorStore(tmp_path), Clock()
    monitor = Monitor(store, 60, "host:1", clock)
    version = manifest()

    monitor.observe(version, [{"X": ROWS[:2]}, {"X": ROWS[2:]}], [labels(0, 1), labels(0, 0)])
    assert store.totals("m", 3).windows == 0  # still open
    clock.now += 60
    monitor.observe(version, [{"X": ROWS[:1]}], [labels(1)])
    first = store.totals("m", 3)
    assert (first.windows, first.rows) == (1, 4)
    assert first.outputs[0][:2] == [3, 1]

    assert monitor.flush()
    both = store.totals("m", 3)
    assert (both.windows, both.rows) == (2, 5)
    assert sum(both.inputs[0]) == sum(both.inputs[1]) == 5


def test_failed_jobs_and_versions_without_reference_are_not_counted(tmp_path: Path) -> None:
    store = FileMonitorStore(tmp_path)
    monitor = Monitor(store, 60, "host:1", Clock())
    plain = Manifest.model_construct(name="p", version=1, reference=None)

    monitor.observe(plain, [{"X": ROWS}], [labels(0, 1, 0, 1)])
    monitor.observe(manifest(), [{"X": ROWS[:2]}, {"X": ROWS[2:]}], [labels(0, 1), InferenceError("bad rows")])
    monitor.flush()

    assert store.totals("p", 1).rows == 0
    assert store.totals("m", 3).rows == 2


def test_windows_the_store_refused_are_written_at_the_next_chance(tmp_path: Path) -> None:
    blocked = tmp_path / "results"
    blocked.write_text("a file where the directory should be")
    monitor = Monitor(FileMonitorStore(blocked), 60, "host:1", Clock())
    monitor.observe(manifest(), [{"X": ROWS}], [labels(0, 1, 0, 1)])

    assert not monitor.flush()
    blocked.unlink()
    assert monitor.flush()
    assert FileMonitorStore(blocked).totals("m", 3).rows == 4


def test_prometheus_sees_running_counts_and_reference_shares() -> None:
    registry = CollectorRegistry()
    monitor = Monitor(FileMonitorStore("/nonexistent"), 60, "host:1", Clock())
    monitor.register(registry)
    monitor.observe(manifest(), [{"X": ROWS}], [labels(0, 1, 0, 1)])

    samples = [s for f in text_string_to_metric_families(generate_latest(registry).decode()) for s in f.samples]
    rows = [s.value for s in samples if s.name == "inferq_monitored_rows_total"]
    feature_a = [s for s in samples if s.name == "inferq_feature_bin_total" and s.labels["feature"] == "a"]
    shares = [s.value for s in samples if s.name == "inferq_output_reference_ratio"]
    assert rows == [4.0]
    assert sum(s.value for s in feature_a) == 4 and {s.labels["model"] for s in feature_a} == {"m"}
    assert shares[:2] == [0.5, 0.5]


def test_a_window_that_closed_while_no_batch_came_is_written_by_the_timer(tmp_path: Path) -> None:
    store = FileMonitorStore(tmp_path)
    monitor = Monitor(store, 1, "host:1")  # one-second windows, the real clock
    monitor.start_timer()
    monitor.observe(manifest(), [{"X": ROWS}], [labels(0, 1, 0, 1)])

    deadline = time.monotonic() + 10
    while store.totals("m", 3).rows == 0:  # no other batch, no flush: only the timer can write it
        assert time.monotonic() < deadline, "the closed window was never written"
        time.sleep(0.1)
    assert store.totals("m", 3).windows == 1

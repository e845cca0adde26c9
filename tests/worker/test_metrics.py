"""The job latency histogram, filled a batch at a time, exports what prometheus-client's own would."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from inferq.worker.metrics import LATENCY_BUCKETS, WorkerMetrics


def samples(text: bytes) -> list[str]:
    return [line for line in text.decode().splitlines() if "latency" in line and not line.startswith("#")]


def test_a_batch_of_latencies_reads_as_the_same_observations_one_by_one() -> None:
    values = {"a": [0.001, 0.0011, 0.0, 5.0, 4000.0], "b": [0.3]}  # on a bound, between, beyond the last
    metrics = WorkerMetrics()
    reference_registry = CollectorRegistry()
    reference = Histogram(
        "inferq_job_latency_seconds",
        "End to end, from the producer's publish to the stored result.",
        ["model"],
        buckets=LATENCY_BUCKETS,
        registry=reference_registry,
    )
    for model, seconds in values.items():
        metrics.job_latency_seconds.observe_many(model, seconds[:2])
        metrics.job_latency_seconds.observe_many(model, seconds[2:])
        for value in seconds:
            reference.labels(model).observe(value)
    expected = [line for line in samples(generate_latest(reference_registry)) if "_created" not in line]
    assert samples(metrics.render()) == expected
    assert 'inferq_job_latency_seconds_bucket{le="+Inf",model="a"} 5.0' in expected

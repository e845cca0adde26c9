"""Pure numbers: percentiles, medians, ratios between systems measured in the same repetition."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence


def percentile(samples: Sequence[float], pct: float) -> float:
    """The ``pct``-th percentile (0 to 100) of ``samples`` by linear interpolation between order statistics
    (numpy's default method); ``nan`` when there are no samples."""
    if not 0 <= pct <= 100:
        raise ValueError(f"percentile must be within 0 to 100, got {pct}")
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * pct / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_summary(samples_ms: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/max of latencies in milliseconds, rounded to microseconds."""
    return {
        "p50_ms": round(percentile(samples_ms, 50), 3),
        "p95_ms": round(percentile(samples_ms, 95), 3),
        "p99_ms": round(percentile(samples_ms, 99), 3),
        "max_ms": round(max(samples_ms), 3) if samples_ms else math.nan,
    }


def median(values: Iterable[float]) -> float:
    """Median of the finite values; ``nan`` when there are none."""
    finite = [v for v in values if not math.isnan(v)]
    return statistics.median(finite) if finite else math.nan


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, ``nan`` when either is missing or the denominator is zero."""
    if math.isnan(numerator) or math.isnan(denominator) or denominator == 0:
        return math.nan
    return numerator / denominator


RATIOS: dict[str, tuple[str, str]] = {
    "inferq-x1 / ideal": ("inferq-x1", "ideal"),
    "inferq-x1 / naive": ("inferq-x1", "naive"),
    "inferq-x1 / celery": ("inferq-x1", "celery"),
    "inferq-x2 / inferq-x1": ("inferq-x2", "inferq-x1"),
    "inferq-x1 / inferq-x1-nomon": ("inferq-x1", "inferq-x1-nomon"),
}
"""The comparisons the targets are stated in, each as (numerator system, denominator system)."""


def ratios_per_rep(throughput: Mapping[int, Mapping[str, float]]) -> dict[str, list[float]]:
    """For each ratio, its value in every repetition: ``throughput[rep][system]`` in jobs/s. Ratios are
    taken inside one repetition, because the machine is shared and absolute numbers drift between them."""
    out: dict[str, list[float]] = {}
    for name, (top, bottom) in RATIOS.items():
        out[name] = [
            ratio(by_system.get(top, math.nan), by_system.get(bottom, math.nan))
            for _rep, by_system in sorted(throughput.items())
        ]
    return out

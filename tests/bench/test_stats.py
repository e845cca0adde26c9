"""The benchmark's pure arithmetic: percentiles, ratios inside a repetition, confirm bookkeeping."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.confirms import Confirmed
from bench.stats import latency_summary, median, percentile, ratio, ratios_per_rep


def test_percentile_matches_numpy_linear_interpolation() -> None:
    samples = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0]
    for pct in (0, 10, 50, 95, 99, 100):
        assert percentile(samples, pct) == pytest.approx(float(np.percentile(samples, pct)))


def test_percentile_of_nothing_is_nan_and_bad_pct_is_refused() -> None:
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError, match="0 to 100"):
        percentile([1.0], 101)


def test_latency_summary_reports_p50_p95_p99_and_max() -> None:
    summary = latency_summary([float(i) for i in range(1, 101)])
    assert summary == {"p50_ms": 50.5, "p95_ms": 95.05, "p99_ms": 99.01, "max_ms": 100.0}


def test_median_skips_missing_values_and_ratio_of_missing_is_nan() -> None:
    assert median([3.0, math.nan, 1.0, 2.0]) == 2.0
    assert math.isnan(median([math.nan]))
    assert math.isnan(ratio(1.0, 0.0))
    assert ratio(3.0, 2.0) == 1.5


def test_ratios_are_taken_inside_each_repetition() -> None:
    # Given a machine that got twice as slow in the second repetition
    throughput = {
        1: {"inferq-x1": 8000.0, "inferq-x2": 12000.0, "ideal": 10000.0, "naive": 1000.0, "celery": 500.0},
        2: {"inferq-x1": 4000.0, "inferq-x2": 6000.0, "ideal": 5000.0, "naive": 500.0, "celery": 250.0},
    }
    # Then every ratio is the same in both
    ratios = ratios_per_rep(throughput)
    assert ratios["inferq-x1 / ideal"] == [0.8, 0.8]
    assert ratios["inferq-x1 / naive"] == [8.0, 8.0]
    assert ratios["inferq-x1 / celery"] == [16.0, 16.0]
    assert ratios["inferq-x2 / inferq-x1"] == [1.5, 1.5]


def test_a_system_missing_from_a_repetition_gives_nan_for_its_ratios() -> None:
    ratios = ratios_per_rep({1: {"inferq-x1": 8000.0, "ideal": 10000.0}})
    assert ratios["inferq-x1 / ideal"] == [0.8]
    assert math.isnan(ratios["inferq-x1 / naive"][0])


def test_confirmed_advances_over_multiple_and_single_acks_in_any_order() -> None:
    confirmed = Confirmed()
    assert confirmed.add(3, multiple=True) == 3
    assert confirmed.add(5, multiple=False) == 3  # 4 is still unconfirmed
    assert confirmed.add(4, multiple=False) == 5
    assert confirmed.add(9, multiple=True) == 9
    assert confirmed.add(7, multiple=False) == 9  # an old tag changes nothing
    assert confirmed.add(10, multiple=False) == 10

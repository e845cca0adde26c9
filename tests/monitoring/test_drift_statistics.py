"""Drift statistics and reference binning: pure functions, checked against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from inferq.monitoring.reference import (
    MISSING,
    OTHER,
    Binner,
    bin_counts,
    categorical_column,
    describe_outputs,
    numeric_column,
)
from inferq.monitoring.statistics import chi_square_p_value, js_distance, measure, psi, status_of


def test_psi_of_identical_shares_is_zero_and_grows_with_the_shift() -> None:
    reference = [0.25, 0.25, 0.25, 0.25]
    assert psi(reference, [250, 250, 250, 250]) == pytest.approx(0.0)
    small, large = psi(reference, [300, 250, 250, 200]), psi(reference, [700, 100, 100, 100])
    assert 0 < small < large


def test_psi_matches_the_formula_with_epsilon_for_an_empty_bin() -> None:
    reference, counts = [0.5, 0.5, 0.0], [40, 50, 10]
    live = [0.4, 0.5, 0.1]
    expected = sum((lv - max(r, 1e-4)) * math.log(lv / max(r, 1e-4)) for r, lv in zip(reference, live, strict=True))
    assert psi(reference, counts) == pytest.approx(expected)


def test_jensen_shannon_distance_is_zero_for_equal_and_one_for_disjoint_shares() -> None:
    assert js_distance([0.5, 0.5], [10, 10]) == pytest.approx(0.0)
    assert js_distance([1.0, 0.0], [0, 7]) == pytest.approx(1.0)
    # (0.5, 0.5) against (1, 0): the middle is (0.75, 0.25); base-2 KL divergences of each to it, halved.
    divergence = 0.5 * (0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25)) + 0.5 * math.log2(1 / 0.75)
    assert js_distance([0.5, 0.5], [4, 0]) == pytest.approx(math.sqrt(divergence))


def test_chi_square_p_value_matches_known_values() -> None:
    # Pearson statistic 4.0 with 1 degree of freedom: p = 0.0455 (tables); 2.0 with 2 dof: p = exp(-1).
    assert chi_square_p_value([0.5, 0.5], [60, 40]) == pytest.approx(0.04550026, rel=1e-6)
    assert chi_square_p_value([1 / 3] * 3, [110, 90, 100]) == pytest.approx(math.exp(-1), rel=1e-9)
    assert chi_square_p_value([0.25] * 4, [250, 250, 250, 250]) == pytest.approx(1.0)


def test_status_follows_the_row_floor_and_psi_thresholds() -> None:
    assert status_of(999, 5.0) == "insufficient"
    assert status_of(1000, 0.25) == "drift"
    assert status_of(1000, 0.1) == "warn"
    assert status_of(1000, 0.0999) == "ok"
    assert measure([0.5, 0.5], [0, 0]).status == "insufficient"


def test_numeric_bins_are_deciles_with_open_ends_and_a_nan_bin() -> None:
    values = np.arange(1000, dtype=np.float64)
    column = numeric_column(0, "x", "X", 0, values)
    assert len(column.edges) == 9 and column.bins == 11
    assert column.proportions[:10] == pytest.approx([0.1] * 10) and column.proportions[10] == 0.0
    live = bin_counts(column, np.array([-1e9, 1e9, np.nan, 500.0]))
    assert live.tolist() == [1, 0, 0, 0, 0, 1, 0, 0, 0, 1, 1]
    assert column.labels()[0].startswith("[-inf") and column.labels()[-1] == "NaN"


def test_a_constant_feature_still_gets_bins() -> None:
    column = numeric_column(0, "c", "X", 0, np.full(50, 3.0))
    assert column.edges == [3.0] and bin_counts(column, np.array([2.0, 3.0, 4.0])).tolist() == [1, 2, 0]


def test_categorical_bins_keep_the_top_values_then_other_and_missing() -> None:
    values = np.array(["a"] * 5 + ["b"] * 3 + [""] * 2, dtype=object)
    column = categorical_column(0, "s", "S", None, values)
    assert column.labels() == ["a", "b", OTHER, MISSING]
    assert column.proportions == pytest.approx([0.5, 0.3, 0.0, 0.2])
    assert bin_counts(column, np.array(["a", "z", None], dtype=object)).tolist() == [1, 0, 1, 1]


def test_outputs_are_class_shares_for_labels_and_deciles_per_score_column() -> None:
    label = np.array([0, 1, 1, 2] * 25, dtype=np.int64)
    scores = np.random.default_rng(0).random((100, 3)).astype(np.float32)
    columns = describe_outputs({"label": label, "probabilities": scores})
    assert [c.name for c in columns] == ["label", "probabilities[0]", "probabilities[1]", "probabilities[2]"]
    assert columns[0].kind == "categorical" and columns[0].categories == ["0", "1", "2"]
    assert columns[0].proportions == pytest.approx([0.25, 0.5, 0.25, 0.0, 0.0])
    # live labels arrive as floats or ints: both land in the same bin
    assert bin_counts(columns[0], np.array([1.0, 2.0, 7.0])).tolist() == [0, 1, 1, 1, 0]


def test_the_batch_binner_gives_the_same_bins_as_one_column_at_a_time() -> None:
    rng = np.random.default_rng(3)
    train = rng.standard_normal((500, 5))
    train[:, 4] = np.round(train[:, 4])  # few distinct values: merged edges
    columns = describe_outputs({"label": rng.integers(0, 3, 500)}) + [
        numeric_column(i + 1, f"x{i}", "X", i, train[:, i]) for i in range(5)
    ]
    live = rng.standard_normal((64, 5)) * 2
    live[0, 1], live[1, 4] = np.nan, 1e9
    labels = np.array([0, 1, 2, 7] * 16, dtype=np.int64)
    arrays = {"X": live.astype(np.float32), "label": labels}

    binned = Binner(columns).split(Binner(columns).counts(arrays))

    for column in columns:
        values = labels if column.tensor == "label" else live.astype(np.float32)[:, column.column]
        assert binned[column.index] == bin_counts(column, values).tolist(), column.name


def test_a_text_column_keeps_its_twenty_most_frequent_values_ties_broken_by_the_text() -> None:
    # Given 25 values: "v00" to "v17" seen 20 times down to 12, then "a", "b", "m", "y", "z" each twice,
    # and some missing values: only two of the five tied at the boundary fit in the twenty bins
    frequent = [f"v{i:02d}" for i in range(18) for _ in range(20 - i // 2)]
    tied = ["z", "y", "m", "b", "a"] * 2
    values = [*frequent, *tied, "", None, float("nan")]
    shuffled = np.random.default_rng(1).permutation(np.array(values, dtype=object))

    # When the column is binned from the rows in two different orders
    column = categorical_column(0, "city", "city", 0, np.array(values, dtype=object))
    again = categorical_column(0, "city", "city", 0, shuffled)

    # Then the bins are the same: the 18 frequent values and the two smallest tied texts, OTHER, MISSING
    assert column == again
    assert column.categories == sorted([f"v{i:02d}" for i in range(18)] + ["a", "b"])
    assert column.labels()[-2:] == [OTHER, MISSING] and column.bins == 22
    shares = dict(zip(column.labels(), column.proportions, strict=True))
    assert shares[OTHER] == pytest.approx(6 / len(values)) and shares[MISSING] == pytest.approx(3 / len(values))
    # and live values land by their text: an unseen one in OTHER, empty or None in MISSING
    live = np.array(["a", "m", "tokyo", "", None, "v00", b"v00"], dtype=object)
    counts = dict(zip(column.labels(), bin_counts(column, live).tolist(), strict=True))
    assert (counts["a"], counts["v00"], counts[OTHER], counts[MISSING]) == (1, 2, 2, 2)


def test_the_batch_binner_counts_text_columns_as_one_column_at_a_time_does() -> None:
    # A text column whose reference values all look like numbers must still take any text live
    codes = categorical_column(0, "code", "code", 0, np.array(["1", "2", "2", "3"], dtype=object))
    city = categorical_column(1, "city", "city", 0, np.array(["rome", "oslo", "rome"], dtype=object))
    age = numeric_column(2, "age", "age", 0, np.arange(100, dtype=np.float64))
    columns = [codes, city, age]
    live_codes = np.array([["2"], ["x"], [""], ["3"]], dtype=object)
    live_city = np.array([["rome"], ["lima"], ["oslo"], ["rome"]], dtype=object)
    live_age = np.array([[5.0], [50.0], [500.0], [np.nan]], dtype=np.float32)

    binner = Binner(columns)
    binned = binner.split(binner.counts({"code": live_codes, "city": live_city, "age": live_age}))

    assert binned[0] == bin_counts(codes, live_codes[:, 0]).tolist() == [0, 1, 1, 1, 1]
    assert binned[1] == bin_counts(city, live_city[:, 0]).tolist() == [1, 2, 1, 0]
    assert binned[2] == bin_counts(age, live_age[:, 0]).tolist()

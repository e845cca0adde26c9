"""Drift statistics of live bin counts against a reference's proportions: pure functions, no I/O.

PSI and the Jensen-Shannon distance compare shares; the chi-square test asks whether counts this large
could come from the reference proportions. The chi-square survival function is scipy's (scipy is
already installed with scikit-learn; a hand-written regularized gamma function would be code to own).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import chi2

EPSILON = 1e-4
"""Share given to an empty bin in PSI, so an empty bin counts as a large but finite difference."""
PSI_DRIFT = 0.25
PSI_WARN = 0.1
DEFAULT_MIN_ROWS = 1000


@dataclass(frozen=True, slots=True)
class Drift:
    """One feature's or output's live row count, statistics and verdict."""

    n: int
    psi: float | None
    js: float | None
    p_value: float | None
    status: str


def _shares(values: Sequence[float]) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    total = array.sum()
    return array / total if total > 0 else array


def psi(reference: Sequence[float], counts: Sequence[int]) -> float:
    """Population stability index: sum over bins of (live - ref) * ln(live / ref), empty shares as ε."""
    ref = np.maximum(_shares(reference), EPSILON)
    live = np.maximum(_shares(counts), EPSILON)
    return float(np.sum((live - ref) * np.log(live / ref)))


def js_distance(reference: Sequence[float], counts: Sequence[int]) -> float:
    """Jensen-Shannon distance (base 2, between 0 and 1) of the reference and live shares."""
    ref, live = _shares(reference), _shares(counts)
    middle = (ref + live) / 2

    def kl(p: np.ndarray, q: np.ndarray) -> float:
        mask = p > 0
        return float(np.sum(p[mask] * np.log2(p[mask] / q[mask])))

    divergence = (kl(ref, middle) + kl(live, middle)) / 2
    return math.sqrt(max(divergence, 0.0))


def chi_square_p_value(reference: Sequence[float], counts: Sequence[int]) -> float:
    """p-value of the live counts under the reference proportions (Pearson's test). Bins the reference
    never saw (share 0) take ε, so live rows there count as evidence of drift rather than a division by zero."""
    observed = np.asarray(counts, dtype=np.float64)
    n = observed.sum()
    ref = np.maximum(_shares(reference), EPSILON)
    ref = ref / ref.sum()
    expected = ref * n
    statistic = float(np.sum((observed - expected) ** 2 / expected))
    dof = len(observed) - 1
    if dof < 1:
        return 1.0
    return float(chi2.sf(statistic, dof))


def status_of(n: int, psi_value: float, min_rows: int = DEFAULT_MIN_ROWS) -> str:
    """``insufficient`` below ``min_rows``, else ``drift`` at PSI ≥ 0.25, ``warn`` at PSI ≥ 0.1, ``ok``."""
    if n < min_rows:
        return "insufficient"
    if psi_value >= PSI_DRIFT:
        return "drift"
    if psi_value >= PSI_WARN:
        return "warn"
    return "ok"


def measure(reference: Sequence[float], counts: Sequence[int], min_rows: int = DEFAULT_MIN_ROWS) -> Drift:
    """Every statistic of one feature or output."""
    n = int(sum(counts))
    if n == 0:
        return Drift(0, None, None, None, "insufficient")
    value = psi(reference, counts)
    return Drift(
        n, value, js_distance(reference, counts), chi_square_p_value(reference, counts), status_of(n, value, min_rows)
    )

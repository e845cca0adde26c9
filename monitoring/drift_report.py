"""``inferq monitor drift``: a version's live counts (summed over windows and workers) against its reference."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inferq.model_store.base import ModelStore, resolve_version
from inferq.monitoring.reference import BinnedColumn
from inferq.monitoring.statistics import DEFAULT_MIN_ROWS, measure
from inferq.monitoring.store import MonitorStore
from inferq.shared.contract.messages import VersionRef
from inferq.shared.errors import InferqError

_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class NoReference(InferqError):
    """The model version was published without ``--reference``: there is nothing to measure drift against."""


@dataclass(frozen=True, slots=True)
class ColumnDrift:
    """One feature's or output's statistics, with both distributions for the plot."""

    index: int
    name: str
    n: int
    psi: float | None
    js: float | None
    p_value: float | None
    status: str
    labels: list[str]
    reference: list[float]
    live: list[float]

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` shape of one feature or output."""
        return {
            "index": self.index,
            "name": self.name,
            "n": self.n,
            "psi": self.psi,
            "js": self.js,
            "p_value": self.p_value,
            "status": self.status,
        }


@dataclass(frozen=True, slots=True)
class DriftReport:
    """Drift of every feature and output of one model version."""

    model: str
    version: int
    rows: int
    windows: int
    features: list[ColumnDrift]
    outputs: list[ColumnDrift]

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` document."""
        return {
            "model": self.model,
            "version": self.version,
            "rows": self.rows,
            "features": [f.to_dict() for f in self.features],
            "outputs": [o.to_dict() for o in self.outputs],
        }


def parse_since(value: str) -> float:
    """Seconds in ``30s``, ``15m``, ``1h`` or ``7d``; raises ``ValueError``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", value)
    if match is None:
        raise ValueError(f"{value!r} is not a duration such as 30s, 15m, 1h or 7d")
    return float(match.group(1)) * _UNITS_S[match.group(2)]


def _column(column: BinnedColumn, counts: list[int] | None, min_rows: int) -> ColumnDrift:
    live = list(counts or [])
    live += [0] * (column.bins - len(live))
    stats = measure(column.proportions, live, min_rows)
    total = sum(live)
    return ColumnDrift(
        column.index,
        column.name,
        stats.n,
        stats.psi,
        stats.js,
        stats.p_value,
        stats.status,
        column.labels(),
        column.proportions,
        [c / total if total else 0.0 for c in live],
    )


def drift_report(
    models: ModelStore,
    monitor: MonitorStore,
    model: str,
    version: VersionRef,
    *,
    since_s: float | None = None,
    min_rows: int = DEFAULT_MIN_ROWS,
) -> DriftReport:
    """Drift of ``model`` at ``version`` over the windows of the last ``since_s`` seconds (all when None)."""
    number = resolve_version(models, model, version)
    reference = models.read_manifest(model, number).reference
    if reference is None:
        raise NoReference(
            f"model {model!r} version {number} has no reference: publish it with --reference DATA to measure drift"
        )
    totals = monitor.totals(model, number, None if since_s is None else time.time() - since_s)
    return DriftReport(
        model,
        number,
        totals.rows,
        totals.windows,
        [_column(c, totals.inputs.get(c.index), min_rows) for c in reference.features],
        [_column(c, totals.outputs.get(c.index), min_rows) for c in reference.outputs],
    )


def _number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_drift(report: DriftReport) -> list[str]:
    """The report as a table: one line per feature, then per output."""
    lines = [f"{report.model} version {report.version}: {report.rows} rows in {report.windows} windows"]
    lines.append(f"{'':<8} {'#':>3} {'NAME':<24} {'N':>9} {'PSI':>8} {'JS':>7} {'P-VALUE':>9}  STATUS")
    for kind, columns in (("feature", report.features), ("output", report.outputs)):
        for c in columns:
            p_value = "-" if c.p_value is None else f"{c.p_value:.2e}"
            lines.append(
                f"{kind:<8} {c.index:>3} {c.name[:24]:<24} {c.n:>9} {_number(c.psi):>8} {_number(c.js):>7} "
                f"{p_value:>9}  {c.status}"
            )
    return lines


_ORDER = {"drift": 0, "warn": 1, "ok": 2, "insufficient": 3}


def plot_drift(report: DriftReport, path: Path) -> None:
    """Per feature and output, reference and live shares side by side; drifted ones first."""
    import matplotlib  # noqa: PLC0415  (only --plot needs it)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    columns = sorted([*report.features, *report.outputs], key=lambda c: (_ORDER.get(c.status, 9), -(c.psi or 0.0)))
    across = min(4, max(len(columns), 1))
    down = (len(columns) + across - 1) // across
    figure, axes = plt.subplots(down, across, figsize=(4.2 * across, 3.0 * down), squeeze=False)
    for axis in axes.flat[len(columns) :]:
        axis.set_visible(False)
    for axis, column in zip(axes.flat, columns, strict=False):
        positions = list(range(len(column.labels)))
        axis.bar([p - 0.2 for p in positions], column.reference, width=0.4, label="reference", color="#7f8c8d")
        colour = {"drift": "#c0392b", "warn": "#e67e22"}.get(column.status, "#2980b9")
        axis.bar([p + 0.2 for p in positions], column.live, width=0.4, label="live", color=colour)
        psi = "-" if column.psi is None else f"{column.psi:.3f}"
        axis.set_title(f"{column.name}: {column.status} (PSI {psi})", fontsize=9)
        axis.set_xticks(positions)
        axis.set_xticklabels(column.labels, rotation=60, fontsize=6, ha="right")
        axis.tick_params(axis="y", labelsize=7)
    axes.flat[0].legend(fontsize=7)
    figure.suptitle(f"{report.model} version {report.version}: {report.rows} live rows", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)

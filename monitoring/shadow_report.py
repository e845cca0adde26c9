"""``inferq monitor shadow``: how the shadow version's answers compare with the answering version's."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from inferq.model_store.base import ModelStore, resolve_version
from inferq.monitoring.shadow_setting import read_shadow
from inferq.monitoring.store import MonitorStore, ShadowPair
from inferq.shared.errors import InferqError

LABEL_DATATYPES = frozenset({"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64", "BYTES", "BOOL"})
Z_95 = 1.959963984540054


class NoShadowPairs(InferqError):
    """No shadow pair of that model is stored (shadow traffic never ran, or no job was sampled yet)."""


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95 % by default)."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True, slots=True)
class OutputDifference:
    """How far apart one numeric output of the two versions is, per value."""

    name: str
    mean_abs_diff: float
    p95_abs_diff: float


@dataclass(frozen=True, slots=True)
class ShadowReport:
    """Pairs of one (version, shadow version) of a model, compared."""

    model: str
    version: int
    shadow_version: int
    pairs: int
    label: str | None
    agreement: float | None
    agreement_ci: tuple[float, float] | None
    outputs: list[OutputDifference]
    inference_ms: tuple[float | None, float | None]
    errors: tuple[int, int]
    """Pairs whose answering version failed the job, and pairs whose shadow version failed it."""
    skipped: int

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` document."""
        return {
            "model": self.model,
            "version": self.version,
            "shadow_version": self.shadow_version,
            "pairs": self.pairs,
            "agreement": self.agreement,
            "agreement_ci": list(self.agreement_ci) if self.agreement_ci is not None else None,
            "outputs": [
                {"name": o.name, "mean_abs_diff": o.mean_abs_diff, "p95_abs_diff": o.p95_abs_diff} for o in self.outputs
            ],
            "mean_inference_ms": {"version": self.inference_ms[0], "shadow_version": self.inference_ms[1]},
            "errors": {"version": self.errors[0], "shadow_version": self.errors[1]},
            "skipped": self.skipped,
        }

    def promote_command(self) -> str:
        """What moves the ``champion`` alias to the shadow version."""
        return f"inferq models alias {self.model} champion {self.shadow_version}"


def _values(tensor: dict[str, Any]) -> list[Any]:
    return list(tensor["data"])


def _compare(pairs: list[ShadowPair]) -> tuple[str | None, int, int, list[OutputDifference]]:
    """Label agreement (rows that agree, rows) and the numeric outputs' absolute differences."""
    ok = [p for p in pairs if p.error is None and p.shadow_outputs is not None]
    if not ok:
        return None, 0, 0, []
    first = ok[0].outputs
    label = next((t["name"] for t in first if t["datatype"] in LABEL_DATATYPES), None)
    agree = rows = 0
    differences: dict[str, list[float]] = {}
    for pair in ok:
        shadow = {t["name"]: t for t in pair.shadow_outputs or []}
        for tensor in pair.outputs:
            other = shadow.get(tensor["name"])
            if other is None or len(other["data"]) != len(tensor["data"]):
                continue
            if tensor["name"] == label:
                agree += sum(1 for a, b in zip(tensor["data"], other["data"], strict=True) if a == b)
                rows += len(tensor["data"])
            elif tensor["datatype"] not in LABEL_DATATYPES:
                a = np.asarray(_values(tensor), dtype=np.float64)
                b = np.asarray(_values(other), dtype=np.float64)
                differences.setdefault(tensor["name"], []).extend(np.abs(a - b).tolist())
    outputs = [
        OutputDifference(name, float(np.mean(values)), float(np.percentile(values, 95)))
        for name, values in differences.items()
        if values
    ]
    return label, agree, rows, outputs


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 3) if values else None


def shadow_report(models: ModelStore, monitor: MonitorStore, model: str) -> ShadowReport:
    """Compare the stored pairs of ``model``: those of the current shadow target, or else the most common."""
    resolve_version(models, model, "latest")  # the model must exist
    every = monitor.pairs(model)
    if not every:
        raise NoShadowPairs(
            f"no shadow pairs of model {model!r}: turn it on with inferq models shadow {model} --target …"
        )
    setting = read_shadow(models, model)
    target = resolve_version(models, model, setting.target) if setting is not None else None
    kinds = Counter((p.version, p.shadow_version) for p in every if p.shadow_version >= 0)
    if target is not None and any(s == target for _, s in kinds):
        version, shadow_version = max((k for k in kinds if k[1] == target), key=lambda k: kinds[k])
    elif kinds:
        version, shadow_version = kinds.most_common(1)[0][0]
    else:
        version, shadow_version = every[0].version, -1
    pairs = [p for p in every if p.version == version and p.shadow_version in (shadow_version, -1)]
    label, agree, rows, outputs = _compare(pairs)
    skipped = monitor.totals(model, version).shadow_skipped
    return ShadowReport(
        model=model,
        version=version,
        shadow_version=shadow_version,
        pairs=len(pairs),
        label=label,
        agreement=agree / rows if label is not None and rows else None,
        agreement_ci=wilson_interval(agree, rows) if label is not None and rows else None,
        outputs=outputs,
        inference_ms=(
            _mean([p.inference_ms for p in pairs if p.inference_ms is not None]),
            _mean([p.shadow_inference_ms for p in pairs if p.shadow_inference_ms is not None]),
        ),
        errors=(sum(1 for p in pairs if p.error is not None), sum(1 for p in pairs if p.shadow_error is not None)),
        skipped=skipped,
    )


def render_shadow(report: ShadowReport) -> list[str]:
    """The report as lines of text."""
    lines = [
        f"{report.model}: version {report.version} answered, version {report.shadow_version} shadowed, "
        f"{report.pairs} pairs ({report.skipped} sampled jobs skipped under backlog)"
    ]
    if report.agreement is not None and report.agreement_ci is not None:
        low, high = report.agreement_ci
        lines.append(f"label {report.label!r} agreement {report.agreement:.4f} (95% CI {low:.4f}-{high:.4f})")
    else:
        lines.append("no label output to compare")
    for output in report.outputs:
        lines.append(f"output {output.name!r}: mean |diff| {output.mean_abs_diff:.6f}, p95 {output.p95_abs_diff:.6f}")
    mine, theirs = report.inference_ms
    lines.append(f"mean inference ms (batch): version {mine} shadow {theirs}")
    lines.append(f"errors (of the {report.pairs} pairs): version {report.errors[0]}, shadow {report.errors[1]}")
    lines.append(f"promote: {report.promote_command()}")
    return lines

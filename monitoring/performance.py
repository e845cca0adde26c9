"""Live performance: predictions joined with their labels, per model version.

A label names a prediction by the id its user knows. It joins, in this order of trust, the job of that id
(a job of one row), row ``i`` of job ``J`` when the id is ``J/i`` (a job of many rows sent by ``submit``
or the producer), and every job row a backfill recorded under that row id (``inferq backfill
--id-column``). A label joins every prediction of its id (a row backfilled on two versions is labeled on
both); a label that joins no succeeded result is ``unmatched``. Both sides are stored, so the order in
which they arrive does not matter: the join runs when the report does.

Which output is the prediction comes from the version's manifest (:func:`prediction_rule`): the first
integer, boolean or string output whose name contains ``label``, ``class`` or ``predict``, else the first
output. An integer, boolean or string prediction makes a classifier (accuracy, per-class precision and
recall, and log loss from the first float output when the labels are the class indexes ``0..C-1`` of its
columns); a float prediction a regressor (MAE, RMSE).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from inferq.model_store.base import ModelStore, resolve_version
from inferq.model_store.manifest import Manifest
from inferq.shared.contract.messages import LATEST, Result, Status, VersionRef
from inferq.shared.errors import UnknownModel, UnknownVersion
from inferq.shared.results.labels import LabelStore, LabelValue

LABEL_DATATYPES = frozenset({"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64", "BYTES", "BOOL"})
FLOAT_DATATYPES = frozenset({"FP16", "FP32", "FP64"})
LABEL_WORDS = ("label", "class", "predict")
ROW_OF_JOB = re.compile(r"(.+)/(\d+)")
"""``<job id>/<row index>``: one row of a job of many rows."""
CLASSIFIER = "classifier"
REGRESSOR = "regressor"
_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}

ClassKey = int | str
"""A class as compared: ``1``, ``1.0``, ``"1"`` and ``True`` are all class ``1``."""


@dataclass(frozen=True, slots=True)
class PredictionRule:
    """Which output of a version is its prediction, whether it is a class, and where the probabilities are."""

    output: str
    classifier: bool
    probabilities: str | None = None


def prediction_rule(manifest: Manifest) -> PredictionRule:
    """The prediction of ``manifest``'s version (see the module's docstring)."""
    outputs = manifest.outputs
    chosen = next(
        (o for o in outputs if o.datatype in LABEL_DATATYPES and any(w in o.name.lower() for w in LABEL_WORDS)),
        outputs[0],
    )
    classifier = chosen.datatype in LABEL_DATATYPES
    probabilities = next((o.name for o in outputs if o.datatype in FLOAT_DATATYPES), None) if classifier else None
    return PredictionRule(chosen.name, classifier, probabilities)


@dataclass(frozen=True, slots=True)
class Prediction:
    """One row's prediction (and class probabilities, when the version gives them)."""

    value: Any
    probabilities: list[float] | None


def rows_of(result: Result, rule: PredictionRule) -> int:
    """How many predictions ``result`` holds: the rows of its prediction output (0 when it has none)."""
    tensor = next((t for t in result.outputs or [] if t.name == rule.output), None)
    return 0 if tensor is None else (tensor.shape[0] if tensor.shape else 1)


def prediction_at(result: Result, rule: PredictionRule, index: int) -> Prediction | None:
    """Row ``index``'s prediction in ``result``, or None when there is no such row."""
    tensors = {t.name: t for t in result.outputs or []}
    tensor = tensors.get(rule.output)
    if tensor is None or not 0 <= index < rows_of(result, rule):
        return None
    width = math.prod(tensor.shape[1:])
    probabilities = None
    scores = tensors.get(rule.probabilities) if rule.probabilities is not None else None
    if scores is not None and scores.shape and scores.shape[0] == tensor.shape[0]:
        columns = math.prod(scores.shape[1:])
        probabilities = [float(p) for p in scores.data[index * columns : (index + 1) * columns]]
    return Prediction(tensor.data[index * width], probabilities)


@dataclass(frozen=True, slots=True)
class Labeled:
    """A prediction with its label."""

    label_id: str
    version: int
    truth: LabelValue
    prediction: Prediction
    stored_at_s: float
    requested: VersionRef | None = None
    """The version the job asked for (a number, ``latest`` or an alias)."""


@dataclass(slots=True)
class Join:
    """Labels joined with the stored predictions they name."""

    labeled: list[Labeled] = field(default_factory=list)
    unmatched: int = 0


class Rules:
    """Each version's prediction rule, read from its manifest once (None for a version no longer published)."""

    def __init__(self, models: ModelStore, model: str) -> None:
        self._models, self._model = models, model
        self._rules: dict[int, PredictionRule | None] = {}

    def __call__(self, version: int) -> PredictionRule | None:
        if version not in self._rules:
            try:
                self._rules[version] = prediction_rule(self._models.read_manifest(self._model, version))
            except (UnknownModel, UnknownVersion):
                self._rules[version] = None
        return self._rules[version]


def _candidates(
    labels: Iterable[str], row_ids: dict[str, list[tuple[str, int]]]
) -> dict[str, list[tuple[str, int | None]]]:
    """The job rows each label id may name: the job itself (a one-row job), ``J/i``, a backfill's rows."""
    found: dict[str, list[tuple[str, int | None]]] = {}
    for label_id in labels:
        candidates: list[tuple[str, int | None]] = [(label_id, None)]
        match = ROW_OF_JOB.fullmatch(label_id)
        if match is not None:
            candidates.append((match.group(1), int(match.group(2))))
        candidates.extend(row_ids.get(label_id, []))
        found[label_id] = candidates
    return found


def join(store: LabelStore, rules: Callable[[int], PredictionRule | None], model: str) -> Join:
    """Every label of ``model`` with every stored prediction it names."""
    labels = store.labels(model)
    candidates = _candidates(labels, store.row_ids(model, list(labels)))
    stored = store.stored_results(sorted({job for pairs in candidates.values() for job, _ in pairs}))
    joined = Join()
    for label_id, pairs in candidates.items():
        seen: set[tuple[str, int, int]] = set()
        for job_id, index in pairs:
            found = stored.get(job_id)
            if found is None:
                continue
            result = found.result
            if result.status is not Status.SUCCEEDED or result.model != model or result.version is None:
                continue
            rule = rules(result.version)
            if rule is None:
                continue
            if index is None and rows_of(result, rule) != 1:
                continue  # a job of many rows: its rows are J/0, J/1, ...
            row = 0 if index is None else index
            prediction = prediction_at(result, rule, row)
            if prediction is None or (job_id, row, result.version) in seen:
                continue
            seen.add((job_id, row, result.version))
            truth = labels[label_id]
            requested = result.requested_version
            joined.labeled.append(Labeled(label_id, result.version, truth, prediction, found.stored_at_s, requested))
        joined.unmatched += not seen
    return joined


# -- the numbers ------------------------------------------------------------------------------------


def class_key(value: Any) -> ClassKey:
    """A class as compared (see :data:`ClassKey`)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int):
        return value
    text = str(value)
    return int(text) if re.fullmatch(r"-?\d+", text.strip()) else text


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


@dataclass(frozen=True, slots=True)
class ClassScores:
    """Precision (of the rows predicted as the class; None when none was) and recall (of its true rows)."""

    precision: float | None
    recall: float | None
    support: int


@dataclass(slots=True)
class VersionPerformance:
    """One version's predictions and how right the labeled ones were."""

    version: int
    predictions: int = 0
    labeled: int = 0
    kind: str | None = None
    accuracy: float | None = None
    classes: dict[str, ClassScores] = field(default_factory=dict)
    log_loss: float | None = None
    mae: float | None = None
    rmse: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """This version in the ``--json`` document."""
        document: dict[str, Any] = {
            "version": self.version,
            "predictions": self.predictions,
            "labeled": self.labeled,
            "kind": self.kind,
        }
        if self.kind == CLASSIFIER:
            document["accuracy"] = self.accuracy
            document["classes"] = {
                name: {"precision": s.precision, "recall": s.recall, "support": s.support}
                for name, s in self.classes.items()
            }
            document["log_loss"] = self.log_loss
        elif self.kind == REGRESSOR:
            document["mae"] = self.mae
            document["rmse"] = self.rmse
        return document


def score_classes(version: VersionPerformance, rows: list[Labeled]) -> None:
    """Accuracy, per-class precision and recall, and log loss of a classifier's labeled rows."""
    truth = [class_key(r.truth) for r in rows]
    predicted = [class_key(r.prediction.value) for r in rows]
    version.accuracy = sum(t == p for t, p in zip(truth, predicted, strict=True)) / len(rows)
    true_counts, predicted_counts = Counter(truth), Counter(predicted)
    hits = Counter(t for t, p in zip(truth, predicted, strict=True) if t == p)
    for cls in sorted(set(truth) | set(predicted), key=lambda c: (isinstance(c, str), c)):
        version.classes[str(cls)] = ClassScores(
            hits[cls] / predicted_counts[cls] if predicted_counts[cls] else None,
            hits[cls] / true_counts[cls] if true_counts[cls] else None,
            true_counts[cls],
        )
    version.log_loss = _log_loss(truth, [r.prediction.probabilities for r in rows])


def _log_loss(truth: list[ClassKey], probabilities: list[list[float] | None]) -> float | None:
    """Mean negative log probability of the true class, each row's probabilities normalised and clipped to
    ``[eps, 1 - eps]`` (as scikit-learn does); None unless every label is a column index."""
    eps = 2.220446049250313e-16  # float64's machine epsilon
    total = 0.0
    for cls, row in zip(truth, probabilities, strict=True):
        if row is None or not isinstance(cls, int) or not 0 <= cls < len(row) or sum(row) <= 0:
            return None
        p = min(max(row[cls] / sum(row), eps), 1 - eps)
        total -= math.log(p)
    return total / len(truth)


def score_numbers(version: VersionPerformance, rows: list[Labeled]) -> None:
    """MAE and RMSE of a regressor's labeled rows whose label and prediction are numbers."""
    pairs = [(_number(r.truth), _number(r.prediction.value)) for r in rows]
    errors = [p - t for t, p in pairs if t is not None and p is not None]
    if errors:
        version.mae = sum(abs(e) for e in errors) / len(errors)
        version.rmse = math.sqrt(sum(e * e for e in errors) / len(errors))


@dataclass(frozen=True, slots=True)
class PerformanceReport:
    """``inferq monitor performance``: per version, and the labels that match no prediction."""

    model: str
    versions: list[VersionPerformance]
    unmatched: int
    labels: int

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` document."""
        return {
            "model": self.model,
            "versions": [v.to_dict() for v in self.versions],
            "labels": self.labels,
            "unmatched": self.unmatched,
        }


def scored(version: int, rule: PredictionRule | None, rows: list[Labeled]) -> VersionPerformance:
    """The labeled numbers of one version (its predictions are counted apart)."""
    performance = VersionPerformance(version, labeled=len(rows))
    if rule is not None:
        performance.kind = CLASSIFIER if rule.classifier else REGRESSOR
        if rows:
            (score_classes if rule.classifier else score_numbers)(performance, rows)
    return performance


def live_performance(models: ModelStore, store: LabelStore, model: str) -> dict[int, VersionPerformance]:
    """The labeled numbers of every version of ``model`` that has a labeled prediction (no scan of the
    results: only the labeled ones are read). What the Prometheus gauges and guards read."""
    rules = Rules(models, model)
    by_version: dict[int, list[Labeled]] = {}
    for row in join(store, rules, model).labeled:
        by_version.setdefault(row.version, []).append(row)
    return {v: scored(v, rules(v), rows) for v, rows in sorted(by_version.items())}


def guard_accuracy(
    models: ModelStore, store: LabelStore, model: str, alias: str, version: int, since_s: float
) -> tuple[int, int]:
    """What a guard on accuracy judges: the labeled predictions of ``version`` from jobs that asked for
    ``alias`` and were stored at or after ``since_s`` (Unix seconds: when the guarded move was made), and
    how many of them were right.

    Only predictions stored since the move count: those of an earlier guard of the same alias and version
    (a move rolled back and made again a moment later) are not this guard's. ``since_s`` is rounded down to
    the store's time resolution (S3 keeps whole seconds), so there a move made again within the second of
    an earlier guard's predictions counts them too.
    """
    resolution_s = store.time_resolution_s
    if resolution_s > 0:
        since_s = math.floor(since_s / resolution_s) * resolution_s
    rows = [
        row
        for row in join(store, Rules(models, model), model).labeled
        if row.version == version and row.requested == alias and row.stored_at_s >= since_s
    ]
    return len(rows), sum(class_key(row.truth) == class_key(row.prediction.value) for row in rows)


def performance_report(
    models: ModelStore, store: LabelStore, model: str, version: int | None = None, since_s: float | None = None
) -> PerformanceReport:
    """Predictions (results of ``model`` stored at or after ``since_s``, Unix seconds), labeled and the
    rates per version (only ``version`` when given); ``unmatched`` counts the labels of any version."""
    resolve_version(models, model, LATEST)  # the model must exist
    rules = Rules(models, model)
    joined = join(store, rules, model)
    predictions: Counter[int] = Counter()
    for stored in store.scan_results(model, since_s):
        result = stored.result
        if result.status is Status.SUCCEEDED and result.version is not None and (version in (None, result.version)):
            rule = rules(result.version)
            predictions[result.version] += rows_of(result, rule) if rule is not None else 0
    by_version: dict[int, list[Labeled]] = {}
    for row in joined.labeled:
        if version in (None, row.version) and row.stored_at_s >= (since_s or 0):
            by_version.setdefault(row.version, []).append(row)
    versions = []
    for number in sorted(set(predictions) | set(by_version)):
        performance = scored(number, rules(number), by_version.get(number, []))
        performance.predictions = predictions[number]
        versions.append(performance)
    return PerformanceReport(model, versions, joined.unmatched, len(store.labels(model)))


def parse_duration(value: str) -> float:
    """Seconds in ``30s``, ``15m``, ``1h`` or ``7d``; raises ``ValueError`` (as ``monitor drift --since``)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", value)
    if match is None:
        raise ValueError(f"{value!r} is not a duration such as 30s, 15m, 1h or 7d")
    return float(match.group(1)) * _UNITS_S[match.group(2)]


def _rate(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_performance(report: PerformanceReport) -> list[str]:
    """The report as lines of text."""
    lines = []
    for v in report.versions:
        share = f" ({v.labeled / v.predictions:.1%})" if v.predictions else ""
        lines.append(f"{report.model} version {v.version}: {v.predictions} predictions, {v.labeled} labeled{share}")
        if v.kind == CLASSIFIER and v.labeled:
            lines.append(f"  accuracy {_rate(v.accuracy)}  log loss {_rate(v.log_loss)}")
            lines.append(f"  {'CLASS':<16} {'PRECISION':>9} {'RECALL':>9} {'SUPPORT':>8}")
            for name, s in v.classes.items():
                lines.append(f"  {name:<16} {_rate(s.precision):>9} {_rate(s.recall):>9} {s.support:>8}")
        elif v.kind == REGRESSOR and v.labeled:
            lines.append(f"  MAE {_rate(v.mae, 6)}  RMSE {_rate(v.rmse, 6)}")
    if not report.versions:
        lines.append(f"{report.model}: no predictions stored")
    lines.append(f"labels: {report.labels}, matching no prediction (unmatched): {report.unmatched}")
    return lines

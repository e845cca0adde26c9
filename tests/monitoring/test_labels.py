"""Labels and live performance end to end: predictions through the broker and a worker, labels through
``inferq labels submit`` before some predictions and after others, and ``inferq monitor performance``
equal to scikit-learn's metrics on exactly the labeled predictions, per version."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import orjson
import pytest
from sklearn.metrics import accuracy_score, log_loss
from support import S3_BUCKET, Env, Models, make_job

from inferq.shared.contract.messages import Result
from inferq.worker.live_performance import LivePerformance
from inferq.worker.metrics import WorkerMetrics

pytestmark = pytest.mark.broker

STORES = [
    "sqlite",
    pytest.param("postgresql", marks=pytest.mark.postgres),
    "file",
    pytest.param("s3", marks=pytest.mark.s3),
]


@pytest.fixture(params=STORES)
def labeled_env(request: pytest.FixtureRequest, iris_store: Env) -> Env:
    """``iris_store`` with its results (and so its labels) in each kind of result store."""
    if request.param == "sqlite":
        iris_store.result_location = f"sqlite:{iris_store.tmp / 'results.db'}"
    elif request.param == "postgresql":
        iris_store.result_location = str(request.getfixturevalue("postgres_url"))
    elif request.param == "s3":
        request.getfixturevalue("seaweedfs")
        iris_store.result_location = f"s3://{S3_BUCKET}/{iris_store.prefix}/results"
    return iris_store


def _truth(models: Models) -> np.ndarray:
    """Iris classes with every seventh flipped: no version is always right."""
    y = models.forest.predict(models.X.astype(np.float64))
    flipped = y.copy()
    flipped[::7] = (flipped[::7] + 1) % 3
    return flipped


def _write_csv(path: Path, rows: list[tuple[str, object]], header: tuple[str, str] = ("id", "label")) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _write_jsonl(path: Path, rows: list[tuple[str, object]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps({"id": i, "label": v}) + b"\n" for i, v in rows))
    return path


def _submit_labels(env: Env, path: Path) -> None:
    stored = env.inferq("labels", "submit", str(path), "--model", "iris")
    assert stored.returncode == 0, stored.stderr


def _performance(env: Env, *args: str) -> dict[str, object]:
    shown = env.inferq("monitor", "performance", "iris", "--json", *args)
    assert shown.returncode == 0, shown.stderr
    report: dict[str, object] = orjson.loads(shown.stdout)
    return report


def _expected(results: list[Result], truth: dict[str, int], rows_of: dict[str, list[str]]) -> dict[str, float]:
    """scikit-learn's accuracy and log loss over the labeled rows of ``results`` (one version)."""
    y_true, y_pred, probabilities = [], [], []
    for result in results:
        outputs = {t.name: t for t in result.outputs or []}
        for index, label_id in enumerate(rows_of[result.id]):
            if label_id in truth:
                y_true.append(truth[label_id])
                y_pred.append(outputs["label"].data[index])
                probabilities.append(outputs["probabilities"].data[index * 3 : index * 3 + 3])
    return {
        "labeled": len(y_true),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        # float32 rows may sum to 1 + 1e-7: normalised first, as the report does
        "log_loss": float(log_loss(y_true, _normalised(probabilities), labels=[0, 1, 2])),
    }


def _normalised(rows: list[list[float]]) -> np.ndarray:
    array = np.asarray(rows, dtype=np.float64)
    return array / array.sum(axis=1, keepdims=True)


def test_performance_per_version_equals_scikit_learn_whichever_arrives_first(
    labeled_env: Env, models: Models, tmp_path: Path
) -> None:
    env, truth = labeled_env, _truth(models)
    # Given 60 one-row jobs on version 1 and 60 on version 2 with ids the caller chose, and one job of
    # three rows on version 1 whose rows are labeled as <job id>/<row>
    one = [make_job(models.X[i : i + 1], version=1, id=f"v1-{i}") for i in range(60)]
    two = [make_job(models.X[i : i + 1], version=2, id=f"v2-{i}") for i in range(60, 120)]
    many = make_job(models.X[120:123], version=1, id="many")
    rows_of = {job.id: [job.id] for job in one + two} | {"many": ["many/0", "many/1", "many/2"]}
    label_of = {f"v1-{i}": int(truth[i]) for i in range(60)} | {f"v2-{i}": int(truth[i]) for i in range(60, 120)}
    label_of |= {f"many/{r}": int(truth[120 + r]) for r in range(3)}
    labeled_ids = [i for i in label_of if not i.endswith(("-5", "-17"))]  # some predictions stay unlabeled
    early, late = labeled_ids[::2], labeled_ids[1::2]
    unknown = [("nobody-1", 0), ("nobody-2", 2), ("many", 1)]  # "many" is a job of three rows: no one row

    # When half the labels (and three that match nothing) come before the predictions, as CSV
    _submit_labels(env, _write_csv(tmp_path / "early.csv", [(i, label_of[i]) for i in early] + unknown))
    env.submit([*one, *two, many])
    env.drain()
    # and the other half after them, as JSON lines
    _submit_labels(env, _write_jsonl(tmp_path / "late.jsonl", [(i, label_of[i]) for i in late]))
    report = _performance(env)

    # Then each version's numbers are scikit-learn's on exactly its labeled predictions
    stored = env.stored()
    truth_of = {i: label_of[i] for i in labeled_ids}
    versions = {v["version"]: v for v in report["versions"]}  # type: ignore[attr-defined]
    assert sorted(versions) == [1, 2]
    for number in (1, 2):
        results = [r for r in stored.values() if r.version == number]
        expected = _expected(results, truth_of, rows_of)
        got = versions[number]
        assert got["predictions"] == sum(len(rows_of[r.id]) for r in results)
        assert got["labeled"] == expected["labeled"]
        assert got["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-12)
        assert got["log_loss"] == pytest.approx(expected["log_loss"], rel=1e-6)
        assert 0 < got["accuracy"] < 1 and set(got["classes"]) == {"0", "1", "2"}
    assert versions[1]["predictions"] == 63 and versions[1]["labeled"] == 60 - 2 + 3
    assert report["unmatched"] == 3 and report["model"] == "iris"
    # and one version alone, by alias, reports only itself
    alone = _performance(env, "--version", "champion")
    assert [v["version"] for v in alone["versions"]] == [1]  # type: ignore[attr-defined]


def _onnx_labels(model: bytes, rows: np.ndarray) -> list[int]:
    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    return [int(v) for v in session.run(["label"], {"X": rows.astype(np.float32)})[0]]


def test_labels_join_backfill_rows_by_their_id_column(labeled_env: Env, models: Models, tmp_path: Path) -> None:
    env, truth = labeled_env, _truth(models)
    data = tmp_path / "rows.csv"
    with data.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["customer", "a", "b", "c", "d"])
        writer.writerows([f"c-{i}", *map(float, models.X[i])] for i in range(40))
    labels = {f"c-{i}": int(truth[i]) for i in range(0, 40, 2)}
    # Given labels by the file's own ids (in renamed columns), sent before the backfill runs
    label_file = _write_csv(tmp_path / "truth.csv", [*labels.items(), ("c-999", 1)], ("customer", "y"))
    stored = env.inferq(
        "labels", "submit", str(label_file), "--model", "iris", "--id-column", "customer", "--label-column", "y"
    )
    assert stored.returncode == 0, stored.stderr
    # When the file is backfilled on version 1 one row per job, and on version 2 ten rows per job
    for version, rows in (("1", "1"), ("2", "10")):
        sent = env.inferq(
            "backfill", str(data), "--model", "iris", "--version", version, "--id-column", "customer",
            "--batch-rows", rows,
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr
    env.drain()
    report = _performance(env)

    # Then each label joins its row's prediction on both versions, rows of ten-row jobs included
    labeled_rows = list(range(0, 40, 2))
    y_true = [labels[f"c-{i}"] for i in labeled_rows]
    versions = {v["version"]: v for v in report["versions"]}  # type: ignore[attr-defined]
    for number, onnx in ((1, models.forest_onnx), (2, models.logistic_onnx)):
        y_pred = _onnx_labels(onnx, models.X[labeled_rows])
        assert versions[number]["predictions"] == 40
        assert versions[number]["labeled"] == 20
        assert versions[number]["accuracy"] == pytest.approx(float(accuracy_score(y_true, y_pred)), abs=1e-12)
    assert report["unmatched"] == 1


def test_the_first_label_of_an_id_wins_when_two_submits_race(labeled_env: Env, tmp_path: Path) -> None:
    env = labeled_env
    ids = [f"r-{i}" for i in range(60)]
    zeros = _write_csv(tmp_path / "zeros.csv", [(i, 0) for i in ids])
    twos = _write_csv(tmp_path / "twos.csv", [(i, 2) for i in ids])
    # Given two submits of the same ids with other labels, running at the same time
    command = [sys.executable, "-m", "inferq", "labels", "submit"]
    running = [
        subprocess.Popen([*command, str(path), "--model", "iris"], env=env.environ(), text=True, stdout=subprocess.PIPE)
        for path in (zeros, twos)
    ]
    outputs = [process.communicate(timeout=120)[0] for process in running]
    assert [process.returncode for process in running] == [0, 0]
    # When the labels are read back, and a third submit comes later
    later = env.inferq("labels", "submit", str(zeros), "--model", "iris")
    report = _performance(env)

    # Then each id has exactly one label, the one of the submit that stored it first
    stored = [int(re.match(r"stored (\d+) labels", text).group(1)) for text in outputs]  # type: ignore[union-attr]
    assert sum(stored) == 60 and report["labels"] == 60
    assert later.returncode == 0 and later.stdout.strip() == "stored 0 labels for iris, 60 ids already had one (kept)"


@pytest.mark.s3
def test_labels_for_an_s3_store_that_refuses_us_are_refused_in_one_line(iris_store: Env, seaweedfs: object) -> None:
    env = iris_store
    env.result_location = f"s3://no-such-bucket-{env.prefix.replace('.', '-')}/results"
    path = _write_csv(env.tmp / "y.csv", [("a", 1)])

    refused = env.inferq("labels", "submit", str(path), "--model", "iris")

    assert refused.returncode == 1
    assert refused.stderr.startswith("inferq: error: put s3://no-such-bucket-")
    assert any(code in refused.stderr for code in ("NoSuchBucket", "AccessDenied"))  # SeaweedFS says the latter
    assert len(refused.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("id,y\na,1\n", "no column 'label'"),
        ("id,label\na,1\nb,2\na,2\n", "id 'a' has label '2' here and '1' on line 2"),
        ("id,label\n,1\n", "column 'id': '' is not an id"),
    ],
)
def test_a_bad_label_file_is_refused_in_one_line_and_stores_nothing(
    iris_store: Env, tmp_path: Path, content: str, message: str
) -> None:
    labeled_env = iris_store
    path = tmp_path / "bad.csv"
    path.write_text(content)

    refused = labeled_env.inferq("labels", "submit", str(path), "--model", "iris")

    assert refused.returncode == 1
    assert refused.stderr.startswith("inferq: error: ") and message in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert _performance(labeled_env)["labels"] == 0


def test_the_worker_metrics_serve_labeled_and_live_accuracy_per_version(
    iris_store: Env, models: Models, tmp_path: Path
) -> None:
    env, truth = iris_store, _truth(models)
    env.result_location = f"sqlite:{env.tmp / 'results.db'}"
    env.submit([make_job(models.X[i : i + 1], version=1 + i % 2, id=f"m-{i}") for i in range(30)])
    env.drain()
    _submit_labels(env, _write_csv(tmp_path / "y.csv", [(f"m-{i}", int(truth[i])) for i in range(20)]))
    metrics = WorkerMetrics()
    metrics.registry.register(LivePerformance(env.result_store_at, env.model_store_at))

    text = metrics.render().decode()

    report = {v["version"]: v for v in _performance(env)["versions"]}  # type: ignore[attr-defined]
    for version in (1, 2):
        labels = f'model="iris",version="{version}"'
        assert f"inferq_labeled_total{{{labels}}} 10.0" in text
        assert f"inferq_live_accuracy{{{labels}}} {report[version]['accuracy']!r}" in text

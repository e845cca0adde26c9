"""The compose stack's one-shot producer: publish a scikit-learn model as ``iris`` (alias ``champion``)
unless it is there already, then backfill sample rows with ``inferq backfill``.

Runs inside the inferq image with the stack's ``INFERQ_*`` settings; ``SEED_COPIES`` (default 20)
copies of the 150 iris rows, with small noise, become one job each. A rerun publishes nothing new:
the model exists, and the backfill skips jobs that already have a result.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from inferq.model_store.base import publish
from inferq.model_store.convert import estimator_to_onnx, framework_versions
from inferq.model_store.stores import open_model_store
from inferq.shared.config.settings import InferqSettings, load_settings

MODEL = "iris"


def inferq(*args: str) -> None:
    print("+ inferq " + " ".join(args), flush=True)
    subprocess.run(["inferq", *args], check=True)


def main() -> None:
    copies = int(os.environ.get("SEED_COPIES", "20"))
    work = Path(tempfile.mkdtemp(prefix="inferq-seed-"))
    features, labels = load_iris(return_X_y=True)  # ships with scikit-learn: nothing is downloaded
    store = open_model_store(load_settings(InferqSettings).model_store)
    if not store.list_versions(MODEL):
        # What `inferq models publish iris model.joblib --alias champion` does, without a second
        # process importing scikit-learn again.
        model = LogisticRegression(max_iter=1000).fit(features, labels)
        onnx_bytes = estimator_to_onnx(model)
        manifest = publish(
            store,
            MODEL,
            onnx_bytes,
            alias="champion",
            source="sklearn:LogisticRegression",
            framework=framework_versions(),
        )
        print(f"published {MODEL} version {manifest.version} (alias champion)", flush=True)
    rng = np.random.default_rng(7)
    data = work / "iris.csv"
    with data.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "sepal_length", "sepal_width", "petal_length", "petal_width"])
        for copy in range(copies):
            rows = features + rng.normal(scale=0.05, size=features.shape) if copy else features
            for number, row in enumerate(rows):
                writer.writerow([f"iris-{copy:04d}-{number:03d}", *(f"{v:.4f}" for v in row)])
    # One job per row: the stack's dashboards then show the traffic of many small jobs, as services send.
    inferq("backfill", str(data), "--model", MODEL, "--version", "champion", "--id-column", "id", "--batch-rows", "1")


if __name__ == "__main__":
    try:
        main()
    except subprocess.CalledProcessError as exc:
        sys.exit(exc.returncode)

"""The compose stack's one-shot producer: publish a scikit-learn model as ``iris`` (alias ``champion``)
unless it is there already, then backfill sample rows through the real CLI.

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

import joblib
import numpy as np
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

MODEL = "iris"


def inferq(*args: str, check: bool = True) -> int:
    print("+ inferq " + " ".join(args), flush=True)
    return subprocess.run(["inferq", *args], check=check).returncode


def main() -> None:
    copies = int(os.environ.get("SEED_COPIES", "20"))
    work = Path(tempfile.mkdtemp(prefix="inferq-seed-"))
    features, labels = load_iris(return_X_y=True)  # ships with scikit-learn: nothing is downloaded
    if inferq("models", "list", MODEL, check=False) != 0:
        model = LogisticRegression(max_iter=1000).fit(features, labels)
        joblib.dump(model, work / "iris.joblib")
        inferq("models", "publish", MODEL, str(work / "iris.joblib"), "--alias", "champion")
    rng = np.random.default_rng(7)
    data = work / "iris.csv"
    with data.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "sepal_length", "sepal_width", "petal_length", "petal_width"])
        for copy in range(copies):
            rows = features + rng.normal(scale=0.05, size=features.shape) if copy else features
            for number, row in enumerate(rows):
                writer.writerow([f"iris-{copy:04d}-{number:03d}", *(f"{v:.4f}" for v in row)])
    inferq("backfill", str(data), "--model", MODEL, "--version", "champion", "--id-column", "id")


if __name__ == "__main__":
    try:
        main()
    except subprocess.CalledProcessError as exc:
        sys.exit(exc.returncode)

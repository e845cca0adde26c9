"""The compose stack's one-shot producer (deploy/compose/seed.py), run for real against the broker
with file stores in place of S3."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from inferq.model_store.local import LocalModelStore

pytestmark = pytest.mark.broker
ROOT = Path(__file__).resolve().parents[2]


def run_seed(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    bin_dir = str(Path(sys.executable).parent)  # where `inferq` is installed, as in the image
    child = {**os.environ, **env, "SEED_COPIES": "2", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return subprocess.run(
        [sys.executable, str(ROOT / "deploy/compose/seed.py")], env=child, capture_output=True, text=True, check=False
    )


def test_seed_publishes_the_iris_model_and_backfills_its_rows(env: dict[str, str], channel: Any) -> None:
    first = run_seed(env)
    assert first.returncode == 0, first.stderr
    store = LocalModelStore(env["INFERQ_MODEL_STORE"])
    assert store.list_versions("iris") == [1]
    assert store.read_aliases("iris") == {"champion": 1}
    jobs = channel.queue_declare(env["INFERQ_JOBS_QUEUE"], passive=True).method.message_count
    assert jobs == 300  # 2 copies of the 150 iris rows, one job each
    assert "published 300 jobs (300 rows)" in first.stdout

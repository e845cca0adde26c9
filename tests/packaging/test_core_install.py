"""The core install, for real: the wheel without any extra, at the pinned versions, in a fresh virtual
environment (no system site-packages), compiled as the images compile it. It publishes an ONNX model, a
worker answers a submitted job through the real broker, and a command that needs an extra names it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import joblib
import numpy as np
import orjson
import pytest
from support import Env, Models

from inferq.shared.contract.messages import Result

ROOT = Path(__file__).resolve().parents[2]
CONSTRAINTS = ROOT / "constraints.txt"
EXTRA_MODULES = ("boto3", "psycopg", "fastapi", "uvicorn", "sklearn", "skl2onnx", "joblib", "scipy", "matplotlib")
"""One import of each extra's distributions: none may be in a core install."""

pytestmark = pytest.mark.timeout(600)  # a fresh install takes a minute or two (less from pip's cache)


def clean_environ(environ: dict[str, str]) -> dict[str, str]:
    """``environ`` without what would lead the venv's Python to this process's packages."""
    return {k: v for k, v in environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}}


@pytest.fixture(scope="module")
def core(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The ``bin`` folder of a fresh venv holding the wheel and its core requirements only."""
    venv = tmp_path_factory.mktemp("core") / "venv"
    # What the Dockerfile's build stage does: a venv without pip, pip --python installing into it with the
    # constraints, then the bytecode compiled with unchecked hashes.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    installed = subprocess.run(
        [*pip, "install", "--quiet", "--no-compile", "-c", str(CONSTRAINTS), str(wheel)],
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    compiled = [str(python), "-m", "compileall", "-q", "-j", "0", "--invalidation-mode", "unchecked-hash", str(venv)]
    subprocess.run(compiled, capture_output=True, check=True)
    yield venv / "bin"
    shutil.rmtree(venv.parent)


def run(bin_dir: Path, *args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(bin_dir / args[0]), *args[1:]],
        env=clean_environ(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_the_venv_is_isolated_and_holds_no_extra(core: Path, tmp_path: Path) -> None:
    config = (core.parent / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = false" in config
    probe = "import importlib.util, sys; print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m)))"
    found = run(core, "python", "-c", probe, *EXTRA_MODULES, env=dict(os.environ), cwd=tmp_path)
    assert (found.returncode, found.stdout.strip()) == (0, "")


def test_a_worker_loads_from_bytecode_alone(core: Path, tmp_path: Path) -> None:
    # -v reports "code object from <file>" for each module: a .py there means it was compiled at import.
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    done = run(core, "python", "-v", "-c", "import inferq.worker.worker", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = [line for line in done.stderr.splitlines() if line.startswith("# code object from")]
    venv = str(core.parent)
    assert any(venv in line for line in loaded)
    assert not [line for line in loaded if venv in line and not line.rstrip("'").endswith(".pyc")]


@pytest.mark.broker
def test_the_core_publishes_an_onnx_model_and_a_worker_answers_a_submitted_job(
    core: Path, env: Env, models: Models
) -> None:
    # Given the core install, a model directory and a SQLite result store, and an ONNX model built here
    env.result_location = f"sqlite:{env.tmp / 'results.db'}"
    world = env.environ(INFERQ_METRICS_PORT="0")
    (env.tmp / "model.onnx").write_bytes(models.logistic_onnx)
    rows = models.X[[0, 75, 149]]
    # When it publishes the model, submits one job of three rows and drains the queue with a worker
    published = run(core, "inferq", "models", "publish", "m", "model.onnx", env=world, cwd=env.tmp)
    assert published.returncode == 0, published.stderr
    assert published.stdout.startswith("published m version 1")
    job = orjson.dumps(rows.tolist()).decode()
    submitted = run(core, "inferq", "submit", "--model", "m", "--input", job, env=world, cwd=env.tmp)
    assert submitted.returncode == 0, submitted.stderr
    (job_id,) = submitted.stdout.split()
    drained = run(core, "inferq", "worker", "--drain", env=world, cwd=env.tmp)
    assert drained.returncode == 0, drained.stderr[-3000:]
    # Then the stored result is the model's prediction
    got = run(core, "inferq", "results", "get", job_id, env=world, cwd=env.tmp)
    assert got.returncode == 0, got.stderr
    result = Result.model_validate_json(got.stdout)
    assert result.error is None
    labels = {output.name: output for output in result.outputs}["label"]
    assert labels.data == models.logistic.predict(rows).tolist()
    assert np.unique(labels.data).size == 3  # one row of each class: the answer is no accident


def needs(command: str, extra: str) -> str:
    return f"inferq: error: inferq {command} needs the {extra} extra: pip install 'inferq[{extra}]'\n"


@pytest.mark.parametrize(
    ("args", "stores", "command", "extra"),
    [
        (["serve"], {}, "serve", "http"),
        (["models", "publish", "m", "model.joblib"], {}, "models publish", "sklearn"),
        (["models", "list"], {"INFERQ_MODEL_STORE": "s3://bucket/models"}, "models list", "s3"),
        (["results", "get", "j"], {"INFERQ_RESULT_STORE": "postgresql://u@127.0.0.1:1/db"}, "results get", "postgres"),
    ],
)
def test_a_command_that_needs_an_extra_names_it_in_one_line_and_exits_2(
    core: Path, tmp_path: Path, models: Models, args: list[str], stores: dict[str, str], command: str, extra: str
) -> None:
    joblib.dump(models.logistic, tmp_path / "model.joblib")  # a real estimator: only the extra is missing
    environ = {
        **os.environ,
        # A broker nobody answers on: a command that got past its imports would fail fast, not hang.
        "INFERQ_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/%2F",
        "INFERQ_CONNECT_TIMEOUT_S": "1",
        "INFERQ_MODEL_STORE": str(tmp_path / "models"),
        "INFERQ_RESULT_STORE": f"sqlite:{tmp_path / 'results.db'}",
        **stores,
    }
    done = run(core, "inferq", *args, env=environ, cwd=tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (2, "", needs(command, extra))

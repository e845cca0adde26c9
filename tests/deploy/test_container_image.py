"""The Dockerfile and .dockerignore, parsed; the HEALTHCHECK command run against a real worker endpoint."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from inferq.shared.config.settings import WorkerSettings
from inferq.worker.metrics import MetricsServer, WorkerMetrics

ROOT = Path(__file__).resolve().parents[2]


def instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_image_is_multi_stage_on_a_slim_python_and_runs_as_a_user() -> None:
    steps = instructions()
    froms = [args for op, args in steps if op == "FROM"]
    assert len(froms) == 2 and froms[0].endswith("AS build") and froms[1].endswith("AS runtime")
    base = next(args for op, args in steps if op == "ARG" and args.startswith("PYTHON_IMAGE="))
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11-slim-\w+", base)
    assert any(op == "COPY" and args.startswith("--from=build /opt/inferq") for op, args in steps)
    (user,) = [args for op, args in steps if op == "USER"]
    assert user.split(":")[0] not in {"0", "root"}
    # the runtime stage installs nothing: the build stage's environment is copied in
    runtime = steps[[i for i, (op, _) in enumerate(steps) if op == "FROM"][1] :]
    assert not any(op == "RUN" and "pip install" in args for op, args in runtime)


def test_inferq_is_the_entrypoint_and_worker_the_default_command() -> None:
    steps = dict((op, args) for op, args in instructions() if op in {"ENTRYPOINT", "CMD", "EXPOSE"})
    assert json.loads(steps["ENTRYPOINT"]) == ["inferq"]
    assert json.loads(steps["CMD"]) == ["worker"]
    assert steps["EXPOSE"] == str(WorkerSettings.model_fields["metrics_port"].default)


def healthcheck_command() -> list[str]:
    (args,) = [args for op, args in instructions() if op == "HEALTHCHECK"]
    command: list[str] = json.loads(args.split("CMD", 1)[1])
    return command


def run_healthcheck(port: int) -> int:
    command = healthcheck_command()
    assert command[0] == "python"
    env = {**os.environ, "INFERQ_METRICS_PORT": str(port)}
    return subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, check=False).returncode


class _Alive:
    ready = False
    stopping = False
    in_flight = 0


def test_healthcheck_passes_against_a_live_worker_endpoint_and_fails_without_one() -> None:
    assert "/healthz" in " ".join(healthcheck_command())
    server = MetricsServer(WorkerMetrics(), _Alive(), "127.0.0.1", 0).start()
    port = server.port
    try:
        assert run_healthcheck(port) == 0  # alive even when not ready: no restart while the broker is away
    finally:
        server.close()
    assert run_healthcheck(port) != 0


def test_build_context_leaves_out_local_state_and_keeps_what_the_build_copies() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"}
    assert {".git", ".venv", "var", "tests"} <= ignored
    sources = {
        source
        for op, args in instructions()
        if op == "COPY" and not args.startswith("--from")
        for source in args.split()[:-1]
    }
    packages = {"shared", "model_store", "producer", "gateway", "worker", "inferq"}
    assert {"pyproject.toml", "README.md", *packages} <= sources
    assert not sources & ignored

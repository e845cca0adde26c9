"""The Dockerfile and .dockerignore, parsed (no Docker engine runs here); each image's HEALTHCHECK command
run against the real endpoint of the process that image runs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from private_broker import free_port
from support import Env

from inferq.gateway.settings import GatewaySettings
from inferq.shared.config.settings import WorkerSettings
from inferq.worker.metrics import MetricsServer, WorkerMetrics

ROOT = Path(__file__).resolve().parents[2]
VENV = "/opt/inferq"
IMAGES = {"worker": "build", "api": "build-api", "producer": "build-producer"}
"""Each image (a target) and the build stage whose environment it copies."""
EXTRAS = {
    "build": {"s3", "postgres"},
    "build-api": {"s3", "postgres", "http"},
    "build-producer": {"s3", "postgres", "sklearn", "tables"},
}
"""The extras each build stage installs: only what its image's process imports."""


@dataclass
class Stage:
    """One ``FROM <base> AS <name>`` and its instructions, continuation lines joined, comments dropped."""

    name: str
    base: str
    steps: list[tuple[str, str]] = field(default_factory=list)

    def args(self, op: str) -> list[str]:
        return [args for step, args in self.steps if step == op]

    def pip_installs(self) -> list[str]:
        return [args for args in self.args("RUN") if re.search(r"\bpip\b.*\binstall\b", args)]


def instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of the whole file, in order."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def stages() -> dict[str, Stage]:
    """The stages by name, in the file's order (the last one is what ``docker build .`` builds)."""
    found: dict[str, Stage] = {}
    current: Stage | None = None
    for op, args in instructions():
        if op == "FROM":
            base, _, name = args.partition(" AS ")
            current = found[name.strip()] = Stage(name.strip(), base.strip())
        elif current is not None:
            current.steps.append((op, args))
    return found


def global_arg(name: str) -> str:
    return next(args.split("=", 1)[1] for op, args in instructions() if op == "ARG" and args.startswith(f"{name}="))


def test_the_images_are_stages_on_one_slim_python_and_the_worker_is_the_default_target() -> None:
    all_stages = stages()
    assert re.fullmatch(r"python:3\.11-slim-\w+", global_arg("PYTHON_IMAGE"))
    assert {name: stage.base for name, stage in all_stages.items()} == {
        "build": "${PYTHON_IMAGE}",
        "build-api": "build",
        "build-producer": "build",
        "runtime": "${PYTHON_IMAGE}",
        "producer": "runtime",
        "api": "runtime",
        "worker": "runtime",
    }
    assert list(all_stages)[-1] == "worker"  # `docker build .` without --target


def test_each_image_copies_its_build_stages_environment_and_runs_as_a_user() -> None:
    all_stages = stages()
    (user,) = all_stages["runtime"].args("USER")
    assert user.split(":")[0] not in {"0", "root"}
    for image, build in IMAGES.items():
        assert all_stages[image].args("COPY") == [f"--from={build} {VENV} {VENV}"], image
        assert not all_stages[image].args("USER"), f"{image} must keep the runtime's user"
    # The images install nothing themselves (no compilers, no pip): the build stages do.
    for name in ("runtime", *IMAGES):
        assert not all_stages[name].pip_installs(), name
    assert "--without-pip" in " ".join(all_stages["build"].args("RUN"))


def test_each_build_stage_installs_only_its_extras_at_the_pinned_versions() -> None:
    all_stages = stages()
    copied = {source for args in all_stages["build"].args("COPY") for source in args.split()[:-1]}
    assert "constraints.txt" in copied
    for name, extras in EXTRAS.items():
        (install,) = all_stages[name].pip_installs()
        assert "-c constraints.txt" in install, name
        (requested,) = re.findall(r"'\.\[([\w,]+)\]'", install)
        assert set(requested.split(",")) == extras, name


def test_bytecode_is_compiled_at_build_time_so_a_read_only_container_never_compiles() -> None:
    all_stages = stages()
    for name in EXTRAS:
        (install,) = all_stages[name].pip_installs()
        assert "--no-compile" in install, name  # compiled once, below, in the mode that never checks sources
        assert f"compileall -q -j 0 --invalidation-mode unchecked-hash {VENV}" in install, name
    runtime_env = " ".join(all_stages["runtime"].args("ENV"))
    assert "PYTHONDONTWRITEBYTECODE=1" in runtime_env
    assert "compileall" in " ".join(all_stages["runtime"].args("RUN"))  # the standard library's too


def test_inferq_is_the_entrypoint_and_each_image_runs_its_process_on_its_port() -> None:
    all_stages = stages()
    (entrypoint,) = all_stages["runtime"].args("ENTRYPOINT")
    assert json.loads(entrypoint) == ["inferq"]
    worker, api = all_stages["worker"], all_stages["api"]
    assert [json.loads(cmd) for cmd in worker.args("CMD")] == [["worker"]]
    assert worker.args("EXPOSE") == [str(WorkerSettings.model_fields["metrics_port"].default)]
    assert f"INFERQ_METRICS_PORT={worker.args('EXPOSE')[0]}" in worker.args("ENV")
    assert [json.loads(cmd) for cmd in api.args("CMD")] == [["serve"]]
    assert api.args("EXPOSE") == [str(GatewaySettings.model_fields["http_port"].default)]
    assert f"INFERQ_HTTP_PORT={api.args('EXPOSE')[0]}" in api.args("ENV")


def healthcheck_command(image: str) -> list[str]:
    (args,) = stages()[image].args("HEALTHCHECK")
    command: list[str] = json.loads(args.split("CMD", 1)[1])
    return command


def run_healthcheck(image: str, **environ: str) -> int:
    command = healthcheck_command(image)
    assert command[0] == "python"
    env = {**os.environ, **environ}
    return subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, check=False).returncode


def test_the_producer_image_has_no_healthcheck_it_runs_one_shot_commands() -> None:
    assert not stages()["producer"].args("HEALTHCHECK")


class _Alive:
    ready = False
    stopping = False
    in_flight = 0


def test_the_worker_healthcheck_passes_against_a_live_worker_endpoint_and_fails_without_one() -> None:
    assert "/healthz" in " ".join(healthcheck_command("worker"))
    server = MetricsServer(WorkerMetrics(), _Alive(), "127.0.0.1", 0).start()
    port = str(server.port)
    try:
        # alive even when not ready: no restart while the broker is away
        assert run_healthcheck("worker", INFERQ_METRICS_PORT=port) == 0
    finally:
        server.close()
    assert run_healthcheck("worker", INFERQ_METRICS_PORT=port) != 0


@pytest.mark.broker
def test_the_api_healthcheck_passes_against_a_running_inferq_serve_and_fails_without_one(env: Env) -> None:
    assert "/v2/health/live" in " ".join(healthcheck_command("api"))
    port = str(free_port())
    server = subprocess.Popen(
        [sys.executable, "-m", "inferq", "serve"],
        env=env.environ(INFERQ_HTTP_HOST="127.0.0.1", INFERQ_HTTP_PORT=port),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while run_healthcheck("api", INFERQ_HTTP_PORT=port) != 0:
            assert server.poll() is None, f"inferq serve exited with {server.returncode}"
            assert time.monotonic() < deadline, "inferq serve never passed its healthcheck"
            time.sleep(0.2)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    assert run_healthcheck("api", INFERQ_HTTP_PORT=port) != 0


def package_folders() -> set[str]:
    """The repository's top-level entries that install as part of inferq (pyproject.toml's package-dir)."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"inferq": "."}
    return {package.split(".")[1] for package in setuptools["packages"] if package != "inferq"}


def test_build_context_leaves_out_local_state_and_keeps_what_the_build_copies() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"}
    assert {".git", ".venv", ".env", "var", "tests", "bench", "scripts", "deploy"} <= ignored
    sources = {
        source
        for op, args in instructions()
        if op == "COPY" and not args.startswith("--from")
        for source in args.split()[:-1]
    }
    root_modules = {"__init__.py", "__main__.py", "py.typed"}
    assert {"pyproject.toml", "README.md", "constraints.txt", *root_modules, *package_folders()} <= sources
    assert not sources & ignored

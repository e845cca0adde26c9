"""A core install runs without the extras: with every extra's modules hidden from a subprocess, the core
commands work, and a command that needs an extra fails with one line naming it (exit 2), never an
ImportError traceback. ``import inferq`` itself stays light: the public API loads on first use."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import orjson
import pytest
from onnx import TensorProto, helper
from support import Env, Models, job_dict

import inferq
from inferq.model_store.base import publish
from inferq.model_store.local import LocalModelStore
from inferq.shared.contract.messages import Result
from inferq.shared.errors import ConfigError
from inferq.shared.extras import EXTRA_OF_MODULE, MissingExtra, extra_of, needs_extra
from inferq.shared.results.stores import open_result_store

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"

HIDE = """
import importlib.abc
import sys


class HideModules(importlib.abc.MetaPathFinder):
    # As if these distributions were not installed: importing one of their modules cannot find it.
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


HIDDEN = frozenset(filter(None, sys.argv.pop(1).split(",")))
sys.meta_path.insert(0, HideModules())
"""
"""Prepended to a ``python -c`` program; its first argument lists the top-level modules to hide."""

RUN_CLI = "from inferq.cli import main\n\nmain(sys.argv[1:])\n"

CORE_MODULES = (
    "inferq.cli",
    "inferq.worker.worker",
    "inferq.producer",
    "inferq.producer.backfill",
    "inferq.producer.export",
    "inferq.admin.status",
    "inferq.admin.dead_letters",
    "inferq.model_store.stores",
    "inferq.model_store.model_file",
    "inferq.shared.results.stores",
    "inferq.monitoring.store",
    "inferq.monitoring.shadow_report",
)
"""What a worker, a producer and the operator commands import."""


def python(
    code: str, *args: str, hide: Iterable[str] = (), env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter with the modules ``hide`` names not installed."""
    return subprocess.run(
        [sys.executable, "-c", HIDE + code, ",".join(hide), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def needs(command: str, extra: str) -> str:
    return f"inferq: error: inferq {command} needs the {extra} extra: pip install 'inferq[{extra}]'\n"


def stored_results(location: str) -> list[Result]:
    store = open_result_store(location)
    try:
        return list(store.scan())
    finally:
        store.close()


def identity_onnx() -> bytes:
    """A model of two float features that answers its input."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


# -- which extra installs which module ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "extra"),
    [
        ("boto3", "s3"),
        ("botocore.config", "s3"),
        ("psycopg", "postgres"),
        ("psycopg_pool", "postgres"),
        ("fastapi", "http"),
        ("uvicorn", "http"),
        ("sklearn.base", "sklearn"),
        ("skl2onnx", "sklearn"),
        ("joblib", "sklearn"),
        ("scipy.stats", "monitor"),
        ("matplotlib", "monitor"),
        ("pyarrow.csv", "tables"),
        ("pandas", "tables"),
    ],
)
def test_a_missing_optional_module_is_blamed_on_the_extra_that_installs_it(module: str, extra: str) -> None:
    assert extra_of(ModuleNotFoundError(f"No module named {module!r}", name=module)) == extra


def test_a_missing_core_module_or_a_broken_import_is_no_extras_business() -> None:
    assert extra_of(ModuleNotFoundError("No module named 'numpy'", name="numpy")) is None
    assert extra_of(ModuleNotFoundError("no name")) is None
    assert extra_of(ImportError("cannot import name 'x' from 'sklearn'", name="sklearn")) is None


def test_needs_extra_names_the_feature_and_the_pip_command() -> None:
    with pytest.raises(MissingExtra) as caught, needs_extra("s3", "an s3:// result store"):
        raise ModuleNotFoundError("No module named 'boto3'", name="boto3")
    assert str(caught.value) == "an s3:// result store needs the s3 extra: pip install 'inferq[s3]'"
    assert isinstance(caught.value, ConfigError)  # the CLI exits 2 on it, as on any configuration error
    assert caught.value.extra == "s3"


def test_needs_extra_lets_every_other_failure_through() -> None:
    with pytest.raises(ModuleNotFoundError), needs_extra("s3", "an s3:// result store"):
        raise ModuleNotFoundError("No module named 'numpy'", name="numpy")
    with pytest.raises(ValueError, match="bad"), needs_extra("s3", "an s3:// result store"):
        raise ValueError("bad")


def test_every_extra_the_errors_name_is_declared_in_pyproject_and_in_all() -> None:
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    named = set(EXTRA_OF_MODULE.values())
    assert named <= extras.keys()
    in_all = {extra for spec in extras["all"] for extra in spec.partition("[")[2].rstrip("]").split(",")}
    assert named <= in_all


# -- the public API -------------------------------------------------------------------------------------


def test_the_producer_side_api_imports_from_inferq_itself() -> None:
    from inferq import (  # noqa: PLC0415  (the import is what is tested)
        Job,
        Producer,
        Result,
        RowError,
        Tensor,
        job_from_columns,
        job_from_rows,
        jobs_from_rows,
        load_settings,
        open_model_store,
        read_table,
    )
    from inferq.producer.client import Producer as Home  # noqa: PLC0415

    assert Producer is Home
    assert all(callable(v) for v in (Job, Result, RowError, Tensor, job_from_columns, job_from_rows, jobs_from_rows))
    assert all(callable(v) for v in (load_settings, open_model_store, read_table))
    assert all(getattr(inferq, name) is not None for name in inferq.__all__)
    with pytest.raises(AttributeError):
        _ = inferq.NoSuchThing


def test_import_inferq_loads_neither_pika_nor_pydantic() -> None:
    done = python("import inferq\nprint(' '.join(sorted(sys.modules)))")
    assert done.returncode == 0, done.stderr
    loaded = {name.partition(".")[0] for name in done.stdout.split()}
    assert not loaded & {"pika", "pydantic", "numpy", "onnx", "onnxruntime", "click"}


# -- the core path without the extras -------------------------------------------------------------------


def test_the_core_modules_import_without_any_extra_installed() -> None:
    done = python("\n".join(f"import {m}" for m in CORE_MODULES), hide=EXTRA_OF_MODULE)
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_core_modules_load_no_extra_even_when_installed() -> None:
    # The worker must not pay for scipy or boto3 it never uses (nor fail without them).
    code = "\n".join(f"import {m}" for m in CORE_MODULES) + "\nprint(' '.join(sorted(sys.modules)))"
    done = python(code)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not {name.partition(".")[0] for name in done.stdout.split()} & EXTRA_OF_MODULE.keys()


CORE_SESSION = """
import orjson
from inferq.cli import _run, cli

for args in orjson.loads(sys.argv[1]):
    code = _run(cli, args)
    print(orjson.dumps({"args": args, "code": code}).decode(), file=sys.stderr, flush=True)
    if code != 0:
        sys.exit(code)
"""


@pytest.mark.broker
def test_the_core_commands_run_on_file_and_sqlite_stores_without_any_extra(iris_store: Env, models: Models) -> None:
    # Given the iris model in a model directory, jobs to submit, and a message no worker can read
    rows = iris_store.tmp / "jobs.jsonl"
    rows.write_bytes(b"".join(orjson.dumps(job_dict(id=f"r{i}", version=2)) + b"\n" for i in range(4)))
    iris_store.publish_raw(b"not json")
    results = f"sqlite:{iris_store.tmp / 'results.db'}"
    onnx_file = iris_store.tmp / "identity.onnx"
    onnx_file.write_bytes(identity_onnx())
    commands = [
        ["models", "publish", "identity", str(onnx_file)],
        ["models", "list"],
        ["models", "alias", "iris", "stable", "2"],
        ["submit", "--model", "iris", "--version", "stable", "--input", orjson.dumps(models.X[0].tolist()).decode()],
        ["submit", str(rows)],
        ["worker", "--drain"],
        ["results", "get", "r0"],
        ["results", "export", "--model", "iris", "--out", str(iris_store.tmp / "export.csv")],
        ["results", "copy", results, str(iris_store.tmp / "copied")],
        ["status"],
        ["dlq", "list"],
        ["dlq", "replay", "--all"],
    ]
    # When a process without any extra runs each command in turn
    done = python(
        CORE_SESSION,
        orjson.dumps(commands).decode(),
        hide=EXTRA_OF_MODULE,
        env=iris_store.environ(INFERQ_RESULT_STORE=results, INFERQ_METRICS_PORT="0"),
    )
    # Then every one succeeds: the worker answered all five jobs and dead-lettered the unreadable message
    assert done.returncode == 0, done.stderr[-3000:]
    assert "published identity version 1" in done.stdout
    assert "iris stable -> version 2" in done.stdout
    assert [r.error for r in stored_results(results)] == [None] * 5
    assert len((iris_store.tmp / "export.csv").read_text().splitlines()) == 1 + 5
    assert len(stored_results(str(iris_store.tmp / "copied"))) == 5
    assert "1 shown of 1" in done.stdout
    assert "replayed 1" in done.stderr


# -- a command that needs a missing extra says which ----------------------------------------------------


MISSING_EXTRA_CASES: dict[str, tuple[list[str], dict[str, str], str, str]] = {
    # name: (arguments, store settings, the command as the message names it, the extra)
    "serve": (["serve"], {}, "serve", "http"),
    "backfill": (["backfill", "{tmp}/rows.csv", "--model", "m"], {}, "backfill", "tables"),
    "publish joblib": (["models", "publish", "m", "{tmp}/model.joblib"], {}, "models publish", "sklearn"),
    "publish pkl": (["models", "publish", "m", "{tmp}/model.pkl"], {}, "models publish", "sklearn"),
    "publish pickle": (["models", "publish", "m", "{tmp}/model.pickle"], {}, "models publish", "sklearn"),
    "drift statistics": (["monitor", "drift", "m"], {}, "monitor drift", "monitor"),
    "s3 model store": (["models", "list"], {"INFERQ_MODEL_STORE": "s3://bucket/models"}, "models list", "s3"),
    "s3 result store": (["results", "get", "j"], {"INFERQ_RESULT_STORE": "s3://bucket/results"}, "results get", "s3"),
    "s3 monitor store": (["monitor", "shadow", "m"], {"INFERQ_RESULT_STORE": "s3://b/r"}, "monitor shadow", "s3"),
    "postgres result store": (
        ["results", "get", "j"],
        {"INFERQ_RESULT_STORE": "postgresql://u@h/db"},
        "results get",
        "postgres",
    ),
    "postgres copy target": (
        ["results", "copy", "{tmp}/results", "postgresql://u@h/db"],
        {},
        "results copy",
        "postgres",
    ),
    "postgres monitor store": (
        ["monitor", "shadow", "m"],
        {"INFERQ_RESULT_STORE": "postgresql://u@h/db"},
        "monitor shadow",
        "postgres",
    ),
    "worker on postgres": (["worker"], {"INFERQ_RESULT_STORE": "postgresql://u@h/db"}, "worker", "postgres"),
    "worker on s3": (["worker"], {"INFERQ_RESULT_STORE": "s3://bucket/results"}, "worker", "s3"),
}

EACH_COMMAND = """
import contextlib
import io
import os

import orjson

from inferq.cli import _run, cli

answers = {}
for name, (args, environ) in orjson.loads(sys.argv[1]).items():
    os.environ.update(environ)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = _run(cli, args)
    answers[name] = [code, out.getvalue(), err.getvalue()]
print(orjson.dumps(answers).decode())
"""
"""Runs each case's command in turn, in one process (one interpreter start for them all)."""


@pytest.fixture(scope="module")
def without_extras(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str, str]]:
    """``(exit code, stdout, stderr)`` of each of :data:`MISSING_EXTRA_CASES`, run with no extra installed."""
    tmp = tmp_path_factory.mktemp("without_extras")
    for suffix in ("joblib", "pkl", "pickle"):
        (tmp / f"model.{suffix}").write_bytes(b"a pickle")
    base = {
        # A broker nobody answers on: a command that got past its stores would fail fast, not hang.
        "INFERQ_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/%2F",
        "INFERQ_CONNECT_TIMEOUT_S": "1",
        "INFERQ_MODEL_STORE": f"{tmp}/models",
        "INFERQ_RESULT_STORE": f"sqlite:{tmp}/results.db",
        "INFERQ_METRICS_PORT": "0",
    }
    cases = {
        name: ([a.format(tmp=tmp) for a in args], {**base, **stores})
        for name, (args, stores, _, _) in MISSING_EXTRA_CASES.items()
    }
    done = python(EACH_COMMAND, orjson.dumps(cases).decode(), hide=EXTRA_OF_MODULE, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    return {name: (code, out, err) for name, (code, out, err) in orjson.loads(done.stdout).items()}


@pytest.mark.parametrize("case", MISSING_EXTRA_CASES)
def test_a_command_that_needs_a_missing_extra_names_it_in_one_line_and_exits_2(
    without_extras: dict[str, tuple[int, str, str]], case: str
) -> None:
    _, _, command, extra = MISSING_EXTRA_CASES[case]
    assert without_extras[case] == (2, "", needs(command, extra))


def test_a_drift_plot_without_matplotlib_names_the_monitor_extra(tmp_path: Path) -> None:
    # Given a model published with a reference, and scipy installed (the report works) but not matplotlib
    reference = np.random.default_rng(7).standard_normal((200, 2)).astype(np.float32)
    publish(LocalModelStore(tmp_path / "models"), "tiny", identity_onnx(), reference=(reference, ["a", "b"]))
    environ = {"INFERQ_MODEL_STORE": str(tmp_path / "models"), "INFERQ_RESULT_STORE": f"sqlite:{tmp_path / 'r.db'}"}
    # When drift is asked for with a plot
    done = python(
        RUN_CLI, "monitor", "drift", "tiny", "--plot", str(tmp_path / "drift.png"), hide=["matplotlib"], env=environ
    )
    # Then one line names the extra, and no half-drawn file is left
    assert (done.returncode, done.stderr) == (2, needs("monitor drift", "monitor"))
    assert not (tmp_path / "drift.png").exists()


def test_debug_shows_the_import_error_behind_a_missing_extra(tmp_path: Path) -> None:
    done = python(RUN_CLI, "--debug", "serve", hide=EXTRA_OF_MODULE, env={"INFERQ_MODEL_STORE": str(tmp_path)})
    assert done.returncode == 1
    assert "ModuleNotFoundError: No module named" in done.stderr
    assert "MissingExtra: inferq serve needs the http extra" in done.stderr

"""The wheel: one import package, ``inferq``, with every module of the package folders and nothing of the
repository's tests, benchmark, scripts or deployment files; its requirements split into core and extras."""

from __future__ import annotations

import os
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path, PurePosixPath

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
NOT_INSTALLED = {"tests", "bench", "scripts", "deploy", "docs"}
CORE = {
    "pika",
    "pydantic",
    "pydantic-settings",
    "onnxruntime",
    "onnx",
    "numpy",
    "structlog",
    "orjson",
    "msgspec",
    "click",
    "tqdm",
    "prometheus-client",
}
"""What a worker, a producer and the operator commands import on file and SQLite stores."""
EXTRAS = {
    "s3": {"boto3"},
    "postgres": {"psycopg", "psycopg-pool"},
    "http": {"fastapi", "uvicorn", "httptools", "uvloop"},
    "sklearn": {"scikit-learn", "skl2onnx", "joblib"},
    "monitor": {"matplotlib", "scipy"},
    "tables": {"pyarrow", "pandas"},
}


def names(wheel: Path) -> list[PurePosixPath]:
    with zipfile.ZipFile(wheel) as archive:
        return [PurePosixPath(name) for name in archive.namelist()]


def metadata(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        (path,) = [name for name in archive.namelist() if name.endswith(".dist-info/METADATA")]
        message = Parser().parsestr(archive.read(path).decode())
    return [Requirement(line) for line in message.get_all("Requires-Dist") or []]


def required(requirements: list[Requirement], extra: str | None) -> set[str]:
    """The distributions ``pip install inferq[extra]`` adds (``None``: the core)."""
    wanted = {"extra": extra or ""}
    return {
        canonicalize_name(r.name)
        for r in requirements
        if (r.marker is None) == (extra is None) and (r.marker is None or r.marker.evaluate(wanted))
    }


def package_folders() -> dict[str, Path]:
    """pyproject.toml's packages → the repository folder each installs from."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"inferq": "."}
    return {package: ROOT.joinpath(*package.split(".")[1:]) for package in setuptools["packages"]}


def test_the_wheels_only_top_level_package_is_inferq(wheel: Path) -> None:
    top = {name.parts[0] for name in names(wheel)}
    assert top == {"inferq", wheel.name.split("-py3")[0] + ".dist-info"}
    present = {str(name) for name in names(wheel)}
    expected = {"inferq/__init__.py", "inferq/__main__.py", "inferq/py.typed"}
    expected |= {"inferq/worker/worker.py", "inferq/shared/contract/messages.py", "inferq/cli/__init__.py"}
    assert expected <= present


def test_the_wheel_leaves_out_tests_bench_scripts_deploy_and_the_build_files(wheel: Path) -> None:
    inside = {name.parts[1] for name in names(wheel) if name.parts[0] == "inferq" and len(name.parts) > 2}
    assert not inside & NOT_INSTALLED
    files = {name.parts[1] for name in names(wheel) if name.parts[0] == "inferq" and len(name.parts) == 2}
    assert not files & {"pyproject.toml", "constraints.txt", "Dockerfile", "Makefile", "docker-compose.yml"}


def test_every_module_of_every_package_folder_is_in_the_wheel(wheel: Path) -> None:
    present = {str(name) for name in names(wheel)}
    for package, folder in package_folders().items():
        for module in folder.glob("*.py"):
            assert "/".join([*package.split("."), module.name]) in present, module


def test_every_folder_with_an_init_module_is_a_package_pyproject_lists() -> None:
    # A new subpackage left out of [tool.setuptools] packages would be missing from the wheel and the image.
    listed = set(package_folders().values())
    for folder, dirs, files in os.walk(ROOT):
        here = Path(folder)
        dirs[:] = [
            d
            for d in dirs
            if not d.startswith((".", "__")) and d not in {"build", "dist", "var"} and not d.endswith(".egg-info")
        ]
        if here == ROOT:
            dirs[:] = [d for d in dirs if d not in NOT_INSTALLED]
        if "__init__.py" in files:
            assert here in listed, f"{here.relative_to(ROOT)} is not in pyproject.toml's packages"


def test_the_core_requires_only_what_workers_and_producers_import_and_each_extra_its_own(wheel: Path) -> None:
    requirements = metadata(wheel)
    assert required(requirements, None) == CORE
    for extra, distributions in EXTRAS.items():
        assert required(requirements, extra) == distributions, extra
    (everything,) = [r for r in requirements if r.marker is not None and r.marker.evaluate({"extra": "all"})]
    assert canonicalize_name(everything.name) == "inferq" and everything.extras == set(EXTRAS)
    # The test suite uses every extra, so the dev environment has them all.
    assert "inferq" in required(requirements, "dev")

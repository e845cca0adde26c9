"""Fixtures of the packaging tests: the wheel ``pip wheel`` builds from this checkout."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOCAL_STATE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "var", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"
)
"""What a fresh clone does not have: left out of the copy the wheel is built from."""


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``inferq-*.whl``, built with ``pip wheel --no-deps`` from a copy of the checkout (a build in the
    checkout itself would write build/ and *.egg-info into the tree other processes are using)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "inferq"
    shutil.copytree(ROOT, source, ignore=LOCAL_STATE)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", str(source), "-w", str(work / "dist")],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (found,) = (work / "dist").glob("inferq-*.whl")
    yield found
    shutil.rmtree(work)

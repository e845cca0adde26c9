"""constraints.txt: one exact version for every distribution ``inferq[dev]`` (every extra and the tools) and
the benchmark install, written by ``make lock``; the dev environment was installed at those versions."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
CONSTRAINTS = ROOT / "constraints.txt"
PIN = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;#]+)")


def pins() -> dict[NormalizedName, str]:
    found: dict[NormalizedName, str] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = PIN.fullmatch(line.strip())
        assert match, f"not an exact pin: {line!r}"
        name = canonicalize_name(match["name"])
        assert name not in found, f"{name} pinned twice"
        found[name] = match["version"]
    return found


def installed_closure(name: str, extras: frozenset[str]) -> set[NormalizedName]:
    """Every distribution installing ``name[extras]`` brings in, read from the installed metadata."""
    seen: set[tuple[NormalizedName, frozenset[str]]] = set()
    todo = [(canonicalize_name(name), extras)]
    found: set[NormalizedName] = set()
    while todo:
        current, wanted = todo.pop()
        if (current, wanted) in seen:
            continue
        seen.add((current, wanted))
        for line in distribution(current).requires or []:
            requirement = Requirement(line)
            marker = requirement.marker
            if marker is not None and not any(marker.evaluate({"extra": e}) for e in wanted | {""}):
                continue
            found.add(canonicalize_name(requirement.name))
            todo.append((canonicalize_name(requirement.name), frozenset(requirement.extras)))
    return found - {"inferq"}


def test_every_line_is_an_exact_pin_and_the_header_says_how_it_was_made() -> None:
    assert "inferq" not in pins()
    header = [line for line in CONSTRAINTS.read_text().splitlines() if line.startswith("#")]
    assert any("make lock" in line for line in header)


def test_every_distribution_of_every_extra_and_the_dev_tools_is_pinned() -> None:
    closure = installed_closure("inferq", frozenset({"dev"}))  # dev pulls inferq[all]
    assert {"boto3", "psycopg-binary", "fastapi", "uvloop", "scikit-learn", "scipy", "matplotlib"} <= closure
    assert closure - pins().keys() == set()


def test_the_benchmarks_packages_are_pinned_too() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    bench = {canonicalize_name(Requirement(spec).name) for spec in project["optional-dependencies"]["bench"]}
    assert bench - pins().keys() == set()


def test_the_dev_environment_runs_the_pinned_versions() -> None:
    # `make env` installs with -c constraints.txt; after `make lock`, it reinstalls (the stamp depends on it).
    pinned = pins()
    installed = {name: distribution(name).version for name in installed_closure("inferq", frozenset({"dev"}))}
    drifted = {name: (version, pinned[name]) for name, version in installed.items() if version != pinned[name]}
    assert not drifted, f"installed vs pinned (run make env): {drifted}"

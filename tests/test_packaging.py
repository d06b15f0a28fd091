"""`pip install .` declares what the package imports: pyproject's ranges name every runtime requirement of the
tested lock (requirements.txt), and every pin of the lock satisfies its range."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent


def _lock() -> dict[str, Requirement]:
    lines = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    return {Requirement(line).name.lower(): Requirement(line) for line in lines if line}


def test_the_declared_ranges_cover_the_lock_and_admit_its_pins():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {Requirement(r).name.lower(): Requirement(r) for r in project["dependencies"]}
    lock = _lock()
    assert set(lock) <= set(declared), f"missing from pyproject: {sorted(set(lock) - set(declared))}"
    assert "torch" in declared
    for name, pinned in lock.items():
        exact = [s.version for s in pinned.specifier if s.operator == "=="]
        for version in exact:
            assert declared[name].specifier.contains(version), f"{name}=={version} outside {declared[name]}"
        assert pinned.extras <= declared[name].extras, name


def test_no_package_data_is_declared_that_does_not_exist():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text()).get("tool", {}).get("setuptools", {})
    for package, patterns in setuptools.get("package-data", {}).items():
        for pattern in patterns:
            assert list((REPO / package).glob(pattern)), f"{package}/{pattern} matches nothing"

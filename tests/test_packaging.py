"""`pip install .` declares what the package imports: pyproject's ranges name every runtime requirement of the
tested lock (requirements.txt), and every pin of the lock satisfies its range."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import tomllib
import zipfile
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


def test_the_wheel_holds_the_library_alone_and_its_command_line_runs(tmp_path):
    """Built and installed the ordinary way into a fresh venv whose dependencies come from this one (no network):
    only scalekd/ lands in site-packages, the CLI starts, and the pipeline commands name what they need."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(REPO)], check=True, timeout=300, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("scalekd-*.whl")
    assert {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()} == {"scalekd", "scalekd-0.1.0.dist-info"}
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, timeout=300, capture_output=True)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # a path line: no .pth of ours runs
    cli = [str(venv / "bin" / "scalekd")]
    assert "compare" in subprocess.run([*cli, "--help"], capture_output=True, text=True, check=True).stdout
    config = subprocess.run([*cli, "config", "--preset", "demo"], capture_output=True, text=True, check=True)
    assert "student_size: 64" in config.stdout
    compiled = subprocess.run([*cli, "pipeline", "compile", "--out", str(tmp_path / "c")], capture_output=True,
                              text=True, cwd=tmp_path)
    assert compiled.returncode == 2 and "run from a checkout of scalekd" in compiled.stderr

"""The wheel the Docker images install holds every module and data file the app needs."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.deploy.dockerfiles import ROOT

PACKAGES = ("retrieval", "indexer", "api", "migrations")


def _shipped_files() -> set[str]:
    """Every file under the packages that is not a build or cache artefact."""
    found = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                found.add(path.relative_to(ROOT).as_posix())
    return found


@pytest.mark.slow
def test_wheel_contains_every_package_and_data_file(tmp_path: Path) -> None:
    # Build from a copy, so the test leaves no build/ or egg-info behind in the repository.
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(tmp_path / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Package would be ignored" not in result.stderr, result.stderr
    (wheel,) = (tmp_path / "dist").glob("clipsearch-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(_shipped_files() - names)
    assert not missing, f"not in the wheel: {missing}"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "clipsearch = indexer.cli.app:main" in zipfile.ZipFile(wheel).read(entry_points).decode()

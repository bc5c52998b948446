"""Settings hygiene on the command line: an unknown CLIPSEARCH_* variable is warned about with
the nearest setting, a missing folder is named as it was given (argument or variable), and a
device that is not there has its own error and exit code (10), told before any model loads."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from retrieval.config import Settings, warn_about_unknown_settings
from tests.conftest import fresh_database
from tests.indexer.cli.test_cli import env, run_cli  # noqa: F401 - `env` is a fixture
from tests.indexer.cli.test_index_model import (  # noqa: F401 - fixtures
    free_port,
    indexed,
    loads,
    uvicorn_runs,
)
from tests.serving import REPO, serve_env

# No GPU has 100 devices: refused on a machine with a GPU as on one without.
NO_SUCH_DEVICE = "cuda:99"


@pytest.fixture
def db_url(tmp_path: Path) -> Iterator[str]:
    """What these tests check happens before the catalog matters: SQLite only."""
    yield from fresh_database("sqlite", tmp_path)


def test_an_unknown_variable_is_warned_about_once_with_the_nearest_setting(
    env: Settings,  # noqa: F811 - the fixture
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    env.data_dir.mkdir(parents=True)
    monkeypatch.setenv("CLIPSEARCH_PRETRAINE", "none")
    warn_about_unknown_settings.cache_clear()  # a new process, as far as the warning goes
    caplog.set_level(logging.WARNING, logger="clipsearch.settings")
    for _ in range(2):  # two commands in one process: one warning
        run_cli(["status"], capsys, monkeypatch)
    warnings = [r.getMessage() for r in caplog.records if r.name == "clipsearch.settings"]
    assert warnings == [
        "CLIPSEARCH_PRETRAINE is not a setting and is ignored; did you mean CLIPSEARCH_PRETRAINED?"
    ]
    warn_about_unknown_settings.cache_clear()  # later tests' processes start afresh too


def test_the_warning_and_a_missing_folder_argument_from_a_real_process(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir"
    variables = {
        "CLIPSEARCH_DATA_DIR": str(tmp_path / "data"),
        "CLIPSEARCH_PRETRAINE": "none",  # a typo of CLIPSEARCH_PRETRAINED
        "CLIPSEARCH_TEST_DATABASE_URL": "postgresql://x@y/z",  # the suite's: never warned about
    }
    done = subprocess.run(
        [sys.executable, "-m", "indexer", "index", str(missing)],
        cwd=REPO,
        env=serve_env(variables),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "WARNING clipsearch.settings: CLIPSEARCH_PRETRAINE is not a setting and is ignored; "
        "did you mean CLIPSEARCH_PRETRAINED?",
        f"error: Invalid setting ROOTS: {missing} does not exist",
    ]
    assert not (tmp_path / "data").exists()  # refused before anything was created


def test_a_missing_folder_is_named_as_it_was_given(
    env: Settings,  # noqa: F811 - the fixture
    tmp_path: Path,
    loads: list[str],  # noqa: F811 - the fixture
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    missing = tmp_path / "no-such-dir"
    a_file = tmp_path / "photo.jpg"
    a_file.write_bytes(b"not a folder")
    code, out, err = run_cli(["index", str(missing)], capsys, monkeypatch)
    assert (code, out, err) == (2, "", f"error: Invalid setting ROOTS: {missing} does not exist\n")
    code, _, err = run_cli(["index", str(a_file)], capsys, monkeypatch)
    assert (code, err) == (2, f"error: Invalid setting ROOTS: {a_file} is not a directory\n")
    monkeypatch.setenv("CLIPSEARCH_ROOTS", str(missing))
    code, _, err = run_cli(["index"], capsys, monkeypatch)
    assert (code, err) == (
        2,
        f"error: Invalid setting CLIPSEARCH_ROOTS: {missing} does not exist\n",
    )
    code, _, err = run_cli(["schedule", "--max-runs", "1"], capsys, monkeypatch)
    assert (code, err) == (
        2,
        f"error: Invalid setting CLIPSEARCH_ROOTS: {missing} does not exist\n",
    )
    assert loads == [] and not env.data_dir.exists()


@pytest.mark.parametrize("given_by", ["flag", "variable"])
def test_a_device_that_is_not_there_exits_10_before_any_model_loads(
    given_by: str,
    indexed: Settings,  # noqa: F811 - the fixture
    tmp_path: Path,
    loads: list[str],  # noqa: F811 - the fixture
    uvicorn_runs: list[dict[str, Any]],  # noqa: F811 - the fixture
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if given_by == "flag":
        flag, named = ["--device", NO_SUCH_DEVICE], f"--device {NO_SUCH_DEVICE}"
    else:
        flag, named = [], f"CLIPSEARCH_DEVICE={NO_SUCH_DEVICE}"
        monkeypatch.setenv("CLIPSEARCH_DEVICE", NO_SUCH_DEVICE)
    commands = [
        ["search", "a red circle"],
        ["index", str(tmp_path / "pics")],
        ["serve", "--port", free_port()],
    ]
    for command in commands:
        code, out, err = run_cli([*command, *flag], capsys, monkeypatch)
        assert code == 10, (command, err)
        assert err.startswith(f"error: {named}: ") and out == ""
        assert err.rstrip().endswith("Use cpu, or auto to run on a GPU only where there is one.")
    assert loads == [] and uvicorn_runs == []


def test_the_reason_says_what_is_missing() -> None:
    import torch

    from retrieval.errors import DeviceUnavailable
    from retrieval.models.device import resolve_device

    with pytest.raises(DeviceUnavailable) as info:
        resolve_device(NO_SUCH_DEVICE)
    if not torch.cuda.is_available():
        assert info.value.reason in (
            "this torch build has no CUDA support (a CPU-only build)",
            "no CUDA device is visible (no GPU, no NVIDIA driver, or CUDA_VISIBLE_DEVICES "
            "hides it)",
        )
    else:
        count = torch.cuda.device_count()
        assert info.value.reason == (
            f"only {count} CUDA device(s) visible, cuda:0 to cuda:{count - 1}"
        )
    assert resolve_device("cpu") == "cpu"

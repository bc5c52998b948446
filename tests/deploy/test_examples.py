"""The systemd units and the cron line under examples/deploy run real commands and settings."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from retrieval.config import ENV_PREFIX, Settings, load_settings
from tests.deploy.cli_check import cli_error
from tests.deploy.dockerfiles import ROOT, read_env_file

EXAMPLES = ROOT / "examples" / "deploy"
INSTALLED = "/opt/clipsearch/.venv/bin/clipsearch"
ENV_FILE = "/etc/clipsearch/clipsearch.env"
UNITS = ["clipsearch-index.service", "clipsearch-index.timer", "clipsearch-api.service"]


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string((EXAMPLES / name).read_text())
    return parser


def _clipsearch_args(command: str) -> list[str]:
    words = shlex.split(command)
    assert words[0] == INSTALLED, f"expected {INSTALLED}, got {words[0]}"
    return words[1:]


def test_units_run_real_commands() -> None:
    index = _unit("clipsearch-index.service")["Service"]
    assert index["Type"] == "oneshot"
    args = _clipsearch_args(index["ExecStart"])
    assert args[:2] == ["index", "--since-last-run"] and cli_error(args) is None
    assert index["EnvironmentFile"] == ENV_FILE
    api = _unit("clipsearch-api.service")["Service"]
    args = _clipsearch_args(api["ExecStart"])
    assert args[0] == "serve" and cli_error(args) is None


def test_timer_is_nightly_and_catches_up() -> None:
    timer = _unit("clipsearch-index.timer")["Timer"]
    assert timer["OnCalendar"] == "*-*-* 03:00:00"
    assert timer["Persistent"] == "true"


def test_cron_line_runs_the_nightly_index() -> None:
    lines = [
        line
        for line in (EXAMPLES / "crontab").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert len(lines) == 1
    minute, hour, day, month, weekday, command = lines[0].split(None, 5)
    assert (minute, hour, day, month, weekday) == ("0", "3", "*", "*", "*")
    assert "%" not in command  # cron would turn it into a newline
    assert f". {ENV_FILE};" in command
    invocation = command[command.index(INSTALLED) :].split(">>")[0]
    assert cli_error(_clipsearch_args(invocation)) is None


def test_env_file_sets_real_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    values = read_env_file(EXAMPLES / "clipsearch.env")
    fields = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    assert set(values) <= fields, set(values) - fields
    for key in list(os.environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    assert [str(p) for p in settings.roots] == ["/srv/photos", "/srv/scans"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not found")
def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    """systemd's own parser: unknown keys, bad calendar specs, a missing executable."""
    env_file = tmp_path / "clipsearch.env"
    shutil.copy(EXAMPLES / "clipsearch.env", env_file)
    clipsearch = str(Path(sys.executable).parent / "clipsearch")
    for name in UNITS:
        text = (EXAMPLES / name).read_text()
        text = text.replace(INSTALLED, clipsearch).replace(ENV_FILE, str(env_file))
        (tmp_path / name).write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(str(tmp_path / n) for n in UNITS)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr

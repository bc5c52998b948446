"""The README's configuration table is the Settings class, and its command lines parse."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest

from retrieval.config import ENV_PREFIX, Settings
from retrieval.errors import ConfigError
from tests.deploy.cli_check import cli_error
from tests.deploy.dockerfiles import ROOT

README = ROOT / "README.md"


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def _config_rows() -> list[tuple[list[str], list[str]]]:
    """(variables, defaults) of each table row; `A` / `B` cells name two of each."""
    rows = []
    for line in _section("Configuration").splitlines():
        if not line.startswith("| `" + ENV_PREFIX):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        variables = re.findall(r"`(" + ENV_PREFIX + r"[A-Z0-9_]+)`", cells[0])
        defaults = [part.strip() for part in cells[1].split(" / ")]
        rows.append((variables, defaults))
    return rows


def _documented() -> set[str]:
    return {variable for variables, _ in _config_rows() for variable in variables}


def test_every_setting_is_in_the_readme_table_and_nothing_else() -> None:
    fields = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    documented = _documented()
    assert not fields - documented, f"missing from the README table: {sorted(fields - documented)}"
    assert not documented - fields, f"not Settings fields: {sorted(documented - fields)}"


def _literal_defaults() -> list[tuple[str, str]]:
    """(field, README default) where the README gives one plain literal for one variable."""
    pairs = []
    for variables, defaults in _config_rows():
        if len(defaults) != len(variables):
            defaults = [defaults[0]] * len(variables) if len(variables) == 1 else []
        for variable, default in zip(variables, defaults, strict=False):
            match = re.fullmatch(r"`([^`]*)`", default)
            if match:
                pairs.append((variable.removeprefix(ENV_PREFIX).lower(), match.group(1)))
    return pairs


@pytest.mark.parametrize(("field", "readme_default"), _literal_defaults())
def test_readme_defaults_are_the_real_defaults(field: str, readme_default: str) -> None:
    """Read the README's default the way the environment would be read: same value."""
    info = Settings.model_fields[field]
    if info.default_factory is not None or info.default is None:
        pytest.skip("default is computed, or none (described in words)")
    try:
        given: dict[str, Any] = {field: readme_default}  # as text, like the environment
        parsed = getattr(Settings(**given), field)
    except (ValueError, ConfigError) as exc:
        pytest.fail(f"README default {readme_default!r} for {field} is not a valid value: {exc}")
    assert parsed == info.default, f"{field}: README says {readme_default!r}, code {info.default!r}"


def test_default_check_covers_most_rows() -> None:
    assert len(_literal_defaults()) >= 20


def _readme_command_lines() -> list[tuple[int, list[str]]]:
    """`clipsearch ...` lines in the README's shell blocks, as argument lists."""
    found = []
    in_block = False
    pending = ""
    for number, raw in enumerate(README.read_text().splitlines(), start=1):
        if raw.startswith("```"):
            in_block = raw.strip() in ("```bash", "```sh", "```shell") and not in_block
            continue
        if not in_block:
            continue
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        line, pending = pending + raw, ""
        try:
            words = shlex.split(line, comments=True)
        except ValueError:  # a quoted string goes on over the next lines
            pending = line + "\n"
            continue
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
            words.pop(0)  # VAR=value prefixes
        if words and (words[0] == "clipsearch" or words[0].endswith("/bin/clipsearch")):
            found.append((number, words[1:]))
    return found


def test_readme_command_lines_parse() -> None:
    lines = _readme_command_lines()
    assert len(lines) >= 10
    errors = [f"README.md:{n}: {cli_error(args)}" for n, args in lines if cli_error(args)]
    assert not errors, "\n".join(errors)


def test_readme_says_what_was_exercised_and_what_was_not() -> None:
    development = _section("Development")  # how this project is tested: not in the user's part
    assert "builds no image and starts no container" in development
    for check in ("hadolint", "tests/deploy", "migrate-to", "schedule"):
        assert check in development


def test_readme_links_to_existing_files() -> None:
    for target in re.findall(r"\]\(((?:docker|examples)/[^)#]+)\)", README.read_text()):
        assert (ROOT / target).exists(), f"README links to missing {target}"


def test_readme_has_no_path_to_nowhere() -> None:
    text = _section("Deployment") + _section("Operations")
    for path in re.findall(r"`((?:docker|examples)/[\w./-]+)`", text):
        if path == "docker/.env":
            continue  # the user's copy of docker/.env.example
        assert (ROOT / Path(path)).exists(), f"README names missing {path}"


def test_readme_gives_the_search_columns_in_their_order() -> None:
    """`clipsearch search` prints score, id, path, labels (tests/indexer/cli asserts the header)."""
    commands = _section("Commands")
    start = commands.index("`clipsearch search` prints a header line, then one line per hit:")
    sentence = commands[start : commands.index(".\n", start)]
    columns = re.findall(r"`(\w+)`", sentence.split("per hit:", 1)[1])
    assert columns == ["score", "id", "path", "labels"]

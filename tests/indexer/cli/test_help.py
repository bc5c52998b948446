"""Every command's --help: flags show no `<bool>` placeholder, and every option says its default.

The commands and options are walked from the app itself, so a command or option added later is
held to the same two rules.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import typer.main
from typer.core import TyperOption
from typer.testing import CliRunner

from indexer.cli.app import app
from indexer.cli.options import setting_default

# Options that act rather than take a value: they have no default to speak of.
ACTIONS = {"--help", "--install-completion", "--show-completion"}
WIDE = {"COLUMNS": "250"}  # one line per option, so a sentence is found whole


def _commands(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


def _says_default(option: TyperOption) -> bool:
    if option.required:
        return True  # no default: the help says [required]
    if "default" in (option.help or "").lower():
        return True  # in words: a setting's value, "on a terminal", "all", ...
    if option.is_flag and not option.secondary_opts:
        return not option.default  # a plain flag is off unless given: nothing to say
    # Typer's own "[default: X]" (for --x/--no-x the name of the one in force).
    return option.show_default is not False and option.default not in (None, [], ())


def test_help_shows_no_bool_placeholder_and_says_every_default() -> None:
    runner = CliRunner(env=WIDE)
    commands = list(_commands(typer.main.get_command(app)))
    assert len(commands) > 20  # the walk reaches the subcommands of db, labels and models
    silent: list[str] = []
    for path, command in commands:
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "<bool>" not in result.output, f"clipsearch {' '.join(path)}:\n{result.output}"
        silent += [
            f"clipsearch {' '.join(path)} {option.opts[0]}"
            for option in command.params
            if isinstance(option, TyperOption)
            and option.opts[0] not in ACTIONS
            and not _says_default(option)
        ]
    assert not silent, "options whose --help does not say their default:\n" + "\n".join(silent)


def test_help_gives_a_setting_s_real_default() -> None:
    result = CliRunner(env=WIDE).invoke(app, ["index", "--help"])
    assert "CLIPSEARCH_BATCH_SIZE: images per forward pass (default: 64)." in result.output
    assert f"(default: {setting_default('workers')}: the CPU cores, at most 4)" in result.output
    assert setting_default("data_dir").endswith("clipsearch")

"""How `--help` shows the options of every command: a flag takes no value, so it shows no type.

Typer's rich help prints a type column (`<int>`, `<path>`), and `<bool>` beside a flag, which
reads as if `--json` wanted a value. The root group clears that column for every flag of every
command below it, `--help` included, so a command added later needs nothing of its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from typer.core import TyperGroup, TyperOption

# Typer's Context and Command types live in its private copy of click: Any stands for them.


def _clear_flag_types(params: Iterable[Any]) -> None:
    for param in params:
        if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
            param.metavar = ""  # the rich help shows a metavar, when set, in place of the type


def hide_flag_types(command: Any, ctx: Any) -> None:
    """Clear the type of each flag of `command` and of every command under it."""
    _clear_flag_types(command.get_params(ctx))  # with the --help option, made on first use
    for sub in getattr(command, "commands", {}).values():
        hide_flag_types(sub, ctx)


class ClipsearchGroup(TyperGroup):
    """The `clipsearch` command group: its options and its commands' show flags untyped."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)
        _clear_flag_types(params)
        return params

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            hide_flag_types(command, ctx)
        return command

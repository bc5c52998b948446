"""Check a `clipsearch` argument list against the real Typer app, without running it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import typer

from indexer.cli.app import app


def cli_error(args: Sequence[str]) -> str | None:
    """None when `clipsearch ARGS` names a real command and parses; else why not.

    Subcommands are resolved through the command groups Typer builds, and the leaf command
    parses the remaining words exactly as it would at run time (unknown options, bad values
    and missing arguments all fail), but its callback is never called. Typer vendors its
    own click, so this goes by the objects' methods, not by click's classes.
    """
    command: Any = typer.main.get_command(app)
    words = list(args)
    path = ["clipsearch"]
    while hasattr(command, "list_commands"):
        if not words:
            return f"{' '.join(path)}: no subcommand given"
        name = words.pop(0)
        sub = command.get_command(command.context_class(command), name)
        if sub is None:
            return f"{' '.join(path)}: no such command {name!r}"
        path.append(name)
        command = sub
    try:
        command.make_context(" ".join(path), words)
    except typer.Exit:
        return None  # --help
    except Exception as exc:
        if hasattr(exc, "format_message"):  # click's UsageError, BadParameter, ...
            return f"{' '.join(path)}: {exc.format_message()}"
        raise
    return None

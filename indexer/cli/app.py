"""The `clipsearch` command: every command group registered on one Typer app, and `main`."""

from __future__ import annotations

import logging
import sys
import tempfile
import traceback
from pathlib import Path

import typer

from indexer.cli import (
    db,
    demo,
    export,
    index,
    integrity,
    labels,
    models,
    schedule,
    search,
    serve,
    train,
)
from indexer.cli.help_format import ClipsearchGroup
from indexer.cli.output import INTERRUPTED, UNEXPECTED, exit_code
from retrieval.config import warn_about_unknown_settings
from retrieval.errors import ClipsearchError

# Typer's rich help keeps single newlines, so each paragraph is one line and the terminal wraps.
HELP = (
    "Self-hosted CLIP image search.\n\n"
    "Index image folders with `clipsearch index DIR`, then query them with "
    '`clipsearch search "a red car"`. Every option can also be set with a CLIPSEARCH_* '
    "environment variable (flags win).\n\n"
    "Exit codes: 0 ok (bad images are reported, not fatal), 1 unexpected error, "
    "2 bad setting, usage or input, 3 another indexer is running, 4 model differs from the "
    "index's, 5 model weights (or its ONNX export) unavailable, 6 corrupt shard, 7 not found, "
    "8 the catalog and "
    "the index dir do not belong together (a lost, reset or other index's catalog), 9 the "
    "index is empty (nothing indexed yet), 10 the device asked for (--device, CLIPSEARCH_DEVICE) "
    "is not there, "
    "11 the catalog's schema is older (run clipsearch db upgrade) or newer than this "
    "clipsearch's, 12 the Ray cluster of --engine ray cannot run the job (unreachable, its "
    "workers cannot see the files or the index dir, or no worker can hold the model), "
    "130 interrupted."
)

INTERRUPTED_MESSAGE = "interrupted; nothing uncommitted was published"

app = typer.Typer(
    cls=ClipsearchGroup, help=HELP, no_args_is_help=True, pretty_exceptions_enable=False
)
# Registration order is the order `clipsearch --help` lists the commands in.
app.command()(index.index)
app.command(help=schedule.SCHEDULE_HELP)(schedule.schedule)
app.command()(index.compact)
app.command(help=integrity.VERIFY_HELP)(integrity.verify)
app.command(help=integrity.REPAIR_HELP)(integrity.repair)
app.command()(search.search)
app.command()(search.status)
app.command()(serve.serve)
app.command()(train.finetune)
app.command("eval")(train.evaluate)
app.command()(demo.demo)
app.command()(labels.label)
app.command(help=export.EXPORT_HELP)(export.export)
app.add_typer(db.db_app, name="db")
app.add_typer(labels.labels_app, name="labels")
app.add_typer(models.models_app, name="models")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warn_about_unknown_settings()
    try:
        app()
    except ClipsearchError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exit_code(exc))
    except KeyboardInterrupt:
        typer.echo(INTERRUPTED_MESSAGE, err=True)
        sys.exit(INTERRUPTED)
    except SystemExit as exc:
        if exc.code == INTERRUPTED:  # Typer turns Ctrl-C in a command into a silent exit 130
            typer.echo(INTERRUPTED_MESSAGE, err=True)
        raise
    except Exception as exc:
        # An unreachable database, a full disk, a bug: one line for the user, the traceback
        # kept for a bug report.
        typer.echo(f"error: {type(exc).__name__}: {exc}", err=True)
        saved = save_traceback()
        if saved is not None:
            typer.echo(f"(the traceback is in {saved})", err=True)
        sys.exit(UNEXPECTED)


def save_traceback() -> Path | None:
    """Write the exception being handled to a new file in the temp dir; None if that fails."""
    try:
        with tempfile.NamedTemporaryFile(
            "w", prefix="clipsearch-error-", suffix=".txt", delete=False
        ) as handle:
            traceback.print_exc(file=handle)
            return Path(handle.name)
    except OSError:
        return None

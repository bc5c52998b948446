"""What commands print (JSON, tables, skipped-sample warnings) and the exit code of each error."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import typer

from retrieval.errors import (
    BadQuery,
    CatalogMismatch,
    CatalogNotEmpty,
    CatalogSchemaMismatch,
    ClipsearchError,
    ClusterError,
    ConfigError,
    CorruptShard,
    DeviceUnavailable,
    EmptyIndex,
    ImageError,
    IndexLocked,
    LabelSetError,
    ModelMismatch,
    NotFound,
    TrainedTemplateError,
    TrainingDataError,
    WeightsUnavailable,
)

EXIT_CODES: dict[type[ClipsearchError], int] = {
    ConfigError: 2,
    BadQuery: 2,
    CatalogNotEmpty: 2,
    ImageError: 2,
    LabelSetError: 2,
    TrainingDataError: 2,
    IndexLocked: 3,
    ModelMismatch: 4,
    WeightsUnavailable: 5,
    CorruptShard: 6,
    NotFound: 7,
    CatalogMismatch: 8,
    EmptyIndex: 9,  # NoCatalog too: nothing indexed there yet
    DeviceUnavailable: 10,
    CatalogSchemaMismatch: 11,
    ClusterError: 12,  # --engine ray: the cluster cannot run the job (nothing committed)
    TrainedTemplateError: 6,  # like a corrupt shard: an index file that cannot be used
}
UNEXPECTED = 1  # any other exception: one line on stderr, the traceback saved to a file
INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as shells report it)


def exit_code(error: BaseException) -> int:
    """The documented exit code of an error (1 for anything unexpected)."""
    return next((c for t, c in EXIT_CODES.items() if isinstance(error, t)), UNEXPECTED)


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, default=str))


def echo_table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for number, row in enumerate(rows):
        typer.echo(
            "  ".join(
                cell.rjust(w) if i else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
        )
        if number == 0:
            typer.echo("  ".join("-" * w for w in widths))


def print_warnings(warnings: list[str], limit: int = 20) -> None:
    for warning in warnings[:limit]:
        typer.echo(f"  skipped: {warning}", err=True)
    if len(warnings) > limit:
        typer.echo(f"  ... and {len(warnings) - limit} more (see the report)", err=True)


def utc_text(moment: dt.datetime) -> str:
    # SQLite hands back naive UTC, Postgres aware values in the session's zone.
    aware = moment.replace(tzinfo=dt.UTC) if moment.tzinfo is None else moment
    return aware.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")

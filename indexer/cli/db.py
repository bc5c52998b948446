"""`clipsearch db`: catalog migrations, and copying the catalog to another database."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from indexer.cli.options import (
    DataDirOpt,
    DbOpt,
    IndexDirOpt,
    JsonOpt,
    open_catalog,
    setting_default,
)
from indexer.cli.output import echo_table, print_json
from indexer.cli.reading import open_existing_catalog
from retrieval.config import load_settings

if TYPE_CHECKING:
    from retrieval.catalog.copy import CatalogCopyReport

db_app = typer.Typer(
    help="Catalog database: migrations, and copying it to another database.",
    no_args_is_help=True,
)


@db_app.command("upgrade")
def db_upgrade(data_dir: DataDirOpt = None, database_url: DbOpt = None) -> None:
    """Create the catalog, or migrate it to the newest schema (safe to repeat).

    Only in an empty database or a clipsearch catalog: a database that holds another
    application's tables is refused (exit 2)."""
    from retrieval.catalog.migrate import current_revision

    settings = load_settings(data_dir=data_dir, database_url=database_url)
    catalog = open_catalog(settings)
    catalog.upgrade()
    typer.echo(f"catalog at revision {current_revision(catalog.engine)}")


MIGRATE_TO_HELP = (
    "Copy the whole catalog into another database (SQLite to Postgres), ids kept.\n\n"
    "The target is migrated to the newest schema first and must be empty (or --force). "
    "Every table is copied, parents first, in batches, in one target transaction; row counts "
    "are verified before it commits, and Postgres sequences are moved past the copied ids. "
    "The indexer lock is held meanwhile. The FAISS shard files are not copied: the index dir "
    "stays where it is and serves the new database as it served the old one."
)


TargetUrlArg = Annotated[
    str,
    typer.Argument(
        metavar="URL",
        help="Target database, e.g. postgresql://user:password@host/clipsearch (or "
        "sqlite:///path). Migrated to the newest schema first; must be empty.",
    ),
]
ForceOpt = Annotated[
    bool,
    typer.Option("--force", help="Replace the rows a non-empty target holds (default: refuse)."),
]
RowsPerBatchOpt = Annotated[int, typer.Option(min=1, help="Rows per insert batch.")]
CopyProgressOpt = Annotated[
    bool | None,
    typer.Option("--progress/--no-progress", help="Progress bar (default: on a terminal)."),
]
SourceDbOpt = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        help="The source catalog (default: CLIPSEARCH_DATABASE_URL, else "
        f"{setting_default('database_url')}).",
    ),
]


@db_app.command("migrate-to", help=MIGRATE_TO_HELP)
def db_migrate_to(
    target_url: TargetUrlArg,
    force: ForceOpt = False,
    batch_size: RowsPerBatchOpt = 5000,
    progress: CopyProgressOpt = None,
    data_dir: DataDirOpt = None,
    database_url: SourceDbOpt = None,
    index_dir: IndexDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Copy the whole catalog into another database (SQLite to Postgres), ids kept."""
    from tqdm import tqdm

    from indexer.binding import hand_over
    from indexer.lock import IndexLock
    from retrieval.catalog.copy import copy_catalog
    from retrieval.config import normalise_database_url

    settings = load_settings(data_dir=data_dir, database_url=database_url, index_dir=index_dir)
    try:
        target = normalise_database_url(target_url)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="URL") from None
    # The source must be a catalog at this clipsearch's revision: none is created or migrated.
    source_catalog = open_existing_catalog(settings)
    target_catalog = open_catalog(settings.model_copy(update={"database_url": target}))
    bar = tqdm(desc="copy", unit=" rows", disable=None if progress is None else not progress)

    def on_progress(table: str, rows: int, total: int) -> None:
        bar.total = total
        bar.set_postfix(table=table, refresh=False)
        bar.update(rows)

    try:
        # No indexer may commit to the source while it is copied.
        with IndexLock(settings.resolved_index_dir):
            report = copy_catalog(
                source_catalog,
                target_catalog,
                force=force,
                batch_size=batch_size,
                on_progress=on_progress,
            )
            # From now on the index dir is written through the copy only (the source may
            # still read it): two writers would take each other's new shards for orphans.
            handed_over = hand_over(source_catalog, target_catalog, settings.resolved_index_dir)
    finally:
        bar.close()
        source_catalog.dispose()
        target_catalog.dispose()
    if as_json:
        print_json(
            {
                **report.to_dict(),
                "index_dir": str(settings.resolved_index_dir),
                "index_id": handed_over,
            }
        )
        return
    _echo_copy(report, target, settings.resolved_index_dir)
    if handed_over:
        typer.echo(
            "the index dir is now written through the new catalog only: the old one can "
            "still be searched, and its index jobs refuse (exit 8)"
        )


def _echo_copy(report: CatalogCopyReport, target: str, index_dir: Path) -> None:
    from retrieval.catalog.copy import display_url

    typer.echo(
        f"copied {report.rows} rows in {len(report.tables)} tables from {report.source} to "
        f"{report.target} in {report.seconds:.1f}s; row counts verified"
        + (
            f"; replaced {report.replaced_rows} rows the target held"
            if report.replaced_rows
            else ""
        )
    )
    echo_table([["table", "rows"], *([t.name, str(t.rows)] for t in report.tables)])
    if report.sequences_reset:
        typer.echo(f"sequences moved past the copied ids: {', '.join(report.sequences_reset)}")
    typer.echo(
        f"next: set CLIPSEARCH_DATABASE_URL={display_url(target)} for every clipsearch process "
        f"and keep CLIPSEARCH_INDEX_DIR={index_dir} (shard files are shared, "
        "not copied); the source catalog is left as it was."
    )

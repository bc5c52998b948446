"""The `clipsearch` command. Domain errors become one-line messages and exit codes here."""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from retrieval.config import Settings, load_settings
from retrieval.errors import (
    BadQuery,
    CatalogNotEmpty,
    ClipsearchError,
    ConfigError,
    CorruptShard,
    ImageError,
    IndexLocked,
    LabelSetError,
    ModelMismatch,
    NotFound,
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
}

# Typer's rich help keeps single newlines, so each paragraph is one line and the terminal wraps.
HELP = (
    "Self-hosted CLIP image search.\n\n"
    "Index image folders with `clipsearch index DIR`, then query them with "
    '`clipsearch search "a red car"`. Every option can also be set with a CLIPSEARCH_* '
    "environment variable (flags win).\n\n"
    "Exit codes: 0 ok (bad images are reported, not fatal), 1 unexpected error, "
    "2 bad setting, usage or input, 3 another indexer is running, 4 model differs from the "
    "index's, 5 model weights unavailable, 6 corrupt shard, 7 not found."
)

app = typer.Typer(help=HELP, no_args_is_help=True, pretty_exceptions_enable=False)
db_app = typer.Typer(
    help="Catalog database: migrations, and copying it to another database.",
    no_args_is_help=True,
)
app.add_typer(db_app, name="db")

DataDirOpt = Annotated[
    Path | None, typer.Option("--data-dir", help="CLIPSEARCH_DATA_DIR: where state lives.")
]
DbOpt = Annotated[
    str | None,
    typer.Option("--database-url", help="CLIPSEARCH_DATABASE_URL (sqlite:/// or postgresql://)."),
]
IndexDirOpt = Annotated[
    Path | None, typer.Option("--index-dir", help="CLIPSEARCH_INDEX_DIR: FAISS shard files.")
]
ModelOpt = Annotated[
    str | None, typer.Option("--model", help="CLIPSEARCH_MODEL: open_clip architecture name.")
]
PretrainedOpt = Annotated[
    str | None,
    typer.Option("--pretrained", help="CLIPSEARCH_PRETRAINED: pretrained tag or checkpoint path."),
]
DeviceOpt = Annotated[
    str | None, typer.Option("--device", help="CLIPSEARCH_DEVICE: auto, cpu, cuda or cuda:N.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")]
# The options `index` and `schedule` share (each one overrides its setting for this run).
KindOpt = Annotated[
    str | None,
    typer.Option(help="CLIPSEARCH_INDEX_KIND for new shards: auto, flat, hnsw, ivf, ivfpq."),
]
BatchSizeOpt = Annotated[int | None, typer.Option(help="CLIPSEARCH_BATCH_SIZE.")]
WorkersOpt = Annotated[
    int | None, typer.Option(help="CLIPSEARCH_WORKERS: decoder processes (0 = inline).")
]
ShardSizeOpt = Annotated[
    int | None, typer.Option(help="CLIPSEARCH_SHARD_SIZE: vectors per shard and commit.")
]
ProgressOpt = Annotated[
    bool | None,
    typer.Option("--progress/--no-progress", help="Progress bars (default: on a terminal)."),
]


def _settings(**overrides: Any) -> Settings:
    return load_settings(**overrides)


def _catalog(settings: Settings) -> Any:
    from retrieval.catalog import Catalog

    return Catalog(settings.resolved_database_url)


def _encoder_factory(settings: Settings) -> Any:
    def build() -> Any:
        from retrieval.encoder import encoder_from_settings

        return encoder_from_settings(settings)

    return build


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, default=str))


def _index_summary(report: Any) -> str:
    return (
        f"generation {report.generation}: {report.new} new, {report.changed} changed, "
        f"{report.moved} moved, {report.copied} copied, {report.deleted} deleted, "
        f"{report.unchanged} unchanged, {len(report.failed)} failed "
        f"in {report.seconds:.1f}s"
        + (f" ({report.images_per_second:.1f} images/s encoded)" if report.encoded else "")
    )


def _utc_text(moment: dt.datetime) -> str:
    # SQLite hands back naive UTC, Postgres aware values in the session's zone.
    aware = moment.replace(tzinfo=dt.UTC) if moment.tzinfo is None else moment
    return aware.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _previous_index_run(catalog: Any) -> dict[str, Any] | None:
    """The newest finished `index` job in the catalog, as plain data."""
    catalog.upgrade()
    for job in catalog.jobs(limit=100):
        if job.kind == "index" and job.status != "running":
            return {
                "job": job.id,
                "status": job.status,
                "started_at": job.started_at,
                "finished_at": job.finished_at,
                "generation": job.generation,
                "roots": job.roots,
            }
    return None


@app.command()
def index(
    roots: Annotated[
        list[Path] | None,
        typer.Argument(help="Image folders to index (default: CLIPSEARCH_ROOTS)."),
    ] = None,
    kind: KindOpt = None,
    batch_size: BatchSizeOpt = None,
    workers: WorkersOpt = None,
    shard_size: ShardSizeOpt = None,
    progress: ProgressOpt = None,
    since_last_run: Annotated[
        bool,
        typer.Option(
            "--since-last-run",
            help="For nightly jobs: require a previous index run in this catalog and report "
            "the changes since it. Every run is incremental anyway (it diffs the files against "
            "the catalog); this refuses an empty catalog (exit 2), so a job pointed at the "
            "wrong database or a lost volume does not silently re-encode everything.",
        ),
    ] = False,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
    index_dir: IndexDirOpt = None,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Index new, changed, moved and deleted images under ROOTS (incremental, crash-safe)."""
    from indexer.pipeline import IndexJob

    settings = _settings(
        data_dir=data_dir,
        database_url=database_url,
        index_dir=index_dir,
        model=model,
        pretrained=pretrained,
        device=device,
        index_kind=kind,
        batch_size=batch_size,
        workers=workers,
        shard_size=shard_size,
    )
    chosen_roots = [str(r) for r in (roots or settings.roots)]
    catalog = _catalog(settings)
    previous = _previous_index_run(catalog) if since_last_run else None
    if since_last_run and previous is None:
        raise typer.BadParameter(
            f"the catalog {settings.resolved_database_url} has no previous index run. Check "
            "CLIPSEARCH_DATABASE_URL; for the very first run, leave this flag out (a first "
            "run encodes every image).",
            param_hint="'--since-last-run'",
        )
    job = IndexJob(settings, catalog, _encoder_factory(settings), progress=progress)
    report = job.run(chosen_roots)
    if as_json:
        _print_json({**report.to_dict(), **({"since": previous} if since_last_run else {})})
        return
    if previous is not None:
        typer.echo(
            f"since job {previous['job']} ({previous['status']}, started "
            f"{_utc_text(previous['started_at'])}):"
        )
    typer.echo(_index_summary(report))
    for failure in report.failed:
        typer.echo(f"  failed  {failure.reason:<18} {failure.path}  ({failure.detail})")
    for set_name, count in report.labelled.items():
        if count:
            typer.echo(f"  labelled {count} images with label set {set_name}")


def _local_text(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch).astimezone().isoformat(timespec="seconds")


def _duration_text(seconds: float) -> str:
    """24h, 1h30m, 5m, 2s: the units --every accepts, largest first, zeros left out."""
    rest = max(0, round(seconds))
    parts = []
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        count, rest = divmod(rest, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts[:2]) or "0s"


SCHEDULE_HELP = (
    "Run `index` now and then on a schedule (default nightly) until SIGTERM or Ctrl-C.\n\n"
    "Each run is an ordinary incremental index job under the single-writer lock. A failed run "
    "is reported and the schedule goes on. A stop signal ends the wait at once, or interrupts "
    "a run in progress (what it committed is kept) and exits 0. With --max-runs the exit code "
    "is that of the last run."
)


@app.command(help=SCHEDULE_HELP)
def schedule(
    roots: Annotated[
        list[Path] | None,
        typer.Argument(help="Image folders to index (default: CLIPSEARCH_ROOTS)."),
    ] = None,
    every: Annotated[
        str | None,
        typer.Option(
            "--every",
            help="CLIPSEARCH_INDEX_EVERY: time between run starts, e.g. 24h, 6h, 30m, 1h30m "
            "(default 24h). A run that overruns skips the slots it covered.",
        ),
    ] = None,
    at: Annotated[
        str | None,
        typer.Option(
            "--at",
            help="CLIPSEARCH_INDEX_AT: align runs to this local time, HH:MM (e.g. 03:00); "
            "runs then start at HH:MM plus whole multiples of --every.",
        ),
    ] = None,
    run_at_start: Annotated[
        bool,
        typer.Option(
            "--run-at-start/--wait-for-slot",
            help="Run once at start-up (cheap when nothing changed), or wait for the first slot.",
        ),
    ] = True,
    max_runs: Annotated[
        int | None, typer.Option(min=1, help="Stop after this many runs (default: never).")
    ] = None,
    kind: KindOpt = None,
    batch_size: BatchSizeOpt = None,
    workers: WorkersOpt = None,
    shard_size: ShardSizeOpt = None,
    progress: ProgressOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
    index_dir: IndexDirOpt = None,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    device: DeviceOpt = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per run on stdout; notes on stderr.")
    ] = False,
) -> None:
    """Run `index` now and then on a schedule (default nightly) until SIGTERM or Ctrl-C."""
    from indexer.pipeline import IndexJob, IndexReport
    from indexer.schedule import (
        ScheduleConfig,
        ScheduledRun,
        Scheduler,
        stop_on_signals,
    )
    from retrieval.config import parse_time_of_day

    settings = _settings(
        data_dir=data_dir,
        database_url=database_url,
        index_dir=index_dir,
        model=model,
        pretrained=pretrained,
        device=device,
        index_kind=kind,
        batch_size=batch_size,
        workers=workers,
        shard_size=shard_size,
        index_every=every,
        index_at=at,
    )
    chosen_roots = [str(r) for r in (roots or settings.roots)]
    if not chosen_roots:
        raise ConfigError(
            "CLIPSEARCH_ROOTS", "no image folders given (pass ROOT arguments or set it)"
        )
    config = ScheduleConfig(
        every_seconds=settings.index_every,
        at=parse_time_of_day(settings.index_at) if settings.index_at else None,
        max_runs=max_runs,
        run_at_start=run_at_start,
    )
    catalog = _catalog(settings)

    def run_job() -> IndexReport:
        # The model loads only when a run has something to encode, and is dropped after.
        job = IndexJob(settings, catalog, _encoder_factory(settings), progress=progress)
        return job.run(chosen_roots)

    def on_run(run: ScheduledRun) -> None:
        stamp = run.started_at.isoformat(timespec="seconds")
        if as_json:
            _print_json(
                {
                    "run": run.number,
                    "started_at": stamp,
                    "seconds": round(run.seconds, 3),
                    "ok": run.ok,
                    "report": run.report.to_dict() if run.report else None,
                    "error": str(run.error) if run.error else None,
                }
            )
        elif run.report is not None:
            typer.echo(f"{stamp} run {run.number}: {_index_summary(run.report)}")
            for failure in run.report.failed:
                typer.echo(f"  failed  {failure.reason:<18} {failure.path}  ({failure.detail})")
        if run.error is not None:
            what = "" if isinstance(run.error, ClipsearchError) else f"{type(run.error).__name__}: "
            typer.echo(
                f"{stamp} run {run.number} failed after {run.seconds:.1f}s: {what}{run.error}"
                + ("" if run.number == max_runs else "; the schedule goes on"),
                err=True,
            )

    def on_wait(slot: float, skipped: int) -> None:
        note = f" (the last run overran the interval: {skipped} skipped)" if skipped else ""
        typer.echo(
            f"next run at {_local_text(slot)} (in {_duration_text(slot - time.time())}){note}",
            err=as_json,
        )

    typer.echo(
        f"indexing {', '.join(chosen_roots)} every {_duration_text(config.every_seconds)}"
        + (f" aligned to {settings.index_at} local time" if settings.index_at else "")
        + "; SIGTERM or Ctrl-C stops",
        err=as_json,
    )
    scheduler = Scheduler(run_job, config, on_run=on_run, on_wait=on_wait)
    with stop_on_signals(scheduler):
        summary = scheduler.run()
    catalog.dispose()
    if summary.stopped_by is not None:
        during = (
            f" during run {summary.runs + 1} (what it committed is kept)"
            if summary.interrupted_run
            else ""
        )
        typer.echo(
            f"stopped by {summary.stopped_by}{during} after {summary.runs} runs "
            f"({summary.failed} failed)",
            err=True,
        )
        return
    last = summary.last
    if last is not None and last.error is not None:
        error = last.error
        code = next((c for t, c in EXIT_CODES.items() if isinstance(error, t)), 1)
        raise typer.Exit(code)


@app.command()
def compact(
    kind: Annotated[
        str, typer.Option(help="Index kind for the merged shards: auto, flat, hnsw, ivf, ivfpq.")
    ] = "auto",
    merge_all: Annotated[bool, typer.Option("--all", help="Rewrite every shard.")] = False,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
    index_dir: IndexDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Merge small shards and drop deleted vectors, from stored embeddings (no re-encoding)."""
    from indexer.jobs import compact_index
    from retrieval.faiss_gpu import resolve_faiss_gpu

    settings = _settings(
        data_dir=data_dir, database_url=database_url, index_dir=index_dir, index_kind=kind
    )
    report = compact_index(
        _catalog(settings),
        settings.resolved_index_dir,
        kind=settings.index_kind,
        shard_size=settings.shard_size,
        merge_all=merge_all,
        grace_seconds=settings.retire_grace_seconds,
        use_gpu=resolve_faiss_gpu(settings.faiss_gpu, settings.device),
    )
    if as_json:
        _print_json(report.to_dict())
        return
    typer.echo(
        f"generation {report.generation}: {report.shards_before} shards -> {report.shards_after}, "
        f"dropped {report.dropped_vectors} deleted vectors, {report.live_vectors} vectors rewritten"
    )


@app.command()
def search(
    query: Annotated[str | None, typer.Argument(help="Text to search for.")] = None,
    image: Annotated[
        Path | None, typer.Option("--image", help="Search by this image instead of text.")
    ] = None,
    k: Annotated[int, typer.Option("-k", help="Number of results.")] = 10,
    label_names: Annotated[
        list[str] | None,
        typer.Option("--label", help="Only images carrying this zero-shot label (repeatable)."),
    ] = None,
    labels_mode: Annotated[
        str, typer.Option(help="With several --label: any (one of them) or all.")
    ] = "any",
    label_min_score: Annotated[
        float, typer.Option(help="Smallest probability a --label counts with.")
    ] = 0.0,
    label_set: Annotated[
        str | None, typer.Option(help="Match --label in this label set only (default: all).")
    ] = None,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
    index_dir: IndexDirOpt = None,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Search the index from the shell by text or by an example image."""
    from retrieval.faiss_gpu import placement_from_settings
    from retrieval.filters import SearchFilters, allowed_ids
    from retrieval.search import Searcher, SearchOptions

    if (query is None) == (image is None):
        raise ConfigError("query", "give either a text QUERY or --image PATH")
    settings = _settings(
        data_dir=data_dir,
        database_url=database_url,
        index_dir=index_dir,
        model=model,
        pretrained=pretrained,
        device=device,
    )
    catalog = _catalog(settings)
    catalog.upgrade()
    searcher = Searcher(
        catalog,
        settings.resolved_index_dir,
        _encoder_factory(settings)(),
        SearchOptions(
            ef_search=settings.hnsw_ef_search,
            nprobe=settings.ivf_nprobe,
            jpeg_draft=settings.jpeg_draft,
        ),
        gpu=placement_from_settings(settings.faiss_gpu, settings.device),
    )
    try:
        filters = SearchFilters(
            labels=tuple(label_names or ()),
            labels_mode=labels_mode,
            label_min_score=label_min_score,
            label_set=label_set,
        )
        ids = allowed_ids(catalog, filters, searcher.labels) if label_names else None
        if image is not None:
            result = searcher.search_image(
                image, k, max_pixels=settings.max_image_pixels, allowed_ids=ids
            )
        else:
            assert query is not None
            result = searcher.search_text(query, k, allowed_ids=ids)
    finally:
        searcher.close()
    if as_json:
        _print_json(result.to_dict())
        return
    if not result.hits:
        typer.echo("no results (is anything indexed? run `clipsearch index DIR`)")
    for hit in result.hits:
        labels = ", ".join(f"{x.label} {x.score:.2f}" for x in hit.labels[:3])
        suffix = f"  [{labels}]" if labels else ""
        typer.echo(f"{hit.score:8.4f}  {hit.id:>8}  {hit.path}{suffix}")


@app.command()
def status(
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
    index_dir: IndexDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show the index generation, shard and image counts, model, and recent failures."""
    settings = _settings(data_dir=data_dir, database_url=database_url, index_dir=index_dir)
    catalog = _catalog(settings)
    catalog.upgrade()
    state = catalog.state()
    shards = catalog.shards()
    counts = catalog.counts()
    info = {
        "generation": state.generation,
        "model": state.model,
        "shards": [{"id": s.id, "kind": s.kind, "count": s.count} for s in shards],
        "images": counts,
        "database": settings.resolved_database_url,
        "index_dir": str(settings.resolved_index_dir),
    }
    if as_json:
        _print_json(info)
        return
    model_name = f"{state.model['name']} / {state.model['pretrained']}" if state.model else "none"
    typer.echo(f"generation {state.generation}, model {model_name}")
    typer.echo(
        f"images: {counts.get('active', 0)} active, {counts.get('deleted', 0)} deleted, "
        f"{counts.get('error', 0)} failed; {len(shards)} shards "
        f"({sum(s.count for s in shards)} vectors)"
    )


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="CLIPSEARCH_HOST: address to bind.")] = None,
    port: Annotated[int | None, typer.Option(help="CLIPSEARCH_PORT: port to bind.")] = None,
    workers: Annotated[
        int, typer.Option("--workers", help="uvicorn worker processes (each loads the model).")
    ] = 1,
) -> None:
    """Run the HTTP API (uvicorn, factory api.app:create_app); settings come from CLIPSEARCH_*."""
    import uvicorn

    settings = _settings(host=host, port=port)  # validates the environment before forking
    uvicorn.run(
        "api.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=workers,
        log_level="info",
        timeout_graceful_shutdown=10,
    )


@db_app.command("upgrade")
def db_upgrade(data_dir: DataDirOpt = None, database_url: DbOpt = None) -> None:
    """Create or migrate the catalog schema to the newest version (safe to repeat)."""
    from retrieval.migrate import current_revision

    settings = _settings(data_dir=data_dir, database_url=database_url)
    catalog = _catalog(settings)
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


@db_app.command("migrate-to", help=MIGRATE_TO_HELP)
def db_migrate_to(
    target_url: Annotated[
        str,
        typer.Argument(
            metavar="URL",
            help="Target database, e.g. postgresql://user:password@host/clipsearch (or "
            "sqlite:///path). Migrated to the newest schema first; must be empty.",
        ),
    ],
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Replace the rows a non-empty target holds (default: refuse)."
        ),
    ] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Rows per insert batch.")] = 5000,
    progress: Annotated[
        bool | None,
        typer.Option("--progress/--no-progress", help="Progress bar (default: on a terminal)."),
    ] = None,
    data_dir: DataDirOpt = None,
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url", help="The source catalog (default CLIPSEARCH_DATABASE_URL)."
        ),
    ] = None,
    index_dir: IndexDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Copy the whole catalog into another database (SQLite to Postgres), ids kept."""
    from tqdm import tqdm

    from indexer.jobs import IndexLock
    from retrieval.catalog_copy import copy_catalog, display_url
    from retrieval.config import normalise_database_url

    settings = _settings(data_dir=data_dir, database_url=database_url, index_dir=index_dir)
    try:
        target = normalise_database_url(target_url)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="URL") from None
    source_catalog = _catalog(settings)
    target_catalog = _catalog(settings.model_copy(update={"database_url": target}))
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
    finally:
        bar.close()
        source_catalog.dispose()
        target_catalog.dispose()
    if as_json:
        _print_json({**report.to_dict(), "index_dir": str(settings.resolved_index_dir)})
        return
    typer.echo(
        f"copied {report.rows} rows in {len(report.tables)} tables from {report.source} to "
        f"{report.target} in {report.seconds:.1f}s; row counts verified"
        + (
            f"; replaced {report.replaced_rows} rows the target held"
            if report.replaced_rows
            else ""
        )
    )
    _echo_table([["table", "rows"], *([t.name, str(t.rows)] for t in report.tables)])
    if report.sequences_reset:
        typer.echo(f"sequences moved past the copied ids: {', '.join(report.sequences_reset)}")
    typer.echo(
        f"next: set CLIPSEARCH_DATABASE_URL={display_url(target)} for every clipsearch process "
        f"and keep CLIPSEARCH_INDEX_DIR={settings.resolved_index_dir} (shard files are shared, "
        "not copied); the source catalog is left as it was."
    )


# --------------------------------------------------------------------------------------------
# finetune and eval


def _print_warnings(warnings: list[str], limit: int = 20) -> None:
    for warning in warnings[:limit]:
        typer.echo(f"  skipped: {warning}", err=True)
    if len(warnings) > limit:
        typer.echo(f"  ... and {len(warnings) - limit} more (see the report)", err=True)


@app.command()
def finetune(
    data: Annotated[
        Path,
        typer.Argument(
            help="Training data: a .csv/.jsonl of image,caption pairs (paths relative to the "
            "file; optional label column), a class folder root/<class>/*.jpg, or a folder of "
            "labelme .json files (each rectangle becomes a crop of its label)."
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Checkpoint to write (.pt); <name>.report.json is written beside it. Use it "
            "anywhere as --pretrained PATH (or CLIPSEARCH_PRETRAINED).",
        ),
    ],
    data_format: Annotated[
        str, typer.Option("--format", help="auto, csv, jsonl, folder or labelme.")
    ] = "auto",
    templates: Annotated[
        str,
        typer.Option(
            help="Captions for class folders and labelme labels: a set (openai, simple, photo), "
            "a file with one template per line, or literal templates with {} joined by '|'. "
            "Each use of a sample draws one."
        ),
    ] = "photo",
    epochs: Annotated[float, typer.Option(help="Passes over the training split.")] = 1.0,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps; overrides --epochs.")] = None,
    batch_size: Annotated[
        int, typer.Option(help="Contrastive batch: the pairs that see each other as negatives.")
    ] = 64,
    accum: Annotated[
        int,
        typer.Option(
            help="Gradient accumulation: micro-batches per optimizer step (each micro-batch "
            "keeps its own negatives)."
        ),
    ] = 1,
    lr: Annotated[
        float,
        typer.Option(help="Peak learning rate: ~1e-5 for a pretrained model, ~1e-3 from scratch."),
    ] = 1e-5,
    warmup: Annotated[
        float, typer.Option(help="Fraction of steps with linear warmup; cosine decay after.")
    ] = 0.1,
    weight_decay: Annotated[float, typer.Option(help="AdamW decay on weight matrices.")] = 0.1,
    loss: Annotated[
        str,
        typer.Option(
            help="clip: open_clip's ClipLoss. class-aware: each image against the batch's "
            "distinct captions, same class (or same caption) counted as one positive. auto: "
            "class-aware when captions or classes repeat in the training data, else clip."
        ),
    ] = "auto",
    image_pairs: Annotated[
        float,
        typer.Option(
            help="class-aware only: weight of an image-to-image term (same class = positive) "
            "that tightens each class for search by example; 0 turns it off."
        ),
    ] = 0.0,
    freeze: Annotated[
        str, typer.Option(help="Keep one tower as loaded: none, image or text.")
    ] = "none",
    val_fraction: Annotated[
        float, typer.Option(help="Held-out fraction (stratified by class) for the report.")
    ] = 0.1,
    seed: Annotated[int, typer.Option(help="Seeds init (random), split, order and captions.")] = 0,
    amp: Annotated[
        bool, typer.Option("--amp/--no-amp", help="Mixed precision on CUDA (no-op on CPU).")
    ] = True,
    patch_dropout: Annotated[
        float, typer.Option(help="Fraction of ViT patches dropped while training (FLIP).")
    ] = 0.0,
    progress: Annotated[
        bool | None,
        typer.Option("--progress/--no-progress", help="Progress bar (default: on a terminal)."),
    ] = None,
    model: ModelOpt = None,
    pretrained: Annotated[
        str | None,
        typer.Option(
            "--pretrained",
            help="Starting weights: a tag, a checkpoint path, or none for random init "
            "(default CLIPSEARCH_PRETRAINED).",
        ),
    ] = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Fine-tune the CLIP model contrastively and write a checkpoint plus a JSON report."""
    from retrieval.finetune import FinetuneConfig
    from retrieval.finetune import finetune as run_finetune
    from retrieval.prompts import resolve_templates

    settings = _settings(model=model, pretrained=pretrained, device=device)
    config = FinetuneConfig(
        data=data,
        out=out,
        model=settings.model,
        pretrained=settings.pretrained,
        data_format=data_format,
        templates=resolve_templates(templates, "--templates"),
        epochs=epochs,
        steps=steps,
        batch_size=batch_size,
        accum_steps=accum,
        lr=lr,
        warmup=warmup,
        weight_decay=weight_decay,
        loss=loss,
        image_pairs=image_pairs,
        freeze=freeze,
        val_fraction=val_fraction,
        seed=seed,
        device=settings.device,
        amp=amp,
        patch_dropout=patch_dropout,
        max_pixels=settings.max_image_pixels,
        workers=max(1, settings.workers),
        config_dir=settings.model_config_dir,
        cache_dir=settings.model_cache_dir,
    )
    result = run_finetune(config, progress=progress)
    if as_json:
        _print_json(result.report)
        return
    report = result.report
    zero_shot = report["val_zero_shot"]
    typer.echo(
        f"wrote {result.checkpoint} ({report['steps']} steps, {report['epochs']} epochs, "
        f"{report['loss']} loss, {report['seconds']:.1f}s)"
    )
    typer.echo(
        f"  train loss {report['final_train_loss']}, val loss {report['val_loss']}"
        + (f", val zero-shot top-1 {zero_shot['top1']:.3f}" if zero_shot else "")
    )
    typer.echo(f"  report {result.report_path}")
    if result.warnings:
        typer.echo(f"{len(result.warnings)} samples or annotations skipped:", err=True)
        _print_warnings(result.warnings)


def _echo_table(rows: list[list[str]]) -> None:
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


def _echo_eval(results: dict[str, Any]) -> None:
    if "retrieval" in results:
        r = results["retrieval"]
        typer.echo(f"retrieval on {r['data']} ({r['images']} images, {r['captions']} captions)")
        rows = [["direction", "R@1", "R@5", "R@10", "mean rank", "median rank"]]
        for name in ("text_to_image", "image_to_text"):
            d = r["metrics"][name]
            rows.append(
                [
                    name.replace("_", " "),
                    *(f"{d[f'R@{k}']:.3f}" for k in (1, 5, 10)),
                    f"{d['mean_rank']:.2f}",
                    f"{d['median_rank']:g}",
                ]
            )
        _echo_table(rows)
        m = r["metrics"]
        if m["class_queries"]:
            typer.echo(
                f"  captions with >= 5 images: {m['class_queries']}; top-5 all relevant "
                f"{m['all_relevant@5']:.3f}, precision@5 {m['precision@5']:.3f}"
            )
    if "zero_shot" in results:
        z = results["zero_shot"]
        report = z["metrics"]
        typer.echo(
            f"zero-shot on {z['data']} ({report['single_prompt']['images']} images, "
            f"{report['single_prompt']['classes']} classes)"
        )
        rows = [["prompts", "top-1", "top-5"]]
        for label, key in (
            (f"single: {report['prompt']}", "single_prompt"),
            (f"ensemble of {report['templates']} templates", "template_ensemble"),
        ):
            rows.append([label, f"{report[key]['top1']:.3f}", f"{report[key]['top5']:.3f}"])
        _echo_table(rows)
    if "ann" in results:
        a = results["ann"]
        typer.echo(
            f"ANN quality of the live index: {a['vectors']} vectors, {a['queries']} held-out "
            f"queries, recall@{a['k']} against exact search (efSearch {a['ef_search']}, "
            f"nprobe {a['nprobe']})"
        )
        rows = [["kind", "built as", f"recall@{a['k']}", "p50 ms", "p95 ms", "build s"]]
        for kind in a["kinds"]:
            rows.append(
                [
                    kind["kind"],
                    kind["built"],
                    f"{kind['recall']:.3f}",
                    f"{kind['latency_ms_p50']:.3f}",
                    f"{kind['latency_ms_p95']:.3f}",
                    f"{kind['build_seconds']:.2f}",
                ]
            )
        _echo_table(rows)


@app.command("eval")
def evaluate(
    retrieval_set: Annotated[
        Path | None,
        typer.Option(
            "--retrieval",
            help="Captioned set (.csv/.jsonl, class folder or labelme): text->image and "
            "image->text R@1/5/10 and mean rank.",
        ),
    ] = None,
    zero_shot_set: Annotated[
        Path | None,
        typer.Option(
            "--zero-shot",
            help="Set with classes (class folder, labelme, or a table with a label column): "
            "top-1/top-5 accuracy, single prompt and template ensemble side by side.",
        ),
    ] = None,
    ann: Annotated[
        bool,
        typer.Option(
            "--ann",
            help="Recall@k of each index kind (flat, hnsw, ivf, ivfpq), built from the live "
            "index's stored embeddings, against exact search; with query latency.",
        ),
    ] = False,
    prompt: Annotated[
        str,
        typer.Option(
            help="The single zero-shot prompt, {} being the class name; also the caption of "
            "class-folder and labelme images in --retrieval."
        ),
    ] = "a photo of a {}.",
    templates: Annotated[
        str,
        typer.Option(
            help="The zero-shot ensemble: openai, simple, photo, a file, or 'a {}|the {}'."
        ),
    ] = "openai",
    data_format: Annotated[
        str, typer.Option("--format", help="auto, csv, jsonl, folder or labelme.")
    ] = "auto",
    k: Annotated[int, typer.Option("-k", help="k for ANN recall.")] = 10,
    ann_queries: Annotated[int, typer.Option(help="Stored vectors held out as ANN queries.")] = 200,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
    index_dir: IndexDirOpt = None,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Measure retrieval, zero-shot accuracy and ANN recall; a table, or --json."""
    from retrieval import evaluate as ev
    from retrieval.prompts import resolve_templates
    from retrieval.training_data import load_training_set

    if retrieval_set is None and zero_shot_set is None and not ann:
        raise ConfigError("eval", "give --retrieval PATH, --zero-shot PATH and/or --ann")
    settings = _settings(
        data_dir=data_dir,
        database_url=database_url,
        index_dir=index_dir,
        model=model,
        pretrained=pretrained,
        device=device,
    )
    ensemble = resolve_templates(templates, "--templates")
    single = resolve_templates(prompt, "--prompt")[0]
    results: dict[str, Any] = {}
    warnings: list[str] = []
    if retrieval_set is not None or zero_shot_set is not None:
        encoder = _encoder_factory(settings)()
        results["model"] = encoder.identity.to_dict()
        embedded: dict[Path, Any] = {}
        sets = {}
        for path in (retrieval_set, zero_shot_set):
            if path is not None and path not in sets:
                # Class folders get --prompt captions for retrieval; zero-shot passes its
                # templates itself.
                sets[path] = load_training_set(
                    path, fmt=data_format, templates=(single,), max_pixels=settings.max_image_pixels
                )
                warnings += sets[path].warnings
                embedded[path] = ev.embed_set_images(
                    encoder, sets[path], max_pixels=settings.max_image_pixels
                )
                warnings += embedded[path].warnings
        if retrieval_set is not None:
            metrics, used = ev.evaluate_retrieval(
                encoder, sets[retrieval_set], embedded=embedded[retrieval_set]
            )
            results["retrieval"] = {
                "data": str(retrieval_set),
                "images": len(used.sample_indices),
                "captions": len(
                    {sets[retrieval_set].samples[i].caption for i in used.sample_indices}
                ),
                "metrics": metrics.to_dict(),
            }
        if zero_shot_set is not None:
            zero_shot, _ = ev.evaluate_zero_shot(
                encoder,
                sets[zero_shot_set],
                prompt=single,
                templates=ensemble,
                embedded=embedded[zero_shot_set],
            )
            results["zero_shot"] = {"data": str(zero_shot_set), "metrics": zero_shot.to_dict()}
    if ann:
        catalog = _catalog(settings)
        catalog.upgrade()
        vectors = ev.live_embeddings(catalog, settings.resolved_index_dir)
        report = ev.ann_quality(
            vectors,
            k=k,
            queries=ann_queries,
            ef_search=settings.hnsw_ef_search,
            nprobe=settings.ivf_nprobe,
        )
        results["ann"] = report.to_dict()
    results["warnings"] = warnings
    if as_json:
        _print_json(results)
        return
    _echo_eval(results)
    if warnings:
        typer.echo(f"{len(warnings)} samples skipped:", err=True)
        _print_warnings(warnings)


@app.command()
def demo(
    directory: Annotated[
        Path, typer.Option("--dir", help="Where to put the demo pictures and index.")
    ] = Path("demo-data"),
    count: Annotated[int, typer.Option(help="How many pictures to generate.")] = 240,
) -> None:
    """Generate a small picture folder, index it, and run a few searches (works offline)."""
    from indexer.demo import run_demo

    run_demo(directory, count, base=_settings(), echo=typer.echo)


# --------------------------------------------------------------------------------------------
# zero-shot labels

labels_app = typer.Typer(
    help="Zero-shot label sets: add (or change) from a file, list, show, delete.",
    no_args_is_help=True,
)
app.add_typer(labels_app, name="labels")


def _label_store(settings: Settings) -> Any:
    from retrieval.label_store import LabelStore

    catalog = _catalog(settings)
    catalog.upgrade()
    return LabelStore(catalog)


@labels_app.command("add")
def labels_add(
    file: Annotated[
        Path,
        typer.Argument(
            help="A YAML or JSON label set: name, labels (names, or objects with synonyms, "
            "prompts, threshold, min_cosine), templates (openai, simple, photo, a list, or a "
            "file of one template per line), top_k, threshold, min_cosine, store_cosine."
        ),
    ],
    name: Annotated[
        str | None, typer.Option("--name", help="Set name (default: the file's, or its stem).")
    ] = None,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add a label set, or change one: a changed definition becomes a new version, and the next
    `clipsearch label` (or `clipsearch index`) relabels the corpus with it."""
    from retrieval.labels import load_label_set_file

    settings = _settings(data_dir=data_dir, database_url=database_url)
    stored, outcome = _label_store(settings).put(load_label_set_file(file, name=name))
    if as_json:
        _print_json({"outcome": outcome, **stored.to_dict()})
        return
    typer.echo(
        f"{outcome} label set {stored.name}: version {stored.version}, "
        f"{len(stored.definition.labels)} labels"
        + ("" if outcome == "unchanged" else "; run `clipsearch label` to label the corpus")
    )


@labels_app.command("list")
def labels_list(
    data_dir: DataDirOpt = None, database_url: DbOpt = None, as_json: JsonOpt = False
) -> None:
    """List the label sets: version, the version labelled in the corpus, label count."""
    settings = _settings(data_dir=data_dir, database_url=database_url)
    stored = _label_store(settings).all()
    if as_json:
        _print_json({"label_sets": [s.to_dict() for s in stored]})
        return
    if not stored:
        typer.echo("no label sets (add one with `clipsearch labels add FILE`)")
        return
    rows = [["name", "version", "labelled", "labels", "templates"]]
    for s in stored:
        templates = s.definition.templates
        rows.append(
            [
                s.name,
                str(s.version),
                "-" if s.labelled_version is None else str(s.labelled_version),
                str(len(s.definition.labels)),
                templates if isinstance(templates, str) else f"{len(templates)} own",
            ]
        )
    _echo_table(rows)


@labels_app.command("show")
def labels_show(
    name: Annotated[str, typer.Argument(help="Label set name.")],
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a label set's definition and how many images carry each label."""
    settings = _settings(data_dir=data_dir, database_url=database_url)
    store = _label_store(settings)
    stored = store.get(name)
    counts = store.counts(name)
    if as_json:
        _print_json({**stored.to_dict(), "counts": counts.to_dict()})
        return
    definition = stored.definition
    labelled = "never" if counts.version is None else f"version {counts.version}"
    typer.echo(
        f"label set {stored.name}: version {stored.version}, corpus labelled with {labelled}; "
        f"top {definition.top_k} stored, threshold {definition.threshold}"
        + (f", min cosine {definition.min_cosine}" if definition.min_cosine is not None else "")
    )
    rows = [["label", "images", "settings"]]
    for label in definition.labels:
        options = label.options()
        rows.append(
            [
                label.name,
                str(counts.counts.get(label.name, 0)),
                json.dumps(options) if options else "",
            ]
        )
    rows.append(["(unlabelled)", str(counts.unlabelled), ""])
    _echo_table(rows)


@labels_app.command("delete")
def labels_delete(
    name: Annotated[str, typer.Argument(help="Label set name.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
) -> None:
    """Delete a label set with all its versions and every label stored under it."""
    settings = _settings(data_dir=data_dir, database_url=database_url)
    store = _label_store(settings)
    store.get(name)  # NotFound (exit 7) before asking
    if not yes:
        if not sys.stdin.isatty():
            raise ConfigError("--yes", "deleting a label set needs --yes when not on a terminal")
        typer.confirm(f"Delete label set {name} and all its labels?", abort=True)
    store.delete(name)
    typer.echo(f"deleted label set {name}")


@app.command()
def label(
    set_names: Annotated[
        list[str] | None,
        typer.Option("--set", help="Label with this set only (repeatable; default: all)."),
    ] = None,
    block_size: Annotated[
        int | None,
        typer.Option(help="CLIPSEARCH_LABEL_BLOCK_SIZE: vectors scored at once (bounds memory)."),
    ] = None,
    progress: ProgressOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
    index_dir: IndexDirOpt = None,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Label the corpus with every label set (or --set NAME), from the stored embeddings.

    No image is decoded: stored vectors are scored against each set's class embeddings in
    blocks. Only images not yet labelled under a set's newest version are scored; an edited
    set relabels everything beside the served labels and switches over in one commit. The
    model is loaded only to encode the labels' prompts, once per set version (then cached).
    """
    from indexer.labelling import LabelJob

    settings = _settings(
        data_dir=data_dir,
        database_url=database_url,
        index_dir=index_dir,
        model=model,
        pretrained=pretrained,
        device=device,
        label_block_size=block_size,
    )
    job = LabelJob(settings, _catalog(settings), _encoder_factory(settings), progress=progress)
    report = job.run(set_names)
    if as_json:
        _print_json(report.to_dict())
        return
    if not report.sets:
        typer.echo("no label sets (add one with `clipsearch labels add FILE`)")
    for entry in report.sets:
        if entry.skipped:
            typer.echo(f"{entry.set}: skipped ({entry.skipped})")
            continue
        typer.echo(
            f"{entry.set} version {entry.version}: {entry.images} images labelled in "
            f"{entry.shards} shards ({entry.images - entry.labelled} under every threshold) "
            f"in {entry.seconds:.1f}s" + ("; now served" if entry.published else "")
        )


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except ClipsearchError as exc:
        code = next((c for t, c in EXIT_CODES.items() if isinstance(exc, t)), 1)
        typer.echo(f"error: {exc}", err=True)
        sys.exit(code)
    except KeyboardInterrupt:
        typer.echo("interrupted; nothing uncommitted was published", err=True)
        sys.exit(130)

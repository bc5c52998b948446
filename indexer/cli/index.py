"""`clipsearch index`, `schedule` and `compact`: the writer's commands."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from indexer.cli.options import (
    BatchSizeOpt,
    DataDirOpt,
    DbOpt,
    DeviceOpt,
    IndexDirOpt,
    JsonOpt,
    KindOpt,
    ModelOpt,
    PretrainedOpt,
    ProgressOpt,
    ShardSizeOpt,
    WorkersOpt,
    encoder_factory,
    open_catalog,
)
from indexer.cli.output import exit_code, print_json, utc_text
from retrieval.config import load_settings
from retrieval.errors import ClipsearchError, ConfigError


def _index_summary(report: Any) -> str:
    return (
        f"generation {report.generation}: {report.new} new, {report.changed} changed, "
        f"{report.moved} moved, {report.copied} copied, {report.deleted} deleted, "
        f"{report.unchanged} unchanged, {len(report.failed)} failed "
        f"in {report.seconds:.1f}s"
        + (f" ({report.images_per_second:.1f} images/s encoded)" if report.encoded else "")
    )


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

    settings = load_settings(
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
    catalog = open_catalog(settings)
    previous = _previous_index_run(catalog) if since_last_run else None
    if since_last_run and previous is None:
        raise typer.BadParameter(
            f"the catalog {settings.resolved_database_url} has no previous index run. Check "
            "CLIPSEARCH_DATABASE_URL; for the very first run, leave this flag out (a first "
            "run encodes every image).",
            param_hint="'--since-last-run'",
        )
    job = IndexJob(settings, catalog, encoder_factory(settings), progress=progress)
    report = job.run(chosen_roots)
    if as_json:
        print_json({**report.to_dict(), **({"since": previous} if since_last_run else {})})
        return
    if previous is not None:
        typer.echo(
            f"since job {previous['job']} ({previous['status']}, started "
            f"{utc_text(previous['started_at'])}):"
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

    settings = load_settings(
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
    catalog = open_catalog(settings)

    def run_job() -> IndexReport:
        # The model loads only when a run has something to encode, and is dropped after.
        job = IndexJob(settings, catalog, encoder_factory(settings), progress=progress)
        return job.run(chosen_roots)

    def on_run(run: ScheduledRun) -> None:
        stamp = run.started_at.isoformat(timespec="seconds")
        if as_json:
            print_json(
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
        raise typer.Exit(exit_code(error))


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
    from indexer.compact import compact_index
    from retrieval.index.faiss_gpu import resolve_faiss_gpu

    settings = load_settings(
        data_dir=data_dir, database_url=database_url, index_dir=index_dir, index_kind=kind
    )
    report = compact_index(
        open_catalog(settings),
        settings.resolved_index_dir,
        kind=settings.index_kind,
        shard_size=settings.shard_size,
        merge_all=merge_all,
        grace_seconds=settings.retire_grace_seconds,
        use_gpu=resolve_faiss_gpu(settings.faiss_gpu, settings.device),
    )
    if as_json:
        print_json(report.to_dict())
        return
    typer.echo(
        f"generation {report.generation}: {report.shards_before} shards -> {report.shards_after}, "
        f"dropped {report.dropped_vectors} deleted vectors, {report.live_vectors} vectors rewritten"
    )

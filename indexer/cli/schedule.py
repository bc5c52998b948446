"""`clipsearch schedule`: `index` now and then on a schedule, until a stop signal."""

from __future__ import annotations

import datetime as dt
import time
from typing import TYPE_CHECKING, Annotated

import typer

from indexer.cli.index import RootsArg, echo_failures, image_roots, index_summary
from indexer.cli.integrity import echo_corrupt_shards
from indexer.cli.options import (
    BatchSizeOpt,
    DataDirOpt,
    DbOpt,
    DeviceOpt,
    IndexDirOpt,
    KindOpt,
    ModelOpt,
    PretrainedOpt,
    ProgressOpt,
    ShardSizeOpt,
    WorkersOpt,
    model_flags,
    open_catalog,
)
from indexer.cli.output import exit_code, print_json
from indexer.cli.reading import index_model, model_loader
from retrieval.config import load_settings
from retrieval.errors import ClipsearchError
from retrieval.models.device import DEVICE_SETTING, check_device

if TYPE_CHECKING:
    from indexer.schedule import ScheduledRun, ScheduleSummary

SCHEDULE_HELP = (
    "Run `index` now and then on a schedule (default nightly) until SIGTERM or Ctrl-C.\n\n"
    "Each run is an ordinary incremental index job under the single-writer lock. A failed run "
    "is reported and the schedule goes on. A stop signal ends the wait at once, or interrupts "
    "a run in progress (what it committed is kept) and exits 0. With --max-runs the exit code "
    "is that of the last run."
)

EveryOpt = Annotated[
    str | None,
    typer.Option(
        "--every",
        help="CLIPSEARCH_INDEX_EVERY: time between run starts, e.g. 24h, 6h, 30m, 1h30m "
        "(default 24h). A run that overruns skips the slots it covered.",
    ),
]
AtOpt = Annotated[
    str | None,
    typer.Option(
        "--at",
        help="CLIPSEARCH_INDEX_AT: align runs to this local time, HH:MM (e.g. 03:00); "
        "runs then start at HH:MM plus whole multiples of --every (default: not aligned, the "
        "first slot is --every after the start).",
    ),
]
RunAtStartOpt = Annotated[
    bool,
    typer.Option(
        "--run-at-start/--wait-for-slot",
        help="Run once at start-up (cheap when nothing changed), or wait for the first slot.",
    ),
]
MaxRunsOpt = Annotated[
    int | None, typer.Option(min=1, help="Stop after this many runs (default: never).")
]
RunsJsonOpt = Annotated[
    bool, typer.Option("--json", help="One JSON object per run on stdout; notes on stderr.")
]


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


class _ScheduleOutput:
    """What the schedule prints: one line (or JSON object) per run, and its waits on stderr
    with --json, so that stdout stays one object per line."""

    def __init__(self, as_json: bool, max_runs: int | None) -> None:
        self.as_json = as_json
        self.max_runs = max_runs

    def on_run(self, run: ScheduledRun) -> None:
        stamp = run.started_at.isoformat(timespec="seconds")
        if self.as_json:
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
            typer.echo(f"{stamp} run {run.number}: {index_summary(run.report)}")
            echo_failures(run.report)
            echo_corrupt_shards(run.report.corrupt_shards)
        if run.error is not None:
            error = run.error
            what = "" if isinstance(error, ClipsearchError) else f"{type(error).__name__}: "
            typer.echo(
                f"{stamp} run {run.number} failed after {run.seconds:.1f}s: {what}{error}"
                + ("" if run.number == self.max_runs else "; the schedule goes on"),
                err=True,
            )

    def on_wait(self, slot: float, skipped: int) -> None:
        note = f" (the last run overran the interval: {skipped} skipped)" if skipped else ""
        typer.echo(
            f"next run at {_local_text(slot)} (in {_duration_text(slot - time.time())}){note}",
            err=self.as_json,
        )

    def note(self, text: str) -> None:
        typer.echo(text, err=self.as_json)


def _echo_stop(summary: ScheduleSummary) -> None:
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


def schedule(
    roots: RootsArg = None,
    every: EveryOpt = None,
    at: AtOpt = None,
    run_at_start: RunAtStartOpt = True,
    max_runs: MaxRunsOpt = None,
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
    as_json: RunsJsonOpt = False,
) -> None:
    """Run `index` now and then on a schedule (default nightly) until SIGTERM or Ctrl-C."""
    from indexer.pipeline import IndexJob, IndexReport
    from indexer.schedule import ScheduleConfig, Scheduler, stop_on_signals
    from retrieval.config import parse_time_of_day

    settings = load_settings(
        **model_flags(data_dir, database_url, index_dir, model, pretrained, device),
        index_kind=kind,
        batch_size=batch_size,
        workers=workers,
        shard_size=shard_size,
        index_every=every,
        index_at=at,
    )
    chosen_roots = image_roots(roots, settings)
    check_device(settings.device, "--device" if device else DEVICE_SETTING)
    config = ScheduleConfig(
        every_seconds=settings.index_every,
        at=parse_time_of_day(settings.index_at) if settings.index_at else None,
        max_runs=max_runs,
        run_at_start=run_at_start,
    )
    catalog = open_catalog(settings)

    def run_job() -> IndexReport:
        # The model loads only when a run has something to encode, and is dropped after; an
        # index keeps its model unless one is named.
        choice = index_model(settings, catalog)
        job = IndexJob(choice.settings, catalog, model_loader(choice), progress=progress)
        return job.run(chosen_roots)

    output = _ScheduleOutput(as_json, max_runs)
    output.note(
        f"indexing {', '.join(chosen_roots)} every {_duration_text(config.every_seconds)}"
        + (f" aligned to {settings.index_at} local time" if settings.index_at else "")
        + "; SIGTERM or Ctrl-C stops"
    )
    scheduler = Scheduler(run_job, config, on_run=output.on_run, on_wait=output.on_wait)
    with stop_on_signals(scheduler):
        summary = scheduler.run()
    catalog.dispose()
    if summary.stopped_by is not None:
        _echo_stop(summary)
        return
    last = summary.last
    if last is not None and last.error is not None:
        raise typer.Exit(exit_code(last.error))

"""`clipsearch schedule`: slots, a folder changing between runs, failures, and stop signals."""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from indexer.pipeline import IndexJob, IndexReport
from indexer.schedule import (
    ScheduleConfig,
    ScheduledRun,
    Scheduler,
    StopRequested,
    next_slot,
    stop_on_signals,
)
from retrieval.catalog.database import Catalog
from retrieval.config import Settings
from retrieval.errors import ConfigError
from retrieval.models.encoder import Encoder
from retrieval.training.shapes import draw_shape, generate_shapes

COUNTS = ("new", "changed", "moved", "copied", "touched", "deleted", "unchanged", "encoded")


def _counts(report: IndexReport) -> dict[str, int]:
    return {name: getattr(report, name) for name in COUNTS}


def _expect(**given: int) -> dict[str, int]:
    return {name: given.get(name, 0) for name in COUNTS}


def _picture(path: Path, colour: str, shape: str, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_shape(colour, shape, random.Random(seed)).save(path, "JPEG", quality=92)


def _index_job(settings: Settings, catalog: Catalog, encoder: Encoder, root: Path) -> Callable:
    def run_job() -> IndexReport:
        return IndexJob(settings, catalog, lambda: encoder, progress=False).run([root])

    return run_job


# --------------------------------------------------------------------------------------
# slots


def test_slots_without_at_follow_the_anchor() -> None:
    config = ScheduleConfig(every_seconds=10)
    assert next_slot(config, now=1000.0, anchor=1000.0) == 1010.0
    assert next_slot(config, now=1015.0, anchor=1000.0) == 1020.0
    assert next_slot(config, now=1020.0, anchor=1000.0) == 1030.0  # strictly after
    assert next_slot(config, now=1047.5, anchor=1000.0) == 1050.0  # overran: slots skipped


def _local(year: int, month: int, day: int, hour: int, minute: int) -> float:
    return dt.datetime(year, month, day, hour, minute).timestamp()  # naive: local wall clock


def test_slots_with_at_are_local_wall_clock_times() -> None:
    nightly = ScheduleConfig(every_seconds=24 * 3600, at=dt.time(3, 0))
    anchor = _local(2026, 1, 10, 1, 0)
    assert next_slot(nightly, _local(2026, 1, 10, 2, 0), anchor) == _local(2026, 1, 10, 3, 0)
    assert next_slot(nightly, _local(2026, 1, 10, 3, 0), anchor) == _local(2026, 1, 11, 3, 0)
    assert next_slot(nightly, _local(2026, 1, 10, 23, 0), anchor) == _local(2026, 1, 11, 3, 0)
    six_hourly = ScheduleConfig(every_seconds=6 * 3600, at=dt.time(3, 0))
    assert next_slot(six_hourly, _local(2026, 1, 10, 10, 0), anchor) == _local(2026, 1, 10, 15, 0)
    assert next_slot(six_hourly, _local(2026, 1, 10, 1, 0), anchor) == _local(2026, 1, 10, 3, 0)


def test_nightly_slot_stays_at_three_across_a_dst_change(monkeypatch: pytest.MonkeyPatch) -> None:
    if not hasattr(time, "tzset"):
        pytest.skip("needs time.tzset")
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    try:
        nightly = ScheduleConfig(every_seconds=24 * 3600, at=dt.time(3, 0))
        before = _local(2026, 3, 28, 12, 0)  # the night of 28/29 March 2026 loses an hour
        slot = next_slot(nightly, before, before)
        assert dt.datetime.fromtimestamp(slot) == dt.datetime(2026, 3, 29, 3, 0)
        assert slot - _local(2026, 3, 28, 3, 0) == 23 * 3600
    finally:
        monkeypatch.undo()
        time.tzset()


def test_config_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        ScheduleConfig(every_seconds=0)
    with pytest.raises(ValueError):
        ScheduleConfig(every_seconds=1, max_runs=0)


# --------------------------------------------------------------------------------------
# the loop against a changing folder


@pytest.mark.slow
def test_each_run_picks_up_exactly_the_changes_made_before_it(
    settings: Settings, encoder: Encoder, tmp_path: Path
) -> None:
    root = tmp_path / "pics"
    generate_shapes(root, 12, seed=3)
    catalog = Catalog(settings.resolved_database_url)

    def after_first() -> None:  # 3 new, 2 moved, 1 deleted
        for n, (colour, shape) in enumerate(
            [("red", "star"), ("blue", "circle"), ("green", "square")]
        ):
            _picture(root / "added" / f"new{n}.jpg", colour, shape, seed=100 + n)
        (root / "moved").mkdir()
        os.rename(root / "red_circle" / "00000.jpg", root / "moved" / "a.jpg")
        os.rename(root / "red_square" / "00001.jpg", root / "moved" / "b.jpg")
        (root / "red_triangle" / "00002.jpg").unlink()

    def after_second() -> None:  # 1 changed (new bytes), 1 copied (known bytes, new path)
        changed = root / "red_star" / "00003.jpg"
        _picture(changed, "yellow", "triangle", seed=200)
        os.utime(changed, ns=(time.time_ns(), time.time_ns() + 1_000_000_000))
        shutil.copy(root / "moved" / "a.jpg", root / "added" / "copy-of-a.jpg")

    mutations = [after_first, after_second, lambda: None]
    runs: list[ScheduledRun] = []

    def on_run(run: ScheduledRun) -> None:
        runs.append(run)
        if run.number <= len(mutations):
            mutations[run.number - 1]()  # the folder changes while the loop waits

    scheduler = Scheduler(
        _index_job(settings, catalog, encoder, root),
        ScheduleConfig(every_seconds=1.0, max_runs=4),
        on_run=on_run,
    )
    summary = scheduler.run()

    assert summary.runs == 4 and summary.failed == 0 and summary.stopped_by is None
    assert all(run.ok and run.report is not None for run in runs)
    reports = [run.report for run in runs if run.report is not None]
    assert [_counts(r) for r in reports] == [
        _expect(new=12, encoded=12),
        _expect(new=3, moved=2, deleted=1, unchanged=9, encoded=3),
        _expect(changed=1, copied=1, unchanged=13, encoded=1),
        _expect(unchanged=15),
    ]
    assert [r.failed for r in reports] == [[], [], [], []]
    assert reports[3].decoded == 0 and reports[3].generation == reports[2].generation
    # Runs start on the 1-second slots (a run that overran skips to the next slot).
    starts = [run.started_at for run in runs]
    gaps = [(b - a).total_seconds() for a, b in zip(starts, starts[1:], strict=False)]
    assert all(gap >= 0.9 for gap in gaps), gaps
    assert catalog.counts() == {"active": 15, "deleted": 2}
    jobs = catalog.jobs()
    assert [job.status for job in jobs[:4]] == ["succeeded"] * 4
    catalog.dispose()


@pytest.mark.slow
def test_a_failed_run_is_reported_and_the_schedule_goes_on(
    settings: Settings, encoder: Encoder, tmp_path: Path
) -> None:
    root = tmp_path / "pics"
    generate_shapes(root, 4, seed=1)
    catalog = Catalog(settings.resolved_database_url)

    def on_run(run: ScheduledRun) -> None:
        if run.number == 1:
            root.rename(tmp_path / "unmounted")  # the picture share disappears
        elif run.number == 2:
            (tmp_path / "unmounted").rename(root)
            _picture(root / "late.jpg", "purple", "star", seed=7)

    summary = Scheduler(
        _index_job(settings, catalog, encoder, root),
        ScheduleConfig(every_seconds=0.5, max_runs=3),
        on_run=on_run,
    ).run()
    assert summary.runs == 3 and summary.failed == 1
    assert summary.last is not None and summary.last.ok
    assert summary.last.report is not None
    assert _counts(summary.last.report) == _expect(new=1, unchanged=4, encoded=1)
    catalog.dispose()


def test_a_failing_job_error_is_kept_on_the_run() -> None:
    outcomes: list[ScheduledRun] = []

    def run_job() -> IndexReport:
        if len(outcomes) == 0:
            raise ConfigError("CLIPSEARCH_ROOTS", "/pics is not a directory")
        if len(outcomes) == 1:
            raise RuntimeError("database went away")
        return IndexReport(unchanged=3)

    summary = Scheduler(
        run_job, ScheduleConfig(every_seconds=0.05, max_runs=3), on_run=outcomes.append
    ).run()
    assert [type(o.error) for o in outcomes] == [ConfigError, RuntimeError, type(None)]
    assert summary.failed == 2 and summary.last is outcomes[-1]


# --------------------------------------------------------------------------------------
# stopping


def test_sigterm_while_waiting_ends_the_loop_at_once() -> None:
    def run_job() -> IndexReport:
        return IndexReport()

    def on_run(run: ScheduledRun) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the loop is not in a run

    scheduler = Scheduler(run_job, ScheduleConfig(every_seconds=3600), on_run=on_run)
    before = signal.getsignal(signal.SIGTERM)
    started = time.monotonic()
    with stop_on_signals(scheduler):
        summary = scheduler.run()
    assert time.monotonic() - started < 5
    assert summary.runs == 1 and summary.stopped_by == "SIGTERM"
    assert not summary.interrupted_run
    assert signal.getsignal(signal.SIGTERM) is before


def test_sigterm_during_a_run_interrupts_it_and_keeps_the_catalog_consistent(
    settings: Settings, encoder: Encoder, tmp_path: Path
) -> None:
    root = tmp_path / "pics"
    generate_shapes(root, 6, seed=2)
    catalog = Catalog(settings.resolved_database_url)

    def encoder_factory() -> Encoder:
        # Called inside the job, under the indexer lock, after the job row was written.
        os.kill(os.getpid(), signal.SIGTERM)
        return encoder

    def run_job() -> IndexReport:
        return IndexJob(settings, catalog, encoder_factory, progress=False).run([root])

    scheduler = Scheduler(run_job, ScheduleConfig(every_seconds=3600))
    with stop_on_signals(scheduler):
        summary = scheduler.run()
    assert summary.stopped_by == "SIGTERM" and summary.interrupted_run and summary.runs == 0
    (job,) = catalog.jobs()
    assert job.status == "failed" and job.error == "stopped by SIGTERM"
    assert catalog.counts() == {}  # nothing half-committed
    # The lock was released and the next run does the whole job.
    report = IndexJob(settings, catalog, lambda: encoder, progress=False).run([root])
    assert report.new == 6 and report.failed == []
    catalog.dispose()


def test_stop_requested_is_not_an_ordinary_error() -> None:
    """A job's `except Exception` must not swallow the stop."""
    assert not issubclass(StopRequested, Exception)


# --------------------------------------------------------------------------------------
# the command, as a process


@pytest.mark.slow
def test_schedule_command_picks_up_a_new_file_and_exits_0_on_sigterm(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """Signals and output of the real process; SQLite only (the loop tests cover both)."""
    root = tmp_path / "pics"
    generate_shapes(root, 5, seed=6)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CLIPSEARCH_")},
        "CLIPSEARCH_DATA_DIR": str(tmp_path / "data"),
        "CLIPSEARCH_MODEL": "clipsearch-tiny",
        "CLIPSEARCH_PRETRAINED": str(tiny_checkpoint),
        "CLIPSEARCH_DEVICE": "cpu",
        "CLIPSEARCH_WORKERS": "0",
    }
    command = [sys.executable, "-m", "indexer", "schedule", str(root), "--every", "1s", "--json"]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    try:
        reports = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            assert line, process.stderr.read() if process.stderr else "no output"
            run = json.loads(line)
            assert run["ok"], run
            reports.append(run["report"])
            if len(reports) == 1:
                _picture(root / "later.jpg", "orange", "circle", seed=9)
            if sum(r["new"] for r in reports[1:]) == 1:
                break
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert reports[0]["new"] == 5
    assert sum(r["new"] for r in reports[1:]) == 1  # picked up once, in whichever run came next
    assert process.returncode == 0, stderr
    assert "stopped by SIGTERM" in stderr

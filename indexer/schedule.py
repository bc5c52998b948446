"""`clipsearch schedule`: run the index job now, then on a fixed schedule, until stopped.

A small loop instead of cron inside the container: one process, logs on stdout, the same
single-writer lock as a manual `clipsearch index`, and a clean stop on SIGTERM/SIGINT.
"""

from __future__ import annotations

import datetime as dt
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

from indexer.pipeline import IndexReport

# Wake at least this often while waiting, so a changed wall clock (suspend, NTP step)
# is noticed within a minute instead of after a whole interval.
_MAX_NAP_SECONDS = 60.0


class StopRequested(BaseException):  # noqa: N818 - a signal, not an error
    """Raised inside a running job when SIGTERM/SIGINT arrives, so it stops promptly.

    A BaseException like KeyboardInterrupt: the index job records itself as failed, the
    catalog transaction in progress rolls back, and the previous generation stays servable.
    """

    def __init__(self, signal_name: str) -> None:
        super().__init__(f"stopped by {signal_name}")
        self.signal_name = signal_name


@dataclass(frozen=True)
class ScheduleConfig:
    """When runs start: once at start-up (unless told not to), then every `every_seconds`.

    With `at`, the slots are aligned to that local wall-clock time: `at` plus whole
    multiples of the interval (every 24h at 03:00 stays at 03:00 across DST changes).
    """

    every_seconds: float
    at: dt.time | None = None
    max_runs: int | None = None
    run_at_start: bool = True

    def __post_init__(self) -> None:
        if self.every_seconds <= 0:
            raise ValueError("every_seconds must be positive")
        if self.max_runs is not None and self.max_runs < 1:
            raise ValueError("max_runs must be at least 1")


@dataclass(frozen=True)
class ScheduledRun:
    """One run's outcome: a report, or the error that ended it."""

    number: int
    started_at: dt.datetime
    seconds: float
    report: IndexReport | None = None
    error: Exception | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class ScheduleSummary:
    runs: int = 0
    failed: int = 0
    last: ScheduledRun | None = None
    stopped_by: str | None = None  # the signal's name when one ended the loop
    interrupted_run: bool = False  # the signal arrived while a run was in progress


def next_slot(config: ScheduleConfig, now: float, anchor: float) -> float:
    """The first slot strictly after `now` (epoch seconds).

    Without `at`, slots are `anchor + k * every`. With `at`, they are local wall-clock
    times `today at HH:MM + k * every`, for any integer k.
    """
    step = config.every_seconds
    if config.at is None:
        k = math.floor((now - anchor) / step) + 1
        return anchor + k * step
    local_now = dt.datetime.fromtimestamp(now)  # naive local time: wall-clock arithmetic
    base = dt.datetime.combine(local_now.date(), config.at)
    delta = dt.timedelta(seconds=step)
    k = math.floor((local_now - base) / delta) + 1
    slot = (base + k * delta).timestamp()
    while slot <= now:  # a DST gap can map a wall-clock slot to an earlier instant
        k += 1
        slot = (base + k * delta).timestamp()
    return slot


class Scheduler:
    """Runs `run_job` on the schedule. A failed run is reported and the loop goes on."""

    def __init__(
        self,
        run_job: Callable[[], IndexReport],
        config: ScheduleConfig,
        *,
        on_run: Callable[[ScheduledRun], None] | None = None,
        on_wait: Callable[[float, int], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.run_job = run_job
        self.config = config
        self.on_run = on_run
        self.on_wait = on_wait  # (next slot, slots skipped because a run overran)
        self.clock = clock
        self._stop = threading.Event()
        self._stop_signal: str | None = None
        self._in_run = False

    @property
    def in_run(self) -> bool:
        return self._in_run

    def request_stop(self, signal_name: str = "request") -> None:
        self._stop_signal = signal_name
        self._stop.set()

    def _wait_until(self, slot: float) -> bool:
        """Sleep until `slot`; False when a stop was requested first."""
        while not self._stop.is_set():
            remaining = slot - self.clock()
            if remaining <= 0:
                return True
            self._stop.wait(min(remaining, _MAX_NAP_SECONDS))
        return False

    def _run_once(self, number: int) -> ScheduledRun:
        started_at = dt.datetime.now(dt.UTC)
        started = time.monotonic()
        self._in_run = True
        try:
            report = self.run_job()
        except Exception as exc:  # noqa: BLE001 - one failed night must not end the schedule
            return ScheduledRun(number, started_at, time.monotonic() - started, error=exc)
        finally:
            self._in_run = False
        return ScheduledRun(number, started_at, time.monotonic() - started, report=report)

    def run(self) -> ScheduleSummary:
        summary = ScheduleSummary()
        anchor = self.clock()
        slot = anchor if self.config.run_at_start else next_slot(self.config, anchor, anchor)
        if not self.config.run_at_start and self.on_wait:
            self.on_wait(slot, 0)
        try:
            while self._wait_until(slot):
                outcome = self._run_once(summary.runs + 1)
                summary.runs += 1
                summary.failed += 0 if outcome.ok else 1
                summary.last = outcome
                if self.on_run:
                    self.on_run(outcome)
                if self.config.max_runs is not None and summary.runs >= self.config.max_runs:
                    break
                following = next_slot(self.config, self.clock(), anchor)
                skipped = max(0, round((following - slot) / self.config.every_seconds) - 1)
                slot = following
                if self.on_wait and not self._stop.is_set():
                    self.on_wait(slot, skipped)
        except StopRequested as stop:
            summary.interrupted_run = True
            summary.stopped_by = stop.signal_name
            return summary
        summary.stopped_by = self._stop_signal
        return summary


@contextmanager
def stop_on_signals(
    scheduler: Scheduler, signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)
) -> Iterator[None]:
    """SIGTERM/SIGINT end the loop: at once while waiting, by interrupting a running job.

    Interrupting is safe by design (the catalog commit is atomic, uncommitted shard files
    are orphans the next job deletes), and `docker stop` allows only 10 s before SIGKILL.
    """

    def handle(signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        scheduler.request_stop(name)
        if scheduler.in_run:
            raise StopRequested(name)

    previous = {sig: signal.signal(sig, handle) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

"""Fault injection for the crash-safety tests: SIGKILL ourselves at a named point."""

from __future__ import annotations

import os
import signal

CRASH_ENV = "CLIPSEARCH_CRASH_AT"
# A file path: the crash happens only in the first process that creates it (a worker that
# dies once, and is restarted by the cluster, must not die again).
CRASH_ONCE_ENV = "CLIPSEARCH_CRASH_ONCE"


def crash_point(name: str) -> None:
    """Fault injection for the crash-safety tests: SIGKILL ourselves at a named point.

    Set CLIPSEARCH_CRASH_AT=<name> (before_shard_write, after_shard_write, before_commit,
    after_commit, during_encode; during_labels, before_label_publish; repair_before_commit,
    repair_after_commit; compact_before_commit, compact_after_commit; in a Ray encode actor,
    ray_encoder_load, ray_encode). Unset in normal use; costs one dict lookup.
    """
    if os.environ.get(CRASH_ENV) == name and _first_time():
        os.kill(os.getpid(), signal.SIGKILL)


def _first_time() -> bool:
    marker = os.environ.get(CRASH_ONCE_ENV)
    if not marker:
        return True
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True

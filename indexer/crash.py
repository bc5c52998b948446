"""Fault injection for the crash-safety tests: SIGKILL ourselves at a named point."""

from __future__ import annotations

import os
import signal

CRASH_ENV = "CLIPSEARCH_CRASH_AT"


def crash_point(name: str) -> None:
    """Fault injection for the crash-safety tests: SIGKILL ourselves at a named point.

    Set CLIPSEARCH_CRASH_AT=<name> (before_shard_write, after_shard_write, before_commit,
    after_commit, during_encode; during_labels, before_label_publish; repair_before_commit,
    repair_after_commit; compact_before_commit, compact_after_commit). Unset in normal use;
    costs one dict lookup.
    """
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)

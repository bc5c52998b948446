"""Worker processes that never outlive the indexer that started them.

A DataLoader worker notices a dead parent only at its next poll (every 5 s in torch), and
until then it holds memory, files and, in the past, the indexer lock. On Linux the kernel
kills a worker the moment its parent dies (PR_SET_PDEATHSIG). Elsewhere, torch's own poll is
the fallback; the lock is safe either way (see indexer/lock.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent_pid: int) -> bool:
    """Have the kernel SIGKILL this process when its parent dies; True where it can (Linux).

    The kernel ties the signal to the thread that forked us: fork workers from a thread that
    lives as long as they do (the DataLoader does, from the thread that iterates it).
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return False
    # The parent may have died before the prctl took effect: then we were already re-parented.
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGKILL)
    return True

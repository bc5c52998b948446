"""Giving freed memory back to the system after a large, short-lived allocation."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Callable
from functools import cache


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library is not glibc (macOS, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_heap() -> bool:
    """Return the free pages of every malloc arena to the system; True if that was possible.

    glibc keeps memory that was freed inside its heaps (a decoded 100-megapixel frame comes in
    16 MiB blocks that land there once its mmap threshold has grown), so without this a
    server's resident size stays at its peak after one large upload. It takes milliseconds,
    so it runs only after large decodes.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True

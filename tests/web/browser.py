"""Debian's Chromium driven by Playwright, launched once a test session (the `browser` fixture in
tests/conftest.py: the browser tests and the first-hour test share it, since Playwright's sync API
runs one instance a thread).

Playwright is used only as a driver; it downloads no browser. The tests skip when Chromium is
missing on a developer machine and fail when it is missing in CI (`CI=true`), where `.ci/run`
installs it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser

CHROMIUM_FLAGS = [
    "--no-sandbox",  # CI runs as root in a container, where the sandbox cannot start
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def _missing_browser(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI must run the browser tests (.ci/run installs chromium)")
    pytest.skip(f"{reason}; install it (apt-get install chromium) to run the browser tests")


@contextmanager
def launched_chromium() -> Iterator[Browser]:
    """Headless Chromium from PATH; skips (or fails in CI) when it or playwright is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing_browser("the playwright package is not installed (pip install -e '.[test]')")
    executable = shutil.which("chromium")
    if executable is None:
        _missing_browser("no `chromium` on PATH")
    assert executable is not None
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=executable, headless=True, args=CHROMIUM_FLAGS
        )
        yield launched
        launched.close()

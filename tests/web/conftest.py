"""Browser fixtures: pages at two widths in the session's Chromium (the `browser` fixture of
tests/conftest.py, see tests/web/browser.py), and screenshots."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage, Page, ViewportSize

    from tests.web.corpus import Corpus

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "tests" / "artifacts" / "web"
KEY_STORAGE = "clipsearch.apiKey"  # the page's localStorage entry (api/web/api.js)
VIEWPORTS: dict[str, ViewportSize] = {
    "desktop": {"width": 1280, "height": 800},
    "phone": {"width": 390, "height": 844},
}
TIMEOUT_MS = 20_000  # a shared 2-core CI machine; the page itself answers in milliseconds
# The page speaks the browser's language; tests that do not choose one get English wherever
# they run (Chromium would otherwise take the machine's locale).
DEFAULT_LOCALE = "en-US"


@dataclass
class PageProblems:
    """What the page reported that no test expects: uncaught errors and CSP refusals."""

    errors: list[str] = field(default_factory=list)

    def on_console(self, message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text:
            self.errors.append(f"CSP: {message.text}")

    def on_page_error(self, error: Any) -> None:
        self.errors.append(f"uncaught: {error}")


OpenPage = Callable[..., "Page"]


@pytest.fixture
def open_page(browser: Browser) -> Iterator[OpenPage]:
    """open_page(url, viewport="desktop", key=None, locale="en-US"): a fresh browser profile
    per call."""
    contexts = []
    problems = PageProblems()

    def open_(
        url: str, *, viewport: str = "desktop", key: str | None = None, locale: str = DEFAULT_LOCALE
    ) -> Page:
        context = browser.new_context(
            viewport=VIEWPORTS[viewport], reduced_motion="reduce", locale=locale
        )
        context.set_default_timeout(TIMEOUT_MS)
        contexts.append(context)
        if key is not None:
            context.add_init_script(f"window.localStorage.setItem({KEY_STORAGE!r}, {key!r});")
        page = context.new_page()
        page.on("console", problems.on_console)
        page.on("pageerror", problems.on_page_error)
        page.goto(url)
        page.wait_for_selector("body[data-ready='true']")
        return page

    yield open_
    for context in contexts:
        context.close()
    assert problems.errors == [], problems.errors


@pytest.fixture(scope="session")
def corpus(semantic_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Corpus]:
    """The shapes corpus behind a running server (tests/web/corpus.py), shared by the modules."""
    from tests.web.corpus import serve_corpus

    with serve_corpus(semantic_checkpoint, tmp_path_factory.mktemp("web-corpus")) as served:
        yield served


def screenshot(page: Page, name: str) -> Path:
    """Save what the viewport shows under tests/artifacts/web/ (kept by CI as an artifact)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path

"""A page object for the search page: what a user does, and what a user sees."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported lazily, so a machine without playwright skips instead of erroring
    from playwright.sync_api import Locator, Page, Request


SCRIPTS = Path(__file__).parent / "scripts"
CONTRAST_SCRIPT = (SCRIPTS / "contrast.js").read_text()
DROP_SCRIPT = (SCRIPTS / "drop.js").read_text()


@dataclass
class SearchPage:
    page: Page

    # ---- what the user does ----------------------------------------------------------

    @property
    def query_box(self) -> Locator:
        return self.page.locator("#q")

    def type_query(self, text: str) -> None:
        """Type like a person (no Enter): results must come from the pause after typing."""
        self.query_box.click()
        self.query_box.fill("")
        self.query_box.press_sequentially(text, delay=20)

    def search(self, text: str) -> None:
        self.query_box.fill(text)
        self.query_box.press("Enter")

    def choose_file(self, path: Path) -> None:
        self.page.locator("#file").set_input_files(str(path))

    def drop_file(self, path: Path, mime: str) -> None:
        data = base64.b64encode(path.read_bytes()).decode()
        self.page.evaluate(DROP_SCRIPT, ["#drop-zone", path.name, mime, data])

    def choose_language(self, language: str) -> None:
        """Pick a language by its value (en, zh-CN) in the header's language control."""
        self.page.locator("#language").select_option(language)

    def compose(self, text: str) -> None:
        """Type like an input method (pinyin): `text` is still being composed, not committed."""
        self.query_box.focus()
        cdp = self.page.context.new_cdp_session(self.page)
        cdp.send(
            "Input.imeSetComposition",
            {"text": text, "selectionStart": len(text), "selectionEnd": len(text)},
        )
        cdp.detach()

    def commit_composition(self, text: str) -> None:
        """The input method commits `text` (the chosen characters) in place of the composition."""
        self.page.keyboard.insert_text(text)

    def set_filter(self, field: str, value: str) -> None:
        locator = self.page.locator(f"#{field}")
        if field in ("k", "label"):
            locator.select_option(value)
        else:
            locator.fill(value)
            locator.dispatch_event("change")

    # ---- what the user sees ----------------------------------------------------------

    def wait_for_results(self, status_contains: str = "") -> None:
        """Wait until a finished search shows its summary (and, if given, mentions a text)."""
        self.page.wait_for_function(
            """(text) => document.body.dataset.results === "shown"
                 && !document.querySelector("#results").hasAttribute("aria-busy")
                 && document.querySelector("#status").textContent.includes(text)""",
            arg=status_contains,
        )

    def wait_for_message(self, code: str) -> Locator:
        message = self.page.locator(f"#message[data-code='{code}']")
        message.wait_for(state="visible")
        return message

    def cards(self) -> Locator:
        return self.page.locator("#grid > li.card")

    def result_paths(self) -> list[str]:
        return [str(p) for p in self.cards().evaluate_all("cs => cs.map(c => c.dataset.path)")]

    def result_ids(self) -> list[int]:
        return [int(i) for i in self.cards().evaluate_all("cs => cs.map(c => c.dataset.id)")]

    def wait_for_thumbnails(self, count: int) -> None:
        self.page.wait_for_function(
            """(n) => [...document.querySelectorAll("#grid > li.card")].slice(0, n)
                 .every(c => c.dataset.thumb === "loaded")""",
            arg=count,
        )

    def message_text(self) -> str:
        return self.page.locator("#message").inner_text()

    def index_status(self) -> str:
        return self.page.locator("#index-status").inner_text()

    def status(self) -> str:
        return self.page.locator("#status").inner_text()

    def model_warning(self) -> Locator:
        """The header's warning that the model has random weights (hidden when trained)."""
        return self.page.locator("#model-warning")

    def language(self) -> str:
        """The page's language, as <html lang> says it."""
        return str(self.page.evaluate("document.documentElement.lang"))

    def contrast_failures(self, minimum: float = 4.5) -> list[dict[str, Any]]:
        return list(self.page.evaluate(CONTRAST_SCRIPT, minimum))

    def horizontal_overflow(self) -> int:
        """How many pixels the page is wider than the viewport (0 when it fits)."""
        return int(self.page.evaluate("document.documentElement.scrollWidth - window.innerWidth"))

    def record_text_searches(self) -> list[str]:
        """From now on, the query text of every text search the page sends (a growing list)."""
        queries: list[str] = []

        def on_request(request: Request) -> None:
            if request.method == "POST" and request.url.endswith("/search/text"):
                body = request.post_data_json or {}
                queries.append(str(body.get("query")))

        self.page.on("request", on_request)
        return queries

    def url_params(self) -> dict[str, str]:
        return dict(
            json.loads(
                self.page.evaluate("JSON.stringify([...new URLSearchParams(location.search)])")
            )
        )

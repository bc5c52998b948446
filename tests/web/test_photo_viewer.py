"""The viewer shows a photo's capture date, camera and position, and shows a HEIC (which
Chromium cannot decode) through the server's JPEG rendering; against a real server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from indexer.pipeline import IndexJob
from retrieval.catalog.database import Catalog
from retrieval.config import load_settings
from retrieval.models.encoder import Encoder
from tests.conftest import TINY
from tests.fixtures.photos import Shot, write_photo
from tests.serving import running_server
from tests.web.conftest import OpenPage, screenshot
from tests.web.search_page import SearchPage

pytestmark = pytest.mark.slow  # starts a server

FILE_TIME_NS = 1_600_000_000_000_000_000  # 2020-09-13T12:26:40Z
IPHONE = Shot("2023:07:14 18:30:05", "+02:00", "Apple", "iPhone 15 Pro", (48.8581944, 2.2945))
PIXEL = Shot("2024:01:02 08:00:00", None, "Google", "Google Pixel 8", None)


@pytest.fixture(scope="module")
def photo_server(
    tiny_checkpoint: Path, encoder: Encoder, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    work = tmp_path_factory.mktemp("web-photos")
    photos = work / "photos"
    write_photo(photos / "paris.heic", Image.new("RGB", (80, 60), (200, 30, 30)), "HEIF", IPHONE)
    write_photo(photos / "morning.avif", Image.new("RGB", (64, 48), "blue"), "AVIF", PIXEL)
    write_photo(photos / "scan.png", Image.new("RGB", (40, 30), "green"), "PNG", Shot())
    for path in photos.iterdir():
        os.utime(path, ns=(FILE_TIME_NS, FILE_TIME_NS))
    model = {"model": TINY, "pretrained": str(tiny_checkpoint), "device": "cpu", "workers": 0}
    settings = load_settings(data_dir=work / "data", **model)
    catalog = Catalog(settings.resolved_database_url)
    try:
        report = IndexJob(settings, catalog, lambda: encoder, progress=False).run([photos])
    finally:
        catalog.dispose()
    assert report.new == 3 and not report.failed
    serve_settings = {
        "CLIPSEARCH_DATA_DIR": str(work / "data"),
        "CLIPSEARCH_MODEL": TINY,
        "CLIPSEARCH_PRETRAINED": str(tiny_checkpoint),
        "CLIPSEARCH_DEVICE": "cpu",
    }
    with running_server(serve_settings, work / "serve.log") as server:
        yield server.base_url


def _open_viewer(sp: SearchPage, name: str) -> dict[str, str]:
    """Open the result whose file is `name`; the viewer's metadata, term -> detail."""
    sp.page.locator(f"#grid .card[data-path$='/{name}'] .thumb").click()
    sp.page.wait_for_selector("#viewer[open][data-image='loaded']")
    terms = sp.page.locator("#viewer-meta dt").all_inner_texts()
    details = sp.page.locator("#viewer-meta dd").all_inner_texts()
    return dict(zip(terms, details, strict=True))


def test_the_viewer_shows_when_where_and_with_what_a_photo_was_taken(
    open_page: OpenPage, photo_server: str
) -> None:
    # Chromium in a UTC zone shows times in UTC: 18:30:05 at +02:00 is 16:30:05.
    page = open_page(photo_server + "/")
    sp = SearchPage(page)
    sp.search("a photo")
    sp.wait_for_results("3 results")

    meta = _open_viewer(sp, "paris.heic")
    assert meta["Format"] == "HEIF"
    assert meta["Camera"] == "Apple iPhone 15 Pro"
    assert meta["Location"] == "48.85819, 2.29450"
    link = page.locator("#viewer-meta dd a")
    assert link.get_attribute("href") == (
        "https://www.openstreetmap.org/?mlat=48.8581944&mlon=2.2945#map=16/48.8581944/2.2945"
    )
    assert "2023" in meta["Taken"] and "file date" not in meta["Taken"]
    # Chromium decodes no HEIC: the picture shown is the server's JPEG rendering of it.
    assert page.locator("#viewer-img").evaluate("img => img.naturalWidth") == 80
    assert page.locator("#viewer-img").evaluate("img => img.src.startsWith('blob:')")
    screenshot(page, "viewer-heic")
    page.keyboard.press("Escape")
    page.locator("#viewer").wait_for(state="hidden")

    meta = _open_viewer(sp, "morning.avif")
    assert meta["Camera"] == "Google Pixel 8"  # the model already names the make
    assert "Location" not in meta
    assert page.locator("#viewer-img").evaluate("img => img.naturalWidth") == 64
    page.keyboard.press("Escape")
    page.locator("#viewer").wait_for(state="hidden")

    meta = _open_viewer(sp, "scan.png")
    assert meta["Taken"].endswith("(file date: no capture date in the photo)")
    assert "2020" in meta["Taken"]
    assert "Camera" not in meta and "Location" not in meta

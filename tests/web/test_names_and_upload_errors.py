"""Card names that share a long start stay apart, and a refused upload shows the server's words.

A real `clipsearch serve` (tiny model, auth off) over pictures whose file names differ only at
their end, as a camera's do, in a folder with a long name.
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image

from indexer.pipeline import IndexJob
from retrieval.catalog.database import Catalog
from retrieval.config import load_settings
from retrieval.models.encoder import Encoder
from retrieval.training.shapes import draw_shape
from tests.conftest import TINY
from tests.fixtures.bad_images import png_declaring
from tests.serving import running_server
from tests.web.conftest import OpenPage, screenshot
from tests.web.search_page import SearchPage

pytestmark = pytest.mark.slow  # starts a server

FOLDER = "2024-summer-holiday-in-the-mountains-of-northern-portugal"
NAMES = [f"IMG_20240801_holiday_with_the_whole_family_{n:04d}.jpg" for n in (1, 2, 3, 17, 118)]
MAX_UPLOAD_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Served:
    base_url: str
    photos: Path


@pytest.fixture(scope="module")
def served(
    tiny_checkpoint: Path, encoder: Encoder, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    work = tmp_path_factory.mktemp("web-names")
    photos = work / "photos" / FOLDER
    photos.mkdir(parents=True)
    rng = random.Random(3)
    for name in NAMES:
        draw_shape("red", "circle", rng, size=96).save(photos / name, "JPEG")
    settings = load_settings(
        data_dir=work / "data", model=TINY, pretrained=str(tiny_checkpoint), device="cpu"
    )
    catalog = Catalog(settings.resolved_database_url)
    try:
        report = IndexJob(settings, catalog, lambda: encoder, progress=False).run([photos])
    finally:
        catalog.dispose()
    assert report.new == len(NAMES)
    serve_settings = {
        "CLIPSEARCH_DATA_DIR": str(work / "data"),
        "CLIPSEARCH_MODEL": TINY,
        "CLIPSEARCH_PRETRAINED": str(tiny_checkpoint),
        "CLIPSEARCH_DEVICE": "cpu",
        "CLIPSEARCH_MAX_UPLOAD_BYTES": str(MAX_UPLOAD_BYTES),
    }
    with running_server(serve_settings, work / "serve.log") as server:
        yield Served(server.base_url, photos.resolve())


# Per card: the name's title, the text of its two parts, and whether each part shows whole.
NAME_GEOMETRY = """() => [...document.querySelectorAll("#grid > li.card .name")].map((name) => {
  const [head, tail] = name.children;
  const box = name.getBoundingClientRect(), end = tail.getBoundingClientRect();
  return {
    title: name.title,
    head: head.textContent,
    tail: tail.textContent,
    headCut: head.scrollWidth > head.clientWidth,
    tailWhole: tail.scrollWidth <= tail.clientWidth
      && end.left >= box.left - 0.5 && end.right <= box.right + 0.5,
  };
})"""


NAME_PARTS = """async (paths) => {
  const { nameParts } = await import("/web/results.js");
  return paths.map(nameParts);
}"""
SPLITS = {
    "/p/IMG_20240801_123456.jpg": ("p/IMG_20240801", "_123456.jpg"),
    "/p/DSC00042.JPG": ("p/", "DSC00042.JPG"),
    "/p/holiday photo 17.jpeg": ("p/holiday ", "photo 17.jpeg"),
    "/p/scans/archive.tar.gz": ("scans/archive", ".tar.gz"),
    "C:\\Users\\me\\Scan_0000000001": ("me/Scan_00", "00000001"),
}


@pytest.mark.parametrize("viewport", ["desktop", "phone"])
def test_names_with_a_long_common_start_stay_apart(
    open_page: OpenPage, served: Served, viewport: str
) -> None:
    sp = SearchPage(open_page(served.base_url + "/", viewport=viewport))
    sp.search("a red circle")
    sp.wait_for_results()
    cards = sp.page.evaluate(NAME_GEOMETRY)
    assert sorted(card["title"] for card in cards) == sorted(str(served.photos / n) for n in NAMES)
    for card in cards:
        assert card["head"] + card["tail"] == f"{FOLDER}/{Path(card['title']).name}"
        assert card["tail"] == Path(card["title"]).name[-9:]  # "…family_0017.jpg": "_0017.jpg"
        assert card["tailWhole"], card  # the end of the name is never cut
        assert card["headCut"], card  # too long for a card: the ellipsis is in the middle
    assert len({card["tail"] for card in cards}) == len(NAMES)  # what shows tells them apart
    assert sp.horizontal_overflow() == 0
    assert sp.contrast_failures() == []
    screenshot(sp.page, f"long-names-{viewport}")
    # Where the page splits other names: the extension always, the stem's end from a word's edge.
    split = sp.page.evaluate(NAME_PARTS, list(SPLITS))
    assert dict(zip(SPLITS, map(tuple, split), strict=True)) == SPLITS


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((64, 48), 40).convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


UPLOADS = {
    "not a picture": (b"Meeting notes, saved with the wrong name.\n", "image_not_an_image"),
    "cut short": (_jpeg()[:300], "image_truncated"),
    "a decompression bomb": (png_declaring(30_000, 30_000), "image_too_large"),
    "over the upload limit": (b"\xff\xd8" + bytes(MAX_UPLOAD_BYTES + 1024), "payload_too_large"),
}


def test_a_refused_upload_shows_the_servers_message_for_a_person(
    open_page: OpenPage, served: Served, tmp_path: Path
) -> None:
    sp = SearchPage(open_page(served.base_url + "/"))
    for case, (data, code) in UPLOADS.items():
        upload = tmp_path / f"{case.replace(' ', '-')}.jpg"  # a new file: a new change event
        upload.write_bytes(data)
        refusal = httpx.post(
            served.base_url + "/search/image", files={"file": (upload.name, data, "image/jpeg")}
        )
        assert refusal.json()["code"] == code, (case, refusal.text)
        message = refusal.json()["message"]
        for word in ("Pillow", "Error", "PIL", code.removeprefix("image_")):
            assert word not in message, (case, message)  # a person's words, no library's
        sp.choose_file(upload)
        shown = sp.wait_for_message(code).inner_text()
        assert shown == f"The server rejected the image: {message}", case
        assert sp.cards().count() == 0
        screenshot(sp.page, "upload-refused-" + case.replace(" ", "-"))

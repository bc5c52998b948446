"""The search page in a real browser, against a real `clipsearch serve` with an API key.

The server (tests/web/corpus.py) has 240 generated pictures of coloured shapes, indexed with
the semantic test model and labelled, so a query for "a blue square" has right answers (and
labels) the page must show.
"""

from __future__ import annotations

import datetime as dt
import random
import re
from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest

from retrieval.training.shapes import draw_shape
from retrieval.training.shapes_model import SHAPES_MODEL
from tests.web.conftest import OpenPage, screenshot
from tests.web.corpus import (
    CORPUS_IMAGES,
    DEFAULT_K,
    LABEL_SET,
    LABELS,
    READ_KEY,
    Corpus,
    open_search,
)
from tests.web.search_page import SearchPage

pytestmark = pytest.mark.slow  # trains the semantic model once per session, starts a server


def classes_of(paths: list[str]) -> list[str]:
    return [Path(path).parent.name for path in paths]


def assert_image_neighbours(paths: list[str], expected: str) -> None:
    """The bar of tests/test_semantic.py for image-to-image search: the best hit is right, and
    most of the top 5 (the tiny model learns text-image pairs; image neighbourhoods are looser)."""
    classes = classes_of(paths[:5])
    assert classes[0] == expected and classes.count(expected) >= 3, classes


def test_the_page_asks_for_a_key_keeps_it_and_sends_it(open_page: OpenPage, corpus: Corpus) -> None:
    page = open_page(corpus.url("/"))  # a fresh profile: no key stored
    sp = SearchPage(page)
    assert "needs an API key" in sp.wait_for_message("missing_api_key").inner_text()
    assert sp.index_status() == "API key needed"
    key_field = page.locator("#api-key")
    assert key_field.evaluate("field => field === document.activeElement")

    key_field.fill("not-the-key")
    key_field.press("Enter")
    assert "refused the API key" in sp.wait_for_message("invalid_api_key").inner_text()

    key_field.fill(READ_KEY)
    with page.expect_request(re.compile(r"/index$")) as sent:
        key_field.press("Enter")
    assert sent.value.headers.get("x-api-key") == READ_KEY
    status = re.compile(rf"Generation \d+ · {CORPUS_IMAGES} images · {re.escape(SHAPES_MODEL)} ")
    page.wait_for_function(
        "(re) => new RegExp(re).test(document.querySelector('#index-status').textContent)",
        arg=status.pattern,
    )
    assert page.locator("#message").is_hidden()

    page.reload()  # the key survives in local storage
    page.wait_for_selector("body[data-ready='true']")
    assert status.match(sp.index_status())
    assert page.evaluate("localStorage.getItem('clipsearch.apiKey')") == READ_KEY


@pytest.mark.parametrize("viewport", ["desktop", "phone"])
def test_typing_a_query_shows_the_matching_pictures(
    open_page: OpenPage, corpus: Corpus, viewport: str
) -> None:
    sp = open_search(open_page, corpus, viewport=viewport)
    sp.type_query("a blue square")  # no Enter: the pause after typing runs the search
    sp.wait_for_results("“a blue square”")
    paths = sp.result_paths()
    assert len(paths) == DEFAULT_K
    assert classes_of(paths[:5]) == ["blue_square"] * 5
    sp.wait_for_thumbnails(4)  # fetched with the key header, shown from blob: URLs
    first = sp.cards().first
    assert (first.locator("img").get_attribute("src") or "").startswith("blob:")
    assert first.locator(".score").inner_text().startswith("score 0.")
    alt = first.locator("img").get_attribute("alt") or ""
    assert alt.startswith("blue square") and Path(paths[0]).name in alt  # alt text from labels
    assert first.locator(".chip").first.inner_text().startswith("blue square")
    assert sp.url_params() == {"q": "a blue square"}
    assert sp.horizontal_overflow() == 0
    assert sp.contrast_failures() == []
    if viewport == "phone":  # a phone shows the form first; the picture is of the results
        sp.page.locator("#status").evaluate("line => line.scrollIntoView()")
        sp.wait_for_thumbnails(6)
    screenshot(sp.page, f"results-{viewport}")
    if viewport == "phone":  # and the narrowest common phone: two columns, nothing cut off
        sp.page.set_viewport_size({"width": 375, "height": 667})
        assert sp.horizontal_overflow() == 0
        tops = sp.cards().evaluate_all("cs => cs.slice(0, 3).map(c => c.offsetTop)")
        assert tops[0] == tops[1] < tops[2]


def test_an_uploaded_or_dropped_picture_finds_pictures_like_it(
    open_page: OpenPage, corpus: Corpus, tmp_path: Path
) -> None:
    triangle = tmp_path / "triangle.png"
    draw_shape("green", "triangle", random.Random("web: a picture nobody indexed")).save(triangle)
    circle = tmp_path / "circle.jpg"
    draw_shape("yellow", "circle", random.Random("web: another one")).save(circle, "JPEG")
    sp = open_search(open_page, corpus)

    sp.choose_file(triangle)
    sp.wait_for_results("triangle.png")
    assert_image_neighbours(sp.result_paths(), "green_triangle")
    assert sp.page.locator("#query-image").is_visible()
    assert sp.page.locator("#query-image-name").inner_text() == "triangle.png"

    sp.drop_file(circle, "image/jpeg")
    sp.wait_for_results("circle.jpg")
    assert_image_neighbours(sp.result_paths(), "yellow_circle")
    assert sp.url_params() == {}  # an uploaded picture cannot be shared in a URL


def test_more_like_this_finds_the_same_kind_of_picture(open_page: OpenPage, corpus: Corpus) -> None:
    sp = open_search(open_page, corpus)
    sp.search("a purple star")
    sp.wait_for_results("“a purple star”")
    first = sp.cards().first
    source = int(first.get_attribute("data-id") or "-1")
    assert classes_of(sp.result_paths()[:1]) == ["purple_star"]

    first.get_by_role("button", name=re.compile("^More like this")).click()
    sp.wait_for_results(f"like image {source}")
    assert sp.url_params() == {"similar": str(source)}
    assert source not in sp.result_ids()
    assert_image_neighbours(sp.result_paths(), "purple_star")
    assert sp.query_box.input_value() == ""


def test_more_like_this_applies_the_filters(open_page: OpenPage, corpus: Corpus) -> None:
    sp = open_search(open_page, corpus)
    sp.search("a blue square")
    sp.wait_for_results("“a blue square”")
    source = int(sp.cards().first.get_attribute("data-id") or "-1")
    # A shared link: more like a blue square, within the green pictures' folders only.
    prefix = str(corpus.root / "green_")
    link = open_search(open_page, corpus, f"/?similar={source}&{urlencode({'prefix': prefix})}")
    link.wait_for_results(f"like image {source}")
    paths = link.result_paths()
    assert len(paths) == DEFAULT_K and all(p.startswith(prefix) for p in paths)
    assert link.url_params() == {"similar": str(source), "prefix": prefix}


@pytest.mark.parametrize("viewport", ["desktop", "phone"])
def test_a_result_opens_with_its_metadata_by_keyboard(
    open_page: OpenPage, corpus: Corpus, viewport: str
) -> None:
    sp = open_search(open_page, corpus, viewport=viewport)
    page = sp.page
    page.keyboard.press("/")  # "/" jumps to the search box
    assert sp.query_box.evaluate("box => box === document.activeElement")
    page.keyboard.type("a red circle")
    page.keyboard.press("Enter")
    sp.wait_for_results("“a red circle”")
    paths, ids = sp.result_paths(), sp.result_ids()

    thumbs = page.locator("#grid .thumb")
    thumbs.first.focus()
    page.keyboard.press("ArrowRight")
    focused = page.evaluate("document.activeElement.closest('.card').dataset.id")
    assert int(focused) == ids[1]
    page.keyboard.press("Enter")

    viewer = page.locator("#viewer")
    page.wait_for_selector("#viewer[open][data-image='loaded']")
    assert page.locator("#viewer-title").inner_text() == "/".join(Path(paths[1]).parts[-2:])
    meta = page.locator("#viewer-meta").inner_text()
    assert paths[1] in meta and "96 × 96 px" in meta and "JPEG" in meta and "SHA-256" in meta
    assert page.locator("#viewer-img").evaluate("img => img.naturalWidth") == 96
    labels = page.locator("#viewer-labels .chip").all_inner_texts()
    assert labels and labels[0].startswith("red circle")
    assert sp.contrast_failures() == []
    screenshot(page, f"viewer-{viewport}")

    page.keyboard.press("Escape")
    viewer.wait_for(state="hidden")
    focused = page.evaluate("document.activeElement.closest('.card')?.dataset.id")
    assert int(focused) == ids[1]  # focus goes back to the card that opened it


@pytest.mark.parametrize("viewport", ["desktop", "phone"])
def test_a_rejected_upload_shows_the_servers_message(
    open_page: OpenPage, corpus: Corpus, tmp_path: Path, viewport: str
) -> None:
    bad = tmp_path / "holiday.jpg"
    bad.write_bytes(b"these bytes are not a picture at all")
    refusal = httpx.post(
        corpus.url("/search/image"),
        files={"file": (bad.name, bad.read_bytes(), "image/jpeg")},
        headers={"X-API-Key": READ_KEY},
    )
    assert refusal.status_code == 422
    code, message = refusal.json()["code"], refusal.json()["message"]

    sp = open_search(open_page, corpus, viewport=viewport)
    sp.choose_file(bad)
    shown = sp.wait_for_message(code).inner_text()
    assert shown == f"The server rejected the image: {message}"
    assert sp.cards().count() == 0
    assert sp.horizontal_overflow() == 0
    assert sp.contrast_failures() == []
    screenshot(sp.page, f"upload-rejected-{viewport}")


def test_the_url_round_trips_a_query_and_back_works(open_page: OpenPage, corpus: Corpus) -> None:
    sp = open_search(open_page, corpus)
    prefix = str(corpus.root / "red_")
    sp.set_filter("prefix", prefix)
    sp.set_filter("k", "12")
    sp.search("a red circle")
    sp.wait_for_results("“a red circle”")
    assert sp.url_params() == {"q": "a red circle", "k": "12", "prefix": prefix}
    paths, ids = sp.result_paths(), sp.result_ids()
    assert len(ids) == 12 and all(p.startswith(prefix) for p in paths)
    assert classes_of(paths[:5]) == ["red_circle"] * 5

    shared = SearchPage(open_page(sp.page.url, key=READ_KEY))  # someone opens the link
    shared.wait_for_results("“a red circle”")
    assert shared.result_ids() == ids
    assert shared.query_box.input_value() == "a red circle"
    assert shared.page.locator("#k").input_value() == "12"
    assert shared.page.locator("#prefix").input_value() == prefix

    sp.type_query("a red square")
    sp.wait_for_results("“a red square”")
    assert sp.url_params()["q"] == "a red square"
    sp.page.go_back()
    sp.wait_for_results("“a red circle”")
    assert sp.query_box.input_value() == "a red circle"
    assert sp.result_ids() == ids
    sp.page.go_forward()
    sp.wait_for_results("“a red square”")
    assert sp.query_box.input_value() == "a red square"


def test_folder_and_date_filters_narrow_the_results(open_page: OpenPage, corpus: Corpus) -> None:
    sp = open_search(open_page, corpus)
    prefix = str(corpus.root / "green_")
    sp.set_filter("prefix", prefix)
    sp.search("a blue square")  # nothing blue passes the filter: the best green pictures do
    sp.wait_for_results("“a blue square”")
    paths = sp.result_paths()
    assert len(paths) == DEFAULT_K and all(p.startswith(prefix) for p in paths)

    today = dt.date.today()
    sp.set_filter("from", (today + dt.timedelta(days=1)).isoformat())
    no_results = sp.wait_for_message("no_results")
    assert "filters" in no_results.inner_text()
    assert sp.cards().count() == 0

    sp.set_filter("from", "")
    sp.set_filter("to", today.isoformat())  # "until" includes the whole day
    sp.wait_for_results("“a blue square”")
    assert sp.result_paths() == paths
    assert sp.page.locator("#message").is_hidden()
    assert sp.url_params()["to"] == today.isoformat()


def test_capture_date_and_camera_filters(open_page: OpenPage, corpus: Corpus) -> None:
    # The corpus's pictures carry no EXIF: their capture date is the file's modification time
    # (today), and they have no camera.
    sp = open_search(open_page, corpus)
    today = dt.date.today()
    sp.set_filter("taken-from", (today + dt.timedelta(days=1)).isoformat())
    sp.search("a blue square")
    assert "filters" in sp.wait_for_message("no_results").inner_text()
    assert sp.url_params() == {
        "q": "a blue square",
        "taken_from": (today + dt.timedelta(days=1)).isoformat(),
    }

    sp.set_filter("taken-from", "")
    sp.set_filter("taken-to", today.isoformat())  # "until" includes the whole day
    sp.wait_for_results("“a blue square”")
    assert sp.cards().count() == DEFAULT_K
    assert sp.url_params()["taken_to"] == today.isoformat()

    sp.set_filter("camera", "Apple iPhone 15 Pro")
    sp.wait_for_message("no_results")
    assert sp.url_params()["camera"] == "Apple iPhone 15 Pro"

    shared = SearchPage(open_page(sp.page.url, key=READ_KEY))  # the link keeps both filters
    shared.wait_for_message("no_results")
    assert shared.page.locator("#camera").input_value() == "Apple iPhone 15 Pro"
    assert shared.page.locator("#taken-to").input_value() == today.isoformat()


def test_thumbnails_load_only_near_the_viewport(open_page: OpenPage, corpus: Corpus) -> None:
    sp = open_search(open_page, corpus, "/?q=a+red+circle&k=96", viewport="phone")
    sp.wait_for_results("“a red circle”")
    assert sp.cards().count() == 96
    sp.wait_for_thumbnails(2)
    last = sp.cards().last
    assert last.get_attribute("data-thumb") is None
    assert last.locator("img").get_attribute("src") is None
    last.scroll_into_view_if_needed()
    sp.page.wait_for_selector("#grid > li.card:last-child[data-thumb='loaded']")


def chips_by_path(sp: SearchPage) -> dict[str, list[str]]:
    """The label names on each result card ("blue square 97%" -> "blue square")."""
    return {
        card.get_attribute("data-path") or "": [
            chip.rsplit(" ", 1)[0] for chip in card.locator(".chip").all_inner_texts()
        ]
        for card in sp.cards().all()
    }


def test_a_label_filter_narrows_the_results(open_page: OpenPage, corpus: Corpus) -> None:
    counts = httpx.get(
        corpus.url(f"/labels/{LABEL_SET}/counts"), headers={"X-API-Key": READ_KEY}
    ).json()["counts"]
    option_text = f"blue square ({counts.get('blue square', 0)})"  # images it is best for
    sp = open_search(open_page, corpus)
    label = sp.page.locator("#label")
    assert label.is_visible()
    assert label.locator("optgroup").get_attribute("label") == LABEL_SET
    assert len(label.locator("option").all()) == len(LABELS) + 1  # and "Any label"

    sp.search("a blue square")
    sp.wait_for_results("“a blue square”")
    before = chips_by_path(sp)
    dropped = {path for path, names in before.items() if "blue square" not in names}
    assert len(before) == DEFAULT_K and dropped  # blue circles and the like come next

    label.select_option(label=option_text)
    sp.wait_for_results("“a blue square”")
    after = chips_by_path(sp)
    assert 5 <= len(after) < len(before)
    assert all("blue square" in names for names in after.values()), after
    assert not dropped & set(after)
    assert classes_of(sp.result_paths()[:5]) == ["blue_square"] * 5
    assert sp.url_params() == {"q": "a blue square", "label": "blue square", "set": LABEL_SET}

    shared = SearchPage(open_page(sp.page.url, key=READ_KEY))  # the filter travels in the URL
    shared.wait_for_results("“a blue square”")
    assert shared.result_paths() == sp.result_paths()
    assert shared.page.locator("#label option:checked").inner_text() == option_text

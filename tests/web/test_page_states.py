"""The page's empty and error states, against a real server that has no index yet (auth off)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

from retrieval.catalog.database import Catalog
from tests.conftest import TINY
from tests.serving import running_server, start_server, wait_healthy
from tests.web.conftest import OpenPage, screenshot
from tests.web.search_page import SearchPage

pytestmark = pytest.mark.slow  # starts a server


@pytest.fixture(scope="module")
def empty_server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    work = tmp_path_factory.mktemp("web-empty")
    (work / "data").mkdir()  # an empty data dir: serve refuses one that does not exist
    # An empty catalog, as the setup script's `clipsearch db upgrade` leaves it (with none at
    # all, the server would answer 503 until the first index run creates one).
    empty = Catalog(f"sqlite:///{work / 'data' / 'catalog.db'}")
    empty.upgrade()
    empty.dispose()
    serve_settings = {
        "CLIPSEARCH_DATA_DIR": str(work / "data"),
        "CLIPSEARCH_MODEL": TINY,
        "CLIPSEARCH_PRETRAINED": str(tiny_checkpoint),
        "CLIPSEARCH_DEVICE": "cpu",
    }
    with running_server(serve_settings, work / "serve.log") as server:
        yield server.base_url


@pytest.mark.parametrize("viewport", ["desktop", "phone"])
def test_no_index_yet_says_what_to_do(
    open_page: OpenPage, empty_server: str, viewport: str
) -> None:
    sp = SearchPage(open_page(empty_server + "/", viewport=viewport))  # no key: auth is off
    message = sp.wait_for_message("no_index").inner_text()
    assert "No index yet" in message and "clipsearch index" in message
    assert sp.index_status() == "Generation 0 · 0 images · no model yet"
    sp.search("a red circle")
    sp.wait_for_results("0 results")
    assert sp.wait_for_message("no_index").is_visible()
    assert sp.cards().count() == 0
    assert sp.horizontal_overflow() == 0
    assert sp.contrast_failures() == []
    screenshot(sp.page, f"empty-{viewport}")


@pytest.fixture(scope="module")
def server_without_catalog(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    work = tmp_path_factory.mktemp("web-no-catalog")
    (work / "data").mkdir()  # serve started before the first `clipsearch index`
    serve_settings = {
        "CLIPSEARCH_DATA_DIR": str(work / "data"),
        "CLIPSEARCH_MODEL": TINY,
        "CLIPSEARCH_PRETRAINED": str(tiny_checkpoint),
        "CLIPSEARCH_DEVICE": "cpu",
    }
    server = start_server(serve_settings, work / "serve.log")
    try:
        wait_healthy(server)  # /ready stays 503 until an index exists
        yield server.base_url
    finally:
        server.stop()


def test_a_server_started_before_the_first_index_says_no_index_yet(
    open_page: OpenPage, server_without_catalog: str
) -> None:
    sp = SearchPage(open_page(server_without_catalog + "/"))
    message = sp.wait_for_message("no_index").inner_text()
    assert "No index yet" in message and "clipsearch index" in message
    assert sp.index_status() == "No index yet"
    sp.search("a red circle")  # the server answers 503 no_catalog: the same words, no error
    sp.page.wait_for_function("() => document.body.dataset.results === 'failed'")
    assert sp.wait_for_message("no_index").is_visible()
    assert sp.cards().count() == 0


def test_an_unreachable_server_is_reported_and_retry_recovers(
    open_page: OpenPage, empty_server: str
) -> None:
    page = open_page(empty_server + "/")
    sp = SearchPage(page)
    sp.wait_for_message("no_index")

    # The network drops every API call (the page's own files are already loaded).
    def is_api_call(url: str) -> bool:
        return "/web/" not in url

    page.route(is_api_call, lambda route: route.abort("connectionrefused"))
    sp.search("a red circle")
    message = sp.wait_for_message("unreachable").inner_text()
    assert "unreachable" in message and "clipsearch serve" in message
    assert sp.index_status() == "Server unreachable"
    assert sp.contrast_failures() == []
    screenshot(page, "unreachable-desktop")

    page.unroute(is_api_call)
    page.get_by_role("button", name="Retry").click()
    sp.wait_for_message("no_index")
    assert sp.index_status().startswith("Generation 0")


# What /index answers while one of three shards is corrupt and left out (api/routes/system.py).
DEGRADED_INDEX = {
    "generation": 7,
    "shard_count": 2,
    "vector_count": 24,
    "live_vector_count": 24,
    "index_kinds": {"flat": 2},
    "model": {"name": "clipsearch-tiny", "pretrained": "/weights/tiny.pt"},
    "images": {"active": 36},
    "degraded": True,
    "corrupt_shards": [
        {
            "id": "20261203T1200-ab12cd34",
            "reason": "index.faiss: sha256 differs",
            "vector_count": 12,
        }
    ],
    "unserved_vector_count": 12,
    "repair": "clipsearch repair",
}


def test_a_degraded_index_is_named_in_the_header(open_page: OpenPage, empty_server: str) -> None:
    page = open_page(empty_server + "/")
    page.route(
        lambda url: urlparse(url).path == "/index",
        lambda route: route.fulfill(json=DEGRADED_INDEX),
    )
    page.reload()
    page.wait_for_selector("body[data-degraded='true']")
    assert SearchPage(page).index_status() == (
        "Generation 7 · 24 images · clipsearch-tiny (tiny.pt) · degraded: 1 corrupt shard not "
        "served (12 images); run “clipsearch repair”"
    )


def test_an_index_with_every_shard_corrupt_is_not_called_empty(
    open_page: OpenPage, empty_server: str
) -> None:
    nothing_served = {
        **DEGRADED_INDEX,
        "shard_count": 0,
        "vector_count": 0,
        "live_vector_count": 0,
        "index_kinds": {},
        "unserved_vector_count": 36,
    }
    page = open_page(empty_server + "/")
    page.route(
        lambda url: urlparse(url).path == "/index",
        lambda route: route.fulfill(json=nothing_served),
    )
    page.reload()
    page.wait_for_selector("body[data-degraded='true']")
    sp = SearchPage(page)
    assert "degraded: 1 corrupt shard not served (36 images)" in sp.index_status()
    assert page.locator("body").get_attribute("data-index") == "ready"
    assert page.locator("#message[data-code='no_index']").count() == 0


RANDOM_WEIGHTS_EN = (
    "Random weights (pretrained=none): results are meaningless. Get real weights with "
    "“clipsearch models” and index again."
)
RANDOM_WEIGHTS_ZH = (
    "随机权重（pretrained=none）：搜索结果没有意义。请用“clipsearch models”获取真实权重后重新索引。"
)


@pytest.mark.parametrize("viewport", ["desktop", "phone"])
def test_random_weights_are_named_in_the_header(
    open_page: OpenPage, empty_server: str, viewport: str
) -> None:
    page = open_page(empty_server + "/", viewport=viewport)
    sp = SearchPage(page)
    sp.wait_for_message("no_index")
    assert sp.model_warning().is_hidden()  # the server's tiny model has trained weights
    random_index = {
        **DEGRADED_INDEX,
        "degraded": False,
        "corrupt_shards": [],
        "unserved_vector_count": 0,
        "repair": None,
        "random_weights": True,
    }
    page.route(
        lambda url: urlparse(url).path == "/index",
        lambda route: route.fulfill(json=random_index),
    )
    page.reload()
    sp.model_warning().wait_for(state="visible")
    assert sp.model_warning().inner_text() == RANDOM_WEIGHTS_EN
    assert sp.contrast_failures() == [] and sp.horizontal_overflow() == 0
    screenshot(page, f"random-weights-{viewport}")
    sp.choose_language("zh-CN")
    assert sp.model_warning().inner_text() == RANDOM_WEIGHTS_ZH

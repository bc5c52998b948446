"""The search page in English and Chinese: it speaks the browser's language, a switch keeps the
search on screen, the choice lasts; and Chinese (or emoji) queries reach the API unchanged."""

from __future__ import annotations

import datetime as dt
import re
from urllib.parse import urlencode

import httpx
import pytest

from retrieval.training.shapes_model import SHAPES_MODEL
from tests.web.conftest import OpenPage, screenshot
from tests.web.corpus import CORPUS_IMAGES, DEFAULT_K, READ_KEY, Corpus, open_search
from tests.web.search_page import SearchPage

pytestmark = pytest.mark.slow  # trains the semantic model once per session, starts a server

LANGUAGE_STORAGE = "clipsearch.language"  # api/web/i18n.js
TYPING_PAUSE_MS = 300  # api/web/app.js
# Chinese, an emoji outside the Basic Multilingual Plane (two UTF-16 units), and English.
MIXED_QUERY = "红色的圆形 🔴 a red circle"


@pytest.mark.parametrize(
    ("locale", "viewport", "language"),
    [("zh-CN", "desktop", "zh-CN"), ("zh-CN", "phone", "zh-CN"), ("en-US", "desktop", "en")],
)
def test_the_page_speaks_the_browsers_language(
    open_page: OpenPage, corpus: Corpus, locale: str, viewport: str, language: str
) -> None:
    sp = open_search(open_page, corpus, viewport=viewport, locale=locale)
    page = sp.page
    chinese = language == "zh-CN"
    assert sp.language() == language
    assert page.locator("#language").input_value() == language
    submit = page.locator("#search-form button[type='submit']")
    assert submit.inner_text() == ("搜索" if chinese else "Search")
    # The box's accessible name and placeholder are translated too.
    box = page.get_by_label("按文字搜索" if chinese else "Search by text")
    assert box.get_attribute("id") == "q"
    assert (box.get_attribute("placeholder") or "").startswith("描述" if chinese else "Describe")
    images = f"{CORPUS_IMAGES} 张图片" if chinese else f"{CORPUS_IMAGES} images"
    generation = r"第 \d+ 代" if chinese else r"Generation \d+"
    assert re.match(rf"{generation} · {images} · {re.escape(SHAPES_MODEL)} ", sp.index_status())

    sp.search("a blue square")
    summary = f"“a blue square”：{DEFAULT_K} 个结果" if chinese else f"{DEFAULT_K} results for"
    sp.wait_for_results(summary)
    first = sp.cards().first
    assert first.locator(".score").inner_text().startswith("得分 0." if chinese else "score 0.")
    similar = "查找相似图片" if chinese else "More like this"
    assert first.locator(".similar").inner_text() == similar
    assert sp.horizontal_overflow() == 0
    assert sp.contrast_failures() == []
    sp.wait_for_thumbnails(2)
    screenshot(page, f"language-{locale}-{viewport}")


def test_the_viewer_speaks_chinese(open_page: OpenPage, corpus: Corpus) -> None:
    sp = open_search(open_page, corpus, locale="zh-CN")
    sp.search("a red circle")
    sp.wait_for_results("“a red circle”")
    sp.cards().first.locator(".thumb").click()
    sp.page.wait_for_selector("#viewer[open][data-image='loaded']")
    terms = sp.page.locator("#viewer-meta dt").all_inner_texts()
    # The generated corpus has no EXIF: the capture time is the file's, and no camera or place.
    assert terms == [
        "路径",
        "得分",
        "尺寸",
        "格式",
        "拍摄时间",
        "文件大小",
        "索引时间",
        "图片 ID",
        "SHA-256",
    ]
    assert "文件日期：照片中没有拍摄时间" in sp.page.locator("#viewer-meta").inner_text()
    assert "96 × 96 像素" in sp.page.locator("#viewer-meta").inner_text()
    assert sp.page.get_by_role("button", name="关闭").is_visible()
    assert sp.contrast_failures() == []
    screenshot(sp.page, "viewer-zh-CN-desktop")


def test_switching_language_keeps_the_query_and_the_results(
    open_page: OpenPage, corpus: Corpus
) -> None:
    sp = open_search(open_page, corpus)  # an English browser
    page = sp.page
    sp.search("a blue square")
    sp.wait_for_results(f"{DEFAULT_K} results for “a blue square”")
    sp.wait_for_thumbnails(4)
    ids, url = sp.result_ids(), page.url
    thumbnail = sp.cards().first.locator("img").get_attribute("src")
    searches = sp.record_text_searches()

    sp.choose_language("zh-CN")
    assert sp.language() == "zh-CN"
    assert sp.status().startswith(f"“a blue square”：{DEFAULT_K} 个结果")
    assert re.match(rf"第 \d+ 代 · {CORPUS_IMAGES} 张图片 · ", sp.index_status())
    assert page.locator("#search-form button[type='submit']").inner_text() == "搜索"
    assert page.locator("#q-hint").inner_text().startswith("边输入边出结果（按 / 键")
    assert page.locator("#results").get_attribute("aria-label") == "结果"
    first = sp.cards().first
    assert first.locator(".similar").inner_text() == "查找相似图片"
    similar_name = first.locator(".similar").get_attribute("aria-label") or ""
    assert similar_name.startswith("查找相似图片：")
    # The same search and the same pictures, not fetched again.
    assert sp.query_box.input_value() == "a blue square"
    assert sp.result_ids() == ids and page.url == url
    assert first.locator("img").get_attribute("src") == thumbnail
    screenshot(page, "language-switched-desktop")

    sp.choose_language("en")
    assert sp.language() == "en"
    assert sp.status().startswith(f"{DEFAULT_K} results for “a blue square”")
    assert sp.index_status().startswith("Generation ")
    assert first.locator(".similar").inner_text() == "More like this"
    assert searches == []  # neither switch searched again


def test_a_message_on_screen_changes_language_too(open_page: OpenPage, corpus: Corpus) -> None:
    sp = open_search(open_page, corpus)
    sp.search("a blue square")
    sp.wait_for_results("“a blue square”")
    sp.set_filter("from", (dt.date.today() + dt.timedelta(days=1)).isoformat())
    assert "filters" in sp.wait_for_message("no_results").inner_text()
    sp.choose_language("zh-CN")
    assert "筛选条件" in sp.wait_for_message("no_results").inner_text()
    assert sp.query_box.input_value() == "a blue square"


def test_the_language_choice_survives_a_reload(open_page: OpenPage, corpus: Corpus) -> None:
    sp = open_search(open_page, corpus, "/?q=a+red+circle")  # an English browser
    sp.wait_for_results("results for “a red circle”")
    sp.choose_language("zh-CN")
    sp.page.reload()
    sp.page.wait_for_selector("body[data-ready='true']")
    sp.wait_for_results("“a red circle”：")
    assert sp.language() == "zh-CN"
    assert sp.page.evaluate(f"localStorage.getItem({LANGUAGE_STORAGE!r})") == "zh-CN"

    # A Chinese browser whose user prefers English: the choice beats the browser's language.
    zh = open_search(open_page, corpus, locale="zh-CN")
    assert zh.language() == "zh-CN"
    zh.choose_language("en")
    zh.page.reload()
    zh.page.wait_for_selector("body[data-ready='true']")
    assert zh.language() == "en" and zh.index_status().startswith("Generation ")


def test_a_chinese_query_reaches_the_api_intact(open_page: OpenPage, corpus: Corpus) -> None:
    sp = open_search(open_page, corpus, locale="zh-CN")
    searches = sp.record_text_searches()
    sp.type_query(MIXED_QUERY)
    sp.wait_for_results(f"“{MIXED_QUERY}”：{DEFAULT_K} 个结果")
    assert searches and searches[-1] == MIXED_QUERY
    assert sp.url_params() == {"q": MIXED_QUERY}
    # Percent-encoded UTF-8 in the address bar, as a form would send it.
    assert sp.page.evaluate("location.search") == "?" + urlencode({"q": MIXED_QUERY})
    ids = sp.result_ids()
    assert len(ids) == DEFAULT_K

    # The server encoded exactly this text: the same text again comes from its query cache.
    direct = httpx.post(
        corpus.url("/search/text"),
        json={"query": MIXED_QUERY, "k": DEFAULT_K},
        headers={"X-API-Key": READ_KEY},
    ).json()
    assert direct["cached_query"] is True
    assert [hit["id"] for hit in direct["results"]] == ids

    shared = SearchPage(open_page(sp.page.url, key=READ_KEY, locale="zh-CN"))  # a shared link
    shared.wait_for_results(f"“{MIXED_QUERY}”")
    assert shared.query_box.input_value() == MIXED_QUERY
    assert shared.result_ids() == ids
    screenshot(sp.page, "query-zh-CN-desktop")


def test_an_input_method_searches_only_the_committed_words(
    open_page: OpenPage, corpus: Corpus
) -> None:
    sp = open_search(open_page, corpus, locale="zh-CN")
    searches = sp.record_text_searches()
    sp.compose("hong")  # pinyin on the way to 红色: the box shows it, it is not a query yet
    sp.compose("hongse")
    assert sp.query_box.input_value() == "hongse"
    sp.page.wait_for_timeout(3 * TYPING_PAUSE_MS)
    assert searches == [] and sp.url_params() == {}
    sp.commit_composition("红色")
    sp.wait_for_results("“红色”")
    assert searches == ["红色"]
    assert sp.url_params() == {"q": "红色"}

"""Text, image and similar search through HTTP."""

from __future__ import annotations

import io
from pathlib import Path

from fastapi.testclient import TestClient
from PIL import Image

from retrieval.catalog.database import Catalog


def test_text_search_returns_results_with_urls_and_timings(client: TestClient) -> None:
    response = client.post("/search/text", json={"query": "a red circle", "k": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["results"]) == 5
    hit = body["results"][0]
    assert {"id", "path", "score", "width", "height", "file_url", "thumbnail_url"} <= set(hit)
    assert hit["file_url"] == f"/images/{hit['id']}/file"
    assert hit["thumbnail_url"] == f"/images/{hit['id']}/thumbnail"
    assert body["generation"] >= 1
    assert body["model"] == "clipsearch-tiny"
    assert {"encode", "search", "metadata", "total"} <= set(body["took_ms"])
    scores = [h["score"] for h in body["results"]]
    assert scores == sorted(scores, reverse=True)


def test_get_search_matches_post_and_second_query_is_cached(client: TestClient) -> None:
    first = client.post("/search/text", json={"query": "a blue square", "k": 4}).json()
    second = client.get("/search", params={"q": "a blue square", "k": 4}).json()
    assert [h["id"] for h in first["results"]] == [h["id"] for h in second["results"]]
    assert second["cached_query"] is True


def test_image_search_finds_the_uploaded_image_first(
    client: TestClient, indexed: Path, catalog: Catalog
) -> None:
    path = sorted(indexed.rglob("*.jpg"))[0]
    wanted = catalog.records_under([str(indexed)])[str(path)].id
    with path.open("rb") as f:
        response = client.post(
            "/search/image", files={"file": (path.name, f, "image/jpeg")}, data={"k": "3"}
        )
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["id"] == wanted


def test_image_search_with_filters_form_field(client: TestClient) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(buf, "PNG")
    response = client.post(
        "/search/image",
        files={"file": ("q.png", buf.getvalue(), "image/png")},
        data={"k": "5", "filters": '{"min_width": 1000000}'},
    )
    assert response.status_code == 200, response.text
    assert response.json()["results"] == []


def test_similar_excludes_itself_and_unknown_id_is_404(client: TestClient) -> None:
    top = client.get("/search", params={"q": "a green triangle", "k": 1}).json()["results"][0]
    response = client.get(f"/images/{top['id']}/similar", params={"k": 5})
    assert response.status_code == 200, response.text
    ids = [h["id"] for h in response.json()["results"]]
    assert len(ids) == 5 and top["id"] not in ids
    missing = client.get("/images/999999/similar")
    assert missing.status_code == 404
    assert missing.json()["code"] == "not_found"

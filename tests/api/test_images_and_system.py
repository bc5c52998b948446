"""Metadata, files, thumbnails, health, readiness, metrics, index info, reload."""

from __future__ import annotations

import io
from pathlib import Path

from fastapi.testclient import TestClient
from PIL import Image

from indexer.pipeline import IndexJob
from retrieval.catalog.database import Catalog
from retrieval.config import Settings
from retrieval.models.encoder import Encoder
from retrieval.training.shapes import generate_shapes
from tests.api.conftest import CORPUS_SIZE


def _some_id(client: TestClient) -> int:
    return int(client.get("/search", params={"q": "a shape", "k": 1}).json()["results"][0]["id"])


def test_metadata_file_and_thumbnail(client: TestClient) -> None:
    image_id = _some_id(client)
    meta = client.get(f"/images/{image_id}")
    assert meta.status_code == 200
    info = meta.json()
    assert info["id"] == image_id and info["status"] == "active"
    file = client.get(info["file_url"])
    assert file.status_code == 200
    assert file.content == Path(info["path"]).read_bytes()
    thumb = client.get(info["thumbnail_url"], params={"size": 100000})
    assert thumb.status_code == 200
    assert thumb.headers["content-type"] == "image/jpeg"
    assert "max-age" in thumb.headers["cache-control"] and thumb.headers["etag"]
    picture = Image.open(io.BytesIO(thumb.content))
    assert max(picture.size) <= 512
    again = client.get(
        info["thumbnail_url"],
        params={"size": 100000},
        headers={"If-None-Match": thumb.headers["etag"]},
    )
    assert again.status_code == 304
    assert client.get("/images/987654").json()["code"] == "not_found"


def test_health_ready_index_metrics(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    index = client.get("/index").json()
    assert index["generation"] >= 1 and index["shard_count"] >= 1
    assert index["vector_count"] == CORPUS_SIZE and index["model"]["name"] == "clipsearch-tiny"
    assert sum(index["index_kinds"].values()) == index["shard_count"]
    client.get("/search", params={"q": "a red circle"})
    text = client.get("/metrics").text
    assert 'clipsearch_http_requests_total{method="GET",route="/search",status="200"}' in text
    assert "clipsearch_query_encode_seconds_bucket" in text
    assert "clipsearch_search_seconds_count" in text
    assert f"clipsearch_index_vectors {CORPUS_SIZE}" in text
    assert f"clipsearch_index_generation {index['generation']}" in text


def test_openapi_lists_every_endpoint(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/search/text",
        "/search",
        "/search/image",
        "/images/{image_id}",
        "/images/{image_id}/similar",
        "/images/{image_id}/file",
        "/images/{image_id}/thumbnail",
        "/health",
        "/ready",
        "/metrics",
        "/index",
        "/admin/reload",
    ):
        assert path in paths
    assert client.get("/docs").status_code == 200


def test_admin_reload_picks_up_a_new_generation(
    client: TestClient, settings: Settings, catalog: Catalog, encoder: Encoder, tmp_path: Path
) -> None:
    before = client.get("/index").json()["generation"]
    more = tmp_path / "more"
    generate_shapes(more, 6, seed=9)
    IndexJob(settings, catalog, lambda: encoder, progress=False).run([str(more)])
    assert client.get("/index").json()["generation"] == before  # not polled (interval 0)
    response = client.post("/admin/reload")
    assert response.status_code == 200
    assert response.json() == {"swapped": True, "generation": before + 1}
    assert client.get("/index").json()["vector_count"] == CORPUS_SIZE + 6
    assert client.post("/admin/reload").json()["swapped"] is False

"""Filtered search is the exact top-k among the allowed ids (checked by brute force)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from retrieval.catalog.database import Catalog
from retrieval.filters import SearchFilters, ids_passing
from retrieval.models.encoder import Encoder
from tests.conftest import BOTH_DATABASES, fresh_database


@pytest.fixture(params=BOTH_DATABASES)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Filters are SQL: run them on both databases."""
    yield from fresh_database(request.param, tmp_path)


def _expected(
    client: TestClient, catalog: Catalog, encoder: Encoder, query: str, ids: np.ndarray, k: int
) -> list[int]:
    searcher = client.app.state.services.searcher  # type: ignore[attr-defined]
    found, vectors = searcher.snapshot().shards.vectors(ids)
    q = encoder.encode_texts([query])[0]
    scores = vectors @ q
    order = np.lexsort((found, -scores))
    return [int(found[i]) for i in order[:k]]


@pytest.mark.parametrize(
    "filters",
    [
        {"formats": ["png"]},
        {"min_width": 60},
        {"max_width": 60, "max_height": 60},
        {"path_prefix": "PREFIX"},
        {"indexed_after": "2000-01-01T00:00:00Z", "indexed_before": "2100-01-01T00:00:00"},
    ],
)
def test_filtered_search_is_exact_top_k(
    client: TestClient, catalog: Catalog, encoder: Encoder, filters: dict[str, object]
) -> None:
    records = catalog.records(range(1, 1000))
    if filters.get("path_prefix") == "PREFIX":
        first = sorted(r.path for r in records.values())[0]
        filters = {"path_prefix": first[: first.rfind("/") + 1] + first.rsplit("/", 1)[1][:4]}
    query = "a yellow star"
    from api.schemas import Filters

    ids = ids_passing(catalog, Filters.model_validate(filters).to_domain())
    assert ids is not None and 0 < len(ids) <= len(records)
    k = 5
    response = client.post("/search/text", json={"query": query, "k": k, "filters": filters})
    assert response.status_code == 200, response.text
    got = [h["id"] for h in response.json()["results"]]
    want = _expected(client, catalog, encoder, query, ids, k)
    assert len(got) == min(k, len(ids))
    assert got == want


def test_filter_matching_nothing_gives_no_results(client: TestClient) -> None:
    body = client.post(
        "/search/text", json={"query": "a", "filters": {"path_prefix": "/nowhere/"}}
    ).json()
    assert body["results"] == []


def test_no_filters_means_no_id_set(catalog: Catalog) -> None:
    assert ids_passing(catalog, None) is None
    assert ids_passing(catalog, SearchFilters()) is None


def test_more_like_this_with_filters_is_exact_top_k_among_allowed(
    client: TestClient, catalog: Catalog
) -> None:
    records = catalog.records(range(1, 1000))
    mixed = sorted(r.path for r in records.values() if "/mixed/" in r.path)
    filters = {"path_prefix": mixed[0][: mixed[0].rfind("/") + 1]}  # 12 of the 36 images
    from api.schemas import Filters

    ids = ids_passing(catalog, Filters.model_validate(filters).to_domain())
    assert ids is not None and len(ids) == len(mixed) < len(records)
    source = int(ids[0])
    unfiltered = client.get(f"/images/{source}/similar", params={"k": 5}).json()["results"]
    # The filter matters here: without it, images outside the folder are among the top 5.
    assert any("/mixed/" not in h["path"] for h in unfiltered)
    response = client.get(
        f"/images/{source}/similar", params={"k": 5, "filters": json.dumps(filters)}
    )
    assert response.status_code == 200, response.text
    got = [h["id"] for h in response.json()["results"]]
    # Brute force over the allowed stored vectors, the source image itself left out.
    searcher = client.app.state.services.searcher  # type: ignore[attr-defined]
    found, vectors = searcher.snapshot().shards.vectors(ids)
    query = vectors[list(found).index(source)]
    keep = found != source
    scores = vectors[keep] @ query
    order = np.lexsort((found[keep], -scores))
    assert got == [int(found[keep][i]) for i in order[:5]]


def test_more_like_this_rejects_a_bad_filter_object(client: TestClient) -> None:
    top = client.get("/search", params={"q": "a red circle", "k": 1}).json()["results"][0]
    response = client.get(f"/images/{top['id']}/similar", params={"filters": "{not json"})
    assert response.status_code == 422
    assert response.json()["code"] == "validation_error"

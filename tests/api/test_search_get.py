"""GET /search takes every filter of POST /search/text, as query parameters, with the same
results; a parameter it does not know is a 422 that names it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import numpy as np
import pytest
from fastapi.testclient import TestClient

from api.schemas import Filters
from indexer.labelling import LabelJob
from retrieval.catalog.database import Catalog
from retrieval.config import Settings
from retrieval.labels.store import LabelStore
from retrieval.models.encoder import Encoder
from retrieval.training.shapes import COLOURS, SHAPES

QUERY, K = "a red circle", 36  # k = the whole corpus: any filter shows in the result


@pytest.fixture
def labelled(
    client: TestClient, settings: Settings, catalog: Catalog, encoder: Encoder
) -> TestClient:
    names = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
    definition = {"labels": names, "templates": ["a {}"], "top_k": 3}
    assert client.put("/label-sets/shapes", json=definition).status_code == 201
    LabelJob(settings, catalog, lambda: encoder, progress=False).run()
    return client


def _cases(photos: Path, catalog: Catalog) -> dict[str, dict[str, Any]]:
    """One filter object per case; together they use every field of `Filters`."""
    stored = LabelStore(catalog).labels_for(range(1, 1000))
    common = [
        name for name, _ in Counter(x.label for v in stored.values() for x in v).most_common()
    ]
    scores = [x.score for v in stored.values() for x in v if x.label == common[0]]
    pair = next([x.label for x in v[:2]] for v in stored.values() if len(v) >= 2)
    return {
        "path_prefix": {"path_prefix": f"{photos}/mixed/"},
        "formats": {"formats": ["PNG", "gif"]},  # a list: the parameter repeated
        "min_width": {"min_width": 70},
        "max_width and min_height": {"max_width": 70, "min_height": 40},
        "max_height": {"max_height": 45},
        "indexed_after": {"indexed_after": "2999-01-01T00:00:00Z"},
        "indexed_before": {"indexed_before": "2000-01-02T00:00:00+01:00"},
        # No picture here has EXIF: each one is dated by its file's time, and has no camera
        # (tests/test_photo_library.py has photos that pass these).
        "taken_after": {"taken_after": "2999-01-01T00:00:00Z"},
        "taken_before": {"taken_before": "2000-01-02T00:00:00+01:00"},
        "camera": {"camera": "Apple iPhone 15 Pro"},
        "labels any": {"labels": common[:2]},
        "labels all": {"labels": pair, "labels_mode": "all"},
        "label score in a set": {
            "labels": [common[0].upper()],
            "label_min_score": float(np.median(scores)),
            "label_set": "shapes",
        },
    }


def _url(filters: dict[str, Any]) -> str:
    out = [("q", QUERY), ("k", str(K))]
    for name, value in filters.items():
        values = value if isinstance(value, list) else [value]
        out += [(name, str(v)) for v in values]
    return "/search?" + urlencode(out)


def _ids_and_scores(response: Any) -> list[tuple[int, float]]:
    assert response.status_code == 200, response.text
    return [(hit["id"], hit["score"]) for hit in response.json()["results"]]


def test_every_filter_gives_on_get_what_it_gives_on_post(
    labelled: TestClient, indexed: Path, catalog: Catalog
) -> None:
    cases = _cases(indexed, catalog)
    used = {name for filters in cases.values() for name in filters}
    missing = set(Filters.model_fields) - used
    assert not missing, f"add a case for the new filter(s) {sorted(missing)} to _cases"
    everything = _ids_and_scores(labelled.get(_url({})))
    assert len(everything) == K
    for case, filters in cases.items():
        body = {"query": QUERY, "k": K, "filters": filters}
        posted = _ids_and_scores(labelled.post("/search/text", json=body))
        got = _ids_and_scores(labelled.get(_url(filters)))
        assert got == posted, case
        assert got != everything, f"{case}: the filter changed nothing, so proves nothing"
    # A label no set defines is a bad query (400) on both.
    response = labelled.get("/search", params={"q": "a", "labels": "grey cloud"})
    assert response.status_code == 400, response.text
    assert response.json()["code"] == "bad_query"


REFUSED = [
    (
        "q=a&path_prefx=/photos/",
        "unknown query parameter 'path_prefx'; this route takes k, q, path_prefix, formats,",
    ),
    ("q=a&filters=%7B%7D&zzz=1", "unknown query parameter 'filters', 'zzz'; this route takes"),
    ("q=a&min_width=1&min_width=2", "query.min_width: given more than once"),
    ("q=a&min_width=wide", "query.min_width: Input should be a valid integer"),
    ("q=a&min_width=-1", "query.min_width: Input should be greater than or equal to 0"),
    ("q=a&labels=x&labels_mode=most", "query.labels_mode: Input should be 'any' or 'all'"),
    ("q=a&indexed_after=yesterday", "query.indexed_after: Input should be a valid datetime"),
    ("q=a&path_prefix=%00", "query.path_prefix: Value error, contains a NUL character"),
]


def test_what_get_search_cannot_take_is_a_422_naming_it(client: TestClient) -> None:
    for query, message in REFUSED:
        response = client.get(f"/search?{query}")
        assert response.status_code == 422, response.text
        assert response.json()["code"] == "validation_error"
        assert response.json()["message"].startswith(message), response.json()["message"]


def test_openapi_documents_every_filter_as_a_query_parameter(client: TestClient) -> None:
    operation = client.get("/openapi.json").json()["paths"]["/search"]["get"]
    names = [p["name"] for p in operation["parameters"]]
    assert names == ["q", "k", *Filters.model_fields]
    formats = next(p for p in operation["parameters"] if p["name"] == "formats")
    assert formats["explode"] is True and formats["schema"]["type"] == "array"

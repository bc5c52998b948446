"""Label sets over HTTP, labels on every result, label filters, counts, and POST /classify."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from indexer.labelling import LabelJob
from retrieval.catalog.database import Catalog
from retrieval.config import Settings
from retrieval.labels.store import LabelStore
from retrieval.models.encoder import Encoder
from retrieval.training.shapes import COLOURS, SHAPES
from tests.api.conftest import ADMIN_KEY, CORPUS_SIZE, READ_KEY

NAMES = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
DEFINITION = {"labels": NAMES, "templates": ["a {}", "a photo of a {}"], "top_k": 3}


def _png(colour: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 48), colour).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def labelled(
    client: TestClient, settings: Settings, catalog: Catalog, encoder: Encoder
) -> TestClient:
    """The corpus labelled with the set `shapes`, defined over HTTP, by `clipsearch label`."""
    assert client.put("/label-sets/shapes", json=DEFINITION).status_code == 201
    LabelJob(settings, catalog, lambda: encoder, progress=False).run()
    return client


def test_label_set_lifecycle(client: TestClient) -> None:
    created = client.put("/label-sets/docs", json={"labels": ["invoice", "receipt"]})
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["name"] == "docs" and body["version"] == 1 and body["labelled_version"] is None
    assert body["labels"] == ["invoice", "receipt"] and body["templates"] == "openai"
    same = client.put("/label-sets/docs", json={"labels": ["invoice", "receipt"]})
    assert same.status_code == 200 and same.json()["version"] == 1
    changed = client.put(
        "/label-sets/docs",
        json={"labels": ["invoice", {"name": "receipt", "synonyms": ["till slip"]}], "top_k": 1},
    )
    assert changed.status_code == 200 and changed.json()["version"] == 2
    assert changed.json()["label_options"] == {"receipt": {"synonyms": ["till slip"]}}
    # What GET returns can be PUT back unchanged.
    got = client.get("/label-sets/docs").json()
    keys = ("labels", "label_options", "templates", "top_k", "threshold", "store_cosine")
    again = client.put("/label-sets/docs", json={k: got[k] for k in keys})
    assert again.status_code == 200 and again.json()["version"] == 2
    listed = client.get("/label-sets").json()
    assert [s["name"] for s in listed["label_sets"]] == ["docs"]
    assert client.delete("/label-sets/docs").status_code == 204
    missing = client.get("/label-sets/docs")
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"
    assert client.delete("/label-sets/docs").status_code == 404


@pytest.mark.parametrize(
    ("path", "body", "code"),
    [
        ("/label-sets/docs", {"labels": ["a", "A"]}, "bad_label_set"),
        ("/label-sets/docs", {"labels": ["a"], "top_k": 0}, "bad_label_set"),
        ("/label-sets/docs", {"name": "other", "labels": ["a"]}, "bad_label_set"),
        ("/label-sets/docs", {"labels": ["a"], "templates": "/etc/passwd"}, "bad_label_set"),
        ("/label-sets/bad%20name", {"labels": ["a"]}, "bad_label_set"),
        ("/label-sets/docs", {"labels": []}, "validation_error"),
        ("/label-sets/docs", {"labels": ["a"], "colour": 1}, "validation_error"),
    ],
)
def test_bad_label_sets_are_422_with_a_code(
    client: TestClient, path: str, body: dict[str, object], code: str
) -> None:
    response = client.put(path, json=body)
    assert response.status_code == 422, response.text
    assert response.json()["code"] == code and "Traceback" not in response.text


def test_writing_label_sets_needs_an_admin_key(auth_client: TestClient) -> None:
    read = {"Authorization": f"Bearer {READ_KEY}"}
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    body = {"labels": ["a", "b"]}
    assert auth_client.put("/label-sets/x", json=body, headers=read).status_code == 403
    assert auth_client.put("/label-sets/x", json=body).status_code == 401
    assert auth_client.put("/label-sets/x", json=body, headers=admin).status_code == 201
    assert auth_client.get("/label-sets/x", headers=read).status_code == 200
    assert auth_client.get("/labels/x/counts", headers=read).status_code == 200
    assert auth_client.delete("/label-sets/x", headers=read).status_code == 403
    assert auth_client.delete("/label-sets/x", headers=admin).status_code == 204


def test_counts_cover_every_live_image(labelled: TestClient) -> None:
    body = labelled.get("/labels/shapes/counts").json()
    assert body["set"] == "shapes" and body["version"] == 1
    assert set(body["counts"]) == set(NAMES)
    assert sum(body["counts"].values()) + body["unlabelled"] == CORPUS_SIZE
    assert labelled.get("/labels/nope/counts").status_code == 404


def test_a_set_not_yet_labelled_counts_everything_unlabelled(client: TestClient) -> None:
    client.put("/label-sets/later", json={"labels": ["a", "b"]})
    body = client.get("/labels/later/counts").json()
    assert body == {"set": "later", "version": None, "counts": {}, "unlabelled": CORPUS_SIZE}


def test_every_result_carries_its_stored_labels(labelled: TestClient, catalog: Catalog) -> None:
    store = LabelStore(catalog)
    text = labelled.post("/search/text", json={"query": "a red circle", "k": 8}).json()
    image = labelled.post("/search/image", files={"file": ("q.png", _png())}).json()
    first = text["results"][0]["id"]
    similar = labelled.get(f"/images/{first}/similar", params={"k": 4}).json()
    results = text["results"] + image["results"] + similar["results"]
    expected = store.labels_for([r["id"] for r in results])
    for result in results:
        assert result["labels"] == [x.to_dict() for x in expected[result["id"]]]
        assert 1 <= len(result["labels"]) <= 3
        assert all(x["set"] == "shapes" for x in result["labels"])
        scores = [x["score"] for x in result["labels"]]
        assert scores == sorted(scores, reverse=True)
    meta = labelled.get(f"/images/{first}").json()
    assert meta["labels"] == text["results"][0]["labels"]


def _brute_force(
    client: TestClient, encoder: Encoder, query: str, ids: list[int], k: int
) -> list[int]:
    searcher = client.app.state.services.searcher  # type: ignore[attr-defined]
    found, vectors = searcher.snapshot().shards.vectors(np.array(ids, dtype=np.int64))
    scores = vectors @ encoder.encode_texts([query])[0]
    order = np.lexsort((found, -scores))
    return [int(found[i]) for i in order[:k]]


def _filters_for(case: str, everything: dict[int, list[Any]]) -> dict[str, object]:
    """Filters built from what the (untrained) model actually stored, so none is vacuous."""
    frequency = Counter(x.label for labels in everything.values() for x in labels)
    common = [name for name, _ in frequency.most_common()]
    if case == "one":
        return {"labels": [common[0]]}
    if case == "any":
        return {"labels": common[:2], "labels_mode": "any"}
    if case == "all":
        pair = next(labels[:2] for labels in everything.values() if len(labels) >= 2)
        return {"labels": [x.label for x in pair], "labels_mode": "all"}
    scores = [x.score for labels in everything.values() for x in labels if x.label == common[0]]
    return {
        "labels": [common[0].upper()],  # names match without regard to case
        "label_min_score": float(np.median(scores)),
        "label_set": "shapes",
    }


@pytest.mark.parametrize("case", ["one", "any", "all", "min_score"])
def test_label_filters_give_the_exact_top_k_among_carriers(
    labelled: TestClient, catalog: Catalog, encoder: Encoder, case: str
) -> None:
    everything = LabelStore(catalog).labels_for(range(1, 1000))
    filters = _filters_for(case, everything)
    wanted = [str(name).casefold() for name in filters["labels"]]  # type: ignore[attr-defined]
    minimum = float(filters.get("label_min_score", 0.0))  # type: ignore[arg-type]

    def carries(labels: list[Any]) -> bool:
        names = {x.label.casefold() for x in labels if x.score >= minimum}
        hits = [name in names for name in wanted]
        return all(hits) if filters.get("labels_mode") == "all" else any(hits)

    carriers = sorted(i for i, labels in everything.items() if carries(labels))
    assert 0 < len(carriers) < CORPUS_SIZE  # the filter keeps some and drops some
    query, k = "a red circle", 5
    response = labelled.post("/search/text", json={"query": query, "k": k, "filters": filters})
    assert response.status_code == 200, response.text
    got = [r["id"] for r in response.json()["results"]]
    assert got == _brute_force(labelled, encoder, query, carriers, k)
    assert len(got) == min(k, len(carriers))


def test_label_filter_errors(labelled: TestClient) -> None:
    for filters, status, code in [
        ({"labels": ["grey cloud"]}, 400, "bad_query"),  # no set defines it
        ({"labels": ["red circle"], "label_set": "nope"}, 400, "bad_query"),
        ({"labels": ["red circle"], "labels_mode": "most"}, 422, "validation_error"),
        ({"labels": ["red circle"], "label_min_score": 2}, 422, "validation_error"),
    ]:
        response = labelled.post("/search/text", json={"query": "a", "filters": filters})
        assert response.status_code == status, response.text
        assert response.json()["code"] == code


def test_classify_an_indexed_image_agrees_with_its_stored_labels(
    labelled: TestClient, indexed: Path, catalog: Catalog
) -> None:
    path = sorted(indexed.rglob("*.jpg"))[0]
    image_id = catalog.records_under([str(indexed)])[str(path)].id
    stored = LabelStore(catalog).labels_for([image_id])[image_id]
    response = labelled.post(
        "/classify", files={"file": (path.name, path.read_bytes())}, data={"label_set": "shapes"}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["labels"]) == len(NAMES)
    assert sum(x["score"] for x in body["labels"]) == pytest.approx(1.0, abs=1e-4)
    assert [x["label"] for x in body["labels"][: len(stored)]] == [x.label for x in stored]
    for fresh, kept in zip(body["labels"], stored, strict=False):
        assert fresh["score"] == pytest.approx(kept.score, abs=1e-3)  # float16 storage
    assert {"encode", "prompts", "classify", "total"} <= set(body["took_ms"])
    top = labelled.post(
        "/classify", files={"file": ("q.png", _png())}, data={"label_set": "shapes", "k": "2"}
    )
    assert len(top.json()["labels"]) == 2


def test_classify_with_inline_labels(client: TestClient) -> None:
    for labels in ("red circle, blue square", json.dumps(["red circle", "blue square"])):
        response = client.post(
            "/classify",
            files={"file": ("q.png", _png())},
            data={"labels": labels, "templates": "a {}"},
        )
        assert response.status_code == 200, response.text
        ranked = response.json()["labels"]
        assert sorted(x["label"] for x in ranked) == ["blue square", "red circle"]
        assert sum(x["score"] for x in ranked) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        ({}, 400, "bad_query"),
        ({"label_set": "shapes", "labels": "a,b"}, 400, "bad_query"),
        ({"label_set": "nope"}, 404, "not_found"),
        ({"labels": "[1, "}, 400, "bad_query"),
        ({"labels": json.dumps([f"l{i}" for i in range(201)])}, 400, "bad_query"),
        ({"labels": "a,b", "templates": "fancy"}, 422, "bad_label_set"),
        ({"labels": "a,b", "k": "0"}, 422, "validation_error"),
    ],
)
def test_classify_refuses_clearly(
    labelled: TestClient, data: dict[str, str], status: int, code: str
) -> None:
    response = labelled.post("/classify", files={"file": ("q.png", _png())}, data=data)
    assert response.status_code == status, response.text
    assert response.json()["code"] == code


def test_classify_refuses_a_broken_image(labelled: TestClient) -> None:
    response = labelled.post(
        "/classify", files={"file": ("q.jpg", b"not an image")}, data={"label_set": "shapes"}
    )
    assert response.status_code == 422 and response.json()["code"].startswith("image_")

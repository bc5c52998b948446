"""The cost bounds of /classify and of stored label sets, and the prompt cache."""

from __future__ import annotations

import io
import json
from collections.abc import Callable

from fastapi.testclient import TestClient
from PIL import Image

from api.services import Services
from retrieval.catalog.database import Catalog
from retrieval.labels.store import LabelStore
from retrieval.models.encoder import Encoder


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 48), (20, 10, 200)).save(buffer, "PNG")
    return buffer.getvalue()


def _classify(client: TestClient, **form: str) -> tuple[int, dict[str, object]]:
    response = client.post("/classify", files={"file": ("q.png", _png())}, data=form)
    return response.status_code, response.json()


def _services(client: TestClient) -> Services:
    return client.app.state.services  # type: ignore[attr-defined]


def test_inline_labels_over_the_prompt_bound_are_refused_before_any_encoding(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(classify_max_prompts=100)
    # 2 labels x 80 openai templates; 26 labels x (name + 1 synonym) x 2 templates.
    labels = json.dumps([{"name": f"thing {n}", "synonyms": [f"item {n}"]} for n in range(26)])
    for form, count in (
        ({"labels": "cat, dog"}, 160),
        ({"labels": labels, "templates": "a {}|the {}"}, 104),
    ):
        status, body = _classify(client, **form)
        assert status == 422, body
        assert body["code"] == "too_many_prompts"
        assert f"{count} prompts" in str(body["message"])
        assert "the limit is 100 (CLIPSEARCH_CLASSIFY_MAX_PROMPTS)" in str(body["message"])
    assert _services(client).prompts.cache.misses == 0  # nothing was looked up or encoded
    status, _ = _classify(client, labels="cat, dog", templates="simple")  # 14 prompts
    assert status == 200


def test_an_oversized_form_field_is_refused_before_it_is_parsed(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client()
    for form in ({"labels": "x," * 40_000}, {"labels": "cat", "templates": "a {}|" * 20_000}):
        status, body = _classify(client, **form)
        assert status == 400 and body["code"] == "bad_query"
        assert "the limit is 65536" in str(body["message"])


def test_repeated_and_overlapping_labels_are_encoded_once(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client()
    prompts = _services(client).prompts
    status, first = _classify(client, labels="cat, dog", templates="a {}|a photo of a {}")
    assert status == 200
    assert (prompts.cache.hits, prompts.cache.misses, len(prompts.cache)) == (0, 4, 4)
    status, again = _classify(client, labels="cat, dog", templates="a {}|a photo of a {}")
    assert status == 200 and again["labels"] == first["labels"]
    assert (prompts.cache.hits, prompts.cache.misses) == (4, 4)  # no prompt encoded again
    status, _ = _classify(client, labels="cat, bird", templates="a {}|a photo of a {}")
    assert status == 200
    assert (prompts.cache.hits, prompts.cache.misses) == (6, 6)  # only "bird" was new
    batcher = prompts.batcher
    assert batcher is not None and batcher.batched_texts == 6  # through the micro-batcher


def test_stored_sets_are_bounded_when_put_and_when_first_encoded(
    make_client: Callable[..., TestClient], catalog: Catalog, encoder: Encoder
) -> None:
    client = make_client(label_set_max_prompts=50, classify_max_prompts=10)
    too_big = {"labels": [f"thing {n}" for n in range(26)], "templates": "a {}|the {}"}
    response = client.put("/label-sets/big", json=too_big)
    assert response.status_code == 422
    assert response.json()["code"] == "too_many_prompts"
    assert "CLIPSEARCH_LABEL_SET_MAX_PROMPTS" in response.json()["message"]
    assert client.get("/label-sets/big").status_code == 404  # nothing was stored
    # 20 prompts: storable, but more than one request may encode.
    medium = {"labels": [f"thing {n}" for n in range(10)], "templates": "a {}|the {}"}
    assert client.put("/label-sets/medium", json=medium).status_code == 201
    status, body = _classify(client, label_set="medium")
    assert status == 422 and body["code"] == "too_many_prompts"
    assert "clipsearch label" in str(body["message"])
    # Once `clipsearch label` has stored its class embeddings, /classify uses them.
    store = LabelStore(catalog)
    store.embeddings_for(store.get("medium").version_id, encoder)
    status, body = _classify(client, label_set="medium")
    assert status == 200 and len(body["labels"]) == 10  # type: ignore[arg-type]
    # A small stored set is encoded by the request itself, then kept in the catalog.
    small_set = {"labels": ["cat", "dog"], "templates": "a {}"}
    assert client.put("/label-sets/small", json=small_set).status_code == 201
    assert _classify(client, label_set="small")[0] == 200
    small = store.get("small")
    assert store.cached_embeddings(small.version_id, encoder.identity.key) is not None

"""Every model family through the whole service: index, text and image search, more like this,
labels, /classify, compaction and a restart of the API; and the identity guard between
families. Tiny random-weight models: these tests check the machinery, the semantic tests meaning.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from indexer.compact import compact_index
from indexer.labelling import LabelJob
from indexer.pipeline import IndexJob
from retrieval.catalog.database import Catalog
from retrieval.config import Settings, load_settings
from retrieval.errors import ModelMismatch
from retrieval.index.shard import list_shard_dirs
from retrieval.labels.definitions import LabelSet
from retrieval.labels.store import LabelStore
from retrieval.models.encoder import Encoder, load_encoder
from retrieval.training.shapes import generate_shapes
from tests.conftest import FamilyModel

FAMILIES = ["open_clip", "cn_clip", "hf", "hf-siglip", "open_clip-xlmr", "open_clip-siglip"]
LABELS = ["红色的圆形", "蓝色的正方形", "a green star", "a yellow triangle"]


def _settings(tmp_path: Path, model: FamilyModel) -> Settings:
    return load_settings(
        data_dir=tmp_path / "data",
        model=model.model,
        pretrained=model.pretrained,
        model_config_dir=model.config_dir,
        device="cpu",
        workers=0,
        batch_size=8,
        shard_size=10,  # several shards, so compaction has work
        retire_grace_seconds=0,
        reload_interval_seconds=0,
    )


def _search(client: TestClient, query: str) -> list[int]:
    response = client.post("/search/text", json={"query": query, "k": 5})
    assert response.status_code == 200, response.text
    return [hit["id"] for hit in response.json()["results"]]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_runs_the_whole_service(
    family: str, family_models: dict[str, FamilyModel], tmp_path: Path
) -> None:
    model = family_models[family]
    settings = _settings(tmp_path, model)
    encoder = load_encoder(model.spec())
    assert encoder.identity.family == model.family
    catalog = Catalog(settings.resolved_database_url)
    pictures = generate_shapes(tmp_path / "pics", 24, seed=5)
    report = IndexJob(settings, catalog, lambda: encoder, progress=False).run([tmp_path / "pics"])
    assert report.encoded == 24 and not report.failed and len(report.shards_written) == 3
    indexed_model = catalog.state().model
    assert indexed_model is not None and indexed_model["family"] == model.family

    LabelStore(catalog).put(LabelSet.from_dict({"labels": LABELS, "templates": ["{}"]}, name="s"))
    labelled = LabelJob(settings, catalog, lambda: encoder, progress=False).run()
    assert labelled.sets[0].images == 24

    def app() -> TestClient:
        return TestClient(create_app(settings, encoder_factory=lambda _: encoder))

    probe = pictures[3].path
    with app() as client:
        before = {query: _search(client, query) for query in ("红色的圆形", "a blue square")}
        assert all(len(ids) == 5 for ids in before.values())
        hits = client.post("/search/text", json={"query": "蓝色的正方形", "k": 3}).json()
        assert all(hit["labels"] and hit["labels"][0]["set"] == "s" for hit in hits["results"])
        # An indexed picture uploaded as a query finds itself first: same decoding and model.
        found = client.post(
            "/search/image", files={"file": (probe.name, probe.read_bytes())}, data={"k": "3"}
        ).json()["results"]
        assert Path(found[0]["path"]) == probe and found[0]["score"] > 0.999
        similar = client.get(f"/images/{found[0]['id']}/similar", params={"k": 3})
        assert similar.status_code == 200 and found[0]["id"] not in {
            hit["id"] for hit in similar.json()["results"]
        }
        classified = client.post(
            "/classify",
            files={"file": (probe.name, probe.read_bytes())},
            data={"labels": ",".join(LABELS)},
        )
        assert classified.status_code == 200, classified.text
        scores = [label["score"] for label in classified.json()["labels"]]
        assert len(scores) == 4 and scores == sorted(scores, reverse=True)
        if encoder.score_rule.is_sigmoid:  # SigLIP: each label's own sigmoid
            assert sum(scores) != pytest.approx(1.0, abs=1e-3)
        else:
            assert sum(scores) == pytest.approx(1.0, abs=1e-4)  # softmax

    compacted = compact_index(
        catalog, settings.resolved_index_dir, merge_all=True, grace_seconds=0, progress=False
    )
    assert compacted.shards_after == 1 and compacted.live_vectors == 24
    assert list_shard_dirs(settings.resolved_index_dir) == [s.id for s in catalog.shards()]
    # A restarted API serves the compacted generation with the same answers.
    with app() as client:
        after = {query: _search(client, query) for query in before}
        info = client.get("/index").json()
    assert after == before
    assert info["shard_count"] == 1 and info["model"]["family"] == model.family
    catalog.dispose()


@pytest.mark.parametrize(("indexed", "other"), [("cn_clip", "open_clip"), ("hf", "cn_clip")])
def test_an_index_of_one_family_refuses_another(
    indexed: str, other: str, family_models: dict[str, FamilyModel], tmp_path: Path
) -> None:
    settings = _settings(tmp_path, family_models[indexed])
    catalog = Catalog(settings.resolved_database_url)
    generate_shapes(tmp_path / "pics", 6, seed=2)
    encoder: Encoder = load_encoder(family_models[indexed].spec())
    IndexJob(settings, catalog, lambda: encoder, progress=False).run([tmp_path / "pics"])
    state, shards = catalog.state(), list_shard_dirs(settings.resolved_index_dir)

    generate_shapes(tmp_path / "pics" / "more", 2, seed=9)  # something to encode
    stranger = load_encoder(family_models[other].spec())
    with pytest.raises(ModelMismatch, match="re-index"):
        IndexJob(settings, catalog, lambda: stranger, progress=False).run([tmp_path / "pics"])
    assert catalog.state() == state  # nothing committed
    assert list_shard_dirs(settings.resolved_index_dir) == shards  # nothing written
    catalog.dispose()

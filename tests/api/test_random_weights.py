"""GET /index says when the model has random weights (pretrained=none): its results look like
results and mean nothing. The page shows the warning from it (tests/web)."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from api.app import create_app
from indexer.pipeline import IndexJob
from retrieval.catalog.database import Catalog
from retrieval.config import load_settings
from retrieval.models.encoder import load_encoder
from retrieval.models.identity import ModelSpec
from retrieval.training.shapes import generate_shapes
from tests.conftest import TINY

WARNING = (
    "random weights (pretrained=none): results are meaningless; `clipsearch models` lists real "
    "weights to index with"
)


def test_an_index_of_random_weights_is_flagged(tmp_path: Path) -> None:
    settings = load_settings(
        data_dir=tmp_path / "data",
        model=TINY,
        pretrained="none",
        device="cpu",
        workers=0,
        reload_interval_seconds=0,
    )
    encoder = load_encoder(ModelSpec(TINY, "none", device="cpu"))
    generate_shapes(tmp_path / "pics", 4, seed=1)
    catalog = Catalog(settings.resolved_database_url)
    try:
        IndexJob(settings, catalog, lambda: encoder, progress=False).run([tmp_path / "pics"])
    finally:
        catalog.dispose()
    with TestClient(create_app(settings, encoder_factory=lambda _: encoder)) as client:
        index = client.get("/index").json()
    assert index["model"]["weights_sha256"] == "random-init-seed0"
    assert index["random_weights"] is True
    assert index["warnings"] == [WARNING]


def test_trained_weights_are_not_flagged(client: TestClient) -> None:
    index = client.get("/index").json()
    assert index["random_weights"] is False and index["warnings"] == []

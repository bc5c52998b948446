"""A real `clipsearch serve` process picks up a new generation with no failed request."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

from indexer.pipeline import IndexJob
from retrieval.catalog.database import Catalog
from retrieval.config import load_settings
from retrieval.models.encoder import Encoder
from retrieval.training.shapes import generate_shapes
from tests.conftest import TINY
from tests.serving import running_server


@pytest.mark.slow
def test_serve_follows_new_generations_without_errors(
    tmp_path: Path, tiny_checkpoint: Path, encoder: Encoder
) -> None:
    settings = load_settings(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'catalog.db'}",
        model=TINY,
        pretrained=str(tiny_checkpoint),
        device="cpu",
        workers=0,
        batch_size=16,
    )
    catalog = Catalog(settings.resolved_database_url)
    catalog.upgrade()
    first, second = tmp_path / "first", tmp_path / "second"
    generate_shapes(first, 12, seed=1)
    generate_shapes(second, 12, seed=2)
    IndexJob(settings, catalog, lambda: encoder, progress=False).run([str(first)])

    serve_settings = {
        "CLIPSEARCH_DATA_DIR": str(tmp_path / "data"),
        "CLIPSEARCH_DATABASE_URL": settings.resolved_database_url,
        "CLIPSEARCH_MODEL": TINY,
        "CLIPSEARCH_PRETRAINED": str(tiny_checkpoint),
        "CLIPSEARCH_DEVICE": "cpu",
        "CLIPSEARCH_RELOAD_INTERVAL_SECONDS": "0.3",
        "CLIPSEARCH_API_KEYS": "k1",
    }
    headers = {"X-API-Key": "k1"}
    try:
        with (
            running_server(serve_settings, tmp_path / "serve.log") as server,
            httpx.Client(base_url=server.base_url, headers=headers, timeout=30) as client,
        ):
            start_gen = client.get("/index").json()["generation"]

            indexing = threading.Thread(
                target=lambda: IndexJob(settings, catalog, lambda: encoder, progress=False).run(
                    [str(first), str(second)]
                )
            )
            indexing.start()
            failures: list[str] = []
            generations: set[int] = set()
            counts: set[int] = set()
            for n in range(400):  # bounded: stops once the new generation has been served a while
                response = client.post("/search/text", json={"query": "a red circle", "k": 30})
                if response.status_code != 200:
                    failures.append(response.text)
                    continue
                body = response.json()
                generations.add(body["generation"])
                counts.add(len(body["results"]))
                if body["generation"] > start_gen and not indexing.is_alive() and n >= 40:
                    break
                time.sleep(0.01)
            indexing.join(timeout=120)
            assert failures == []
            assert max(generations) > start_gen, generations
            assert counts <= {12, 24}, counts  # never a mixture of generations
            assert client.get("/index").json()["vector_count"] == 24
        # uvicorn re-raises SIGTERM after its graceful shutdown completes.
        assert server.stop() in (0, -15), server.log()
    finally:
        catalog.dispose()
    text = server.log()
    assert "Application shutdown complete" in text
    assert "AUTHENTICATION IS OFF" not in text

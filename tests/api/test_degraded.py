"""A corrupt shard under the API: it starts, serves the healthy shards, says it is degraded in
/ready, /index and /metrics, never returns the corrupt shard's vectors, recovers after repair."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from indexer.pipeline import IndexJob
from indexer.repair import RepairJob
from retrieval.catalog.database import Catalog
from retrieval.catalog.tables import ACTIVE
from retrieval.config import Settings
from retrieval.index.shard import EMBEDDINGS_FILE, INDEX_FILE
from retrieval.models.encoder import Encoder
from tests.api.conftest import CORPUS_SIZE

SHARD_SIZE = 12


@pytest.fixture
def indexed(settings: Settings, catalog: Catalog, encoder: Encoder, photos: Path) -> Path:
    """The API corpus in three shards (overrides the conftest's one-shard index)."""
    job_settings = settings.model_copy(update={"shard_size": SHARD_SIZE})
    IndexJob(job_settings, catalog, lambda: encoder, progress=False).run([str(photos)])
    assert len(catalog.shards()) == CORPUS_SIZE // SHARD_SIZE
    return photos


def _shard(settings: Settings, catalog: Catalog, number: int) -> tuple[str, Path, set[int]]:
    row = catalog.shards()[number]
    members = {r.id for r in catalog.shard_members(row.id) if r.status == ACTIVE}
    return row.id, settings.resolved_index_dir / "shards" / row.id, members


def _all_hits(client: TestClient) -> list[dict[str, object]]:
    response = client.get("/search", params={"q": "a shape", "k": CORPUS_SIZE})
    assert response.status_code == 200, response.text
    return list(response.json()["results"])


def test_a_corrupt_shard_at_start_degrades_the_service_without_stopping_it(
    make_client: Callable[..., TestClient], settings: Settings, catalog: Catalog, encoder: Encoder
) -> None:
    bad, shard_dir, bad_ids = _shard(settings, catalog, 1)
    with open(shard_dir / EMBEDDINGS_FILE, "r+b") as handle:  # a header byte, as in the issue
        handle.seek(20)
        handle.write(b"\xff")
    client = make_client()

    ready = client.get("/ready")
    assert ready.status_code == 200
    assert ready.json()["ready"] is True
    assert ready.json()["degraded"] is True and ready.json()["corrupt_shards"] == [bad]

    info = client.get("/index").json()
    assert info["degraded"] is True and info["repair"] == "clipsearch repair"
    assert [s["id"] for s in info["corrupt_shards"]] == [bad]
    assert "embeddings.npy" in info["corrupt_shards"][0]["reason"]
    assert info["corrupt_shards"][0]["vector_count"] == SHARD_SIZE
    assert info["shard_count"] == 2 and info["vector_count"] == CORPUS_SIZE - SHARD_SIZE
    assert info["unserved_vector_count"] == SHARD_SIZE

    hits = _all_hits(client)
    assert len(hits) == CORPUS_SIZE - SHARD_SIZE
    assert not bad_ids & {int(str(h["id"])) for h in hits}
    similar = client.get(f"/images/{min(bad_ids)}/similar")
    assert similar.status_code == 503 and similar.json()["code"] == "corrupt_shard"
    assert bad in similar.json()["message"]

    metrics = client.get("/metrics").text
    assert "clipsearch_index_corrupt_shards 1" in metrics
    assert f"clipsearch_index_unserved_vectors {SHARD_SIZE}" in metrics
    assert "clipsearch_index_shards 2" in metrics

    # Repaired by the indexer, picked up by a reload: whole again.
    RepairJob(settings, catalog, lambda: encoder, progress=False).run()
    assert client.post("/admin/reload").json()["swapped"] is True
    assert client.get("/ready").json()["degraded"] is False
    info = client.get("/index").json()
    assert info["degraded"] is False and info["corrupt_shards"] == [] and info["repair"] is None
    assert len(_all_hits(client)) == CORPUS_SIZE
    assert client.get(f"/images/{min(bad_ids)}/similar").status_code == 200


def test_bytes_changing_under_the_service_stop_that_shard_at_the_next_query(
    client: TestClient, settings: Settings, catalog: Catalog
) -> None:
    assert client.get("/ready").json()["degraded"] is False
    baseline = _all_hits(client)
    bad, shard_dir, bad_ids = _shard(settings, catalog, 0)
    # index.faiss is memory-mapped: scale its copy of the vectors in place, as bit rot would.
    stored = np.load(shard_dir / EMBEDDINGS_FILE).astype(np.float32)
    path = shard_dir / INDEX_FILE
    offset = path.read_bytes().find(stored.tobytes())
    assert offset > 0
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write((stored * 25.7).tobytes())

    hits = _all_hits(client)
    assert not bad_ids & {int(str(h["id"])) for h in hits}
    assert max(float(str(h["score"])) for h in hits) < 1.01
    assert len(hits) == len(baseline) - SHARD_SIZE
    info = client.get("/index").json()
    assert [s["id"] for s in info["corrupt_shards"]] == [bad]
    assert "outside [-1.0001, 1.0001]" in info["corrupt_shards"][0]["reason"]
    assert client.get("/ready").json()["corrupt_shards"] == [bad]

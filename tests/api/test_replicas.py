"""Serving replicas: several APIs read one Postgres catalog and one index dir. Each follows the
catalog's generations with its own poll and its own swap, so none waits on another, and one
that has not reloaded yet keeps serving its generation, whose retired shard files stay for the
grace period."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.services import Services
from indexer.compact import compact_index
from indexer.pipeline import IndexJob
from retrieval.catalog.database import Catalog
from retrieval.config import Settings
from retrieval.index.shard import shard_path
from retrieval.models.encoder import Encoder
from retrieval.training.shapes import generate_shapes
from tests.api.conftest import CORPUS_SIZE
from tests.conftest import BOTH_DATABASES, fresh_database

POLL_S = 0.05


@pytest.fixture(params=[db for db in BOTH_DATABASES if db != "sqlite"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Replicas on several machines share a database server: Postgres only."""
    yield from fresh_database(request.param, tmp_path)


def _served(client: TestClient) -> tuple[int, int, list[int]]:
    """The generation a replica serves, its vector count, and the ids a search returns."""
    info = client.get("/index").json()
    hits = client.post("/search/text", json={"query": "a red circle", "k": 100}).json()
    return info["generation"], info["vector_count"], sorted(h["id"] for h in hits["results"])


def _wait_for(client: TestClient, generation: int) -> None:
    deadline = time.monotonic() + 30
    while client.get("/index").json()["generation"] < generation:
        assert time.monotonic() < deadline, f"generation {generation} never served"
        time.sleep(POLL_S)


def test_two_replicas_each_pick_up_a_new_generation_on_their_own(
    make_client: Callable[..., TestClient],
    settings: Settings,
    catalog: Catalog,
    encoder: Encoder,
    indexed: Path,
) -> None:
    first = make_client(reload_interval_seconds=POLL_S)
    second = make_client(reload_interval_seconds=POLL_S)
    generation, count, ids = _served(first)
    assert _served(second) == (generation, CORPUS_SIZE, ids) and count == CORPUS_SIZE

    generate_shapes(indexed / "more", 12, seed=9)
    IndexJob(settings, catalog, lambda: encoder, progress=False).run([str(indexed)])
    new = catalog.state().generation
    assert new > generation
    for replica in (first, second):  # neither was told: each one's poll found it
        _wait_for(replica, new)
    one, two = _served(first), _served(second)
    assert one == two
    assert one[0] == new and one[1] == CORPUS_SIZE + 12 and len(one[2]) == CORPUS_SIZE + 12


def test_a_replica_that_has_not_reloaded_keeps_serving_its_generation(
    make_client: Callable[..., TestClient],
    settings: Settings,
    catalog: Catalog,
    encoder: Encoder,
    indexed: Path,
) -> None:
    generate_shapes(indexed / "more", 12, seed=9)
    IndexJob(settings, catalog, lambda: encoder, progress=False).run([str(indexed)])
    polling = make_client(reload_interval_seconds=POLL_S)
    lagging = make_client(reload_interval_seconds=0)  # reloads only when told
    before = _served(lagging)
    old_shards = [row.id for row in catalog.shards()]
    assert len(old_shards) == 2 and _served(polling) == before

    # Compaction merges both shards into one and retires them; the next index run cleans up,
    # but only shards retired longer ago than the grace period.
    report = compact_index(catalog, settings.resolved_index_dir, merge_all=True)
    assert sorted(report.merged) == sorted(old_shards)
    graceful = settings.model_copy(update={"retire_grace_seconds": 600})
    IndexJob(graceful, catalog, lambda: encoder, progress=False).run([str(indexed)])
    new = catalog.state().generation
    _wait_for(polling, new)
    after = _served(polling)
    assert after[0] == new and after[1:] == before[1:]
    assert [row.id for row in catalog.shards()] != old_shards

    # The lagging replica still answers from the retired shards, whose files are still there.
    assert _served(lagging) == before
    assert all(shard_path(settings.resolved_index_dir, s).is_dir() for s in old_shards)
    services: Services = lagging.app.state.services  # type: ignore[attr-defined]
    lagging.portal.call(services.reload)  # type: ignore[union-attr]
    assert _served(lagging) == after

"""A running API whose catalog is removed, replaced or reset turns unready, says why, serves
nothing from it, and comes back once the catalog and the index dir agree again."""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.services import Services
from indexer.pipeline import IndexJob
from retrieval.catalog.catalog_file import sqlite_file
from retrieval.catalog.database import Catalog
from retrieval.catalog.identity import read_index_id
from retrieval.config import Settings
from retrieval.errors import CatalogMismatch
from retrieval.models.encoder import Encoder
from tests.conftest import BOTH_DATABASES, fresh_database
from tests.fixtures.catalogs import drop_catalog


@pytest.fixture(params=BOTH_DATABASES)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The catalog is what these tests take away: both databases."""
    yield from fresh_database(request.param, tmp_path)


@pytest.fixture
def sqlite_only(db_url: str) -> Path:
    path = sqlite_file(db_url)
    if path is None:
        pytest.skip("a catalog file is SQLite's; the Postgres reset has its own test")
    return path


def _reload(client: TestClient) -> None:
    """What the generation poller does every CLIPSEARCH_RELOAD_INTERVAL_SECONDS."""
    services: Services = client.app.state.services  # type: ignore[attr-defined]
    client.portal.call(services.reload)  # type: ignore[union-attr]


def _unready(client: TestClient) -> str:
    """Assert that nothing is served, and return the reason /ready gives."""
    ready = client.get("/ready")
    assert ready.status_code == 503 and ready.json()["ready"] is False
    reason = str(ready.json()["reason"])
    for route in ("/search?q=a+red+circle", "/index", "/images/1"):
        refused = client.get(route)
        assert refused.status_code == 503, route
        assert refused.json() == {"code": "not_ready", "message": reason}
    assert client.get("/health").status_code == 200
    return reason


def _serving(client: TestClient) -> int:
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["reason"] is None
    assert client.get("/search", params={"q": "a red circle", "k": 5}).json()["results"]
    return int(ready.json()["generation"])


def _backup(path: Path, to: Path) -> None:
    source, target = sqlite3.connect(path), sqlite3.connect(to)
    source.backup(target)
    source.close()
    target.close()


def _put_file(path: Path, replacement: Path) -> None:
    """Put a catalog file in place as a restore should: without the old write-ahead log."""
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    os.replace(replacement, path)


def test_a_removed_sqlite_catalog_turns_the_api_unready_until_it_is_restored(
    sqlite_only: Path,
    client: TestClient,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    generation = _serving(client)
    _backup(sqlite_only, tmp_path / "backup.db")
    sqlite_only.unlink()
    with caplog.at_level(logging.ERROR), pytest.raises(CatalogMismatch):
        _reload(client)
    reason = _unready(client)
    assert "was removed" in reason and str(sqlite_only) in reason
    assert "serving nothing" in caplog.text and reason in caplog.text
    assert not sqlite_only.exists()  # the API made no empty catalog in its place

    _put_file(sqlite_only, tmp_path / "backup.db")
    _reload(client)
    assert _serving(client) == generation


def test_a_sqlite_catalog_replaced_by_another_index_is_refused(
    sqlite_only: Path,
    client: TestClient,
    settings: Settings,
    encoder: Encoder,
    indexed: Path,
    tmp_path: Path,
) -> None:
    _serving(client)
    served_id = read_index_id(settings.resolved_index_dir)
    other = settings.model_copy(
        update={"database_url": f"sqlite:///{tmp_path / 'other.db'}", "index_dir": tmp_path / "x"}
    )
    other_catalog = Catalog(other.resolved_database_url)
    IndexJob(other, other_catalog, lambda: encoder, progress=False).run([str(indexed)])
    other_id = other_catalog.state().index_id
    other_catalog.dispose()
    _put_file(sqlite_only, tmp_path / "other.db")
    with pytest.raises(CatalogMismatch):
        _reload(client)
    reason = _unready(client)
    assert f"belongs to index {other_id}" in reason and f"holds index {served_id}" in reason


def test_a_copy_of_the_same_catalog_is_reopened_and_served(
    sqlite_only: Path, client: TestClient, tmp_path: Path
) -> None:
    generation = _serving(client)
    _backup(sqlite_only, tmp_path / "copy.db")
    _put_file(sqlite_only, tmp_path / "copy.db")
    _reload(client)  # another file, the same index: reopened, nothing mixed
    assert _serving(client) == generation


def test_a_reset_catalog_turns_the_api_unready_and_a_rebuild_brings_it_back(
    db_url: str,
    client: TestClient,
    settings: Settings,
    encoder: Encoder,
    indexed: Path,
) -> None:
    _serving(client)
    old_id = read_index_id(settings.resolved_index_dir)
    drop_catalog(db_url)  # SQLite: the file goes; Postgres: every table goes
    with pytest.raises(CatalogMismatch):
        _reload(client)
    assert "removed" in _unready(client) or "no clipsearch tables" in _unready(client)

    fresh = Catalog(db_url)
    fresh.upgrade()  # a new, empty catalog at the same place
    with pytest.raises(CatalogMismatch):
        _reload(client)
    assert f"holds no index, but the index directory {settings.resolved_index_dir}" in (
        _unready(client)
    )
    assert "--rebuild-catalog" in _unready(client)

    job = IndexJob(settings, fresh, lambda: encoder, progress=False, rebuild_catalog=True)
    job.run([str(indexed)])
    new_id = fresh.state().index_id
    fresh.dispose()
    assert new_id != old_id
    _reload(client)
    _serving(client)
    assert client.get("/index").status_code == 200


def test_the_generation_poller_notices_a_removed_catalog(
    sqlite_only: Path, make_client: Callable[..., TestClient]
) -> None:
    client = make_client(reload_interval_seconds=0.05)
    _serving(client)
    sqlite_only.unlink()
    deadline = time.monotonic() + 30
    while client.get("/ready").status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "was removed" in _unready(client)


def test_an_api_started_beside_a_lost_catalog_starts_unready_and_says_why(
    db_url: str,
    make_client: Callable[..., TestClient],
    settings: Settings,
    encoder: Encoder,
    indexed: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    drop_catalog(db_url)
    with caplog.at_level(logging.ERROR):
        client = make_client()
    reason = _unready(client)
    assert "holds no index" in reason and reason in caplog.text
    fresh = Catalog(db_url)
    IndexJob(settings, fresh, lambda: encoder, progress=False, rebuild_catalog=True).run(
        [str(indexed)]
    )
    fresh.dispose()
    _reload(client)
    _serving(client)

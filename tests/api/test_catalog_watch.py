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
from sqlalchemy import create_engine, text

from api.app import create_app
from api.services import Services
from indexer.pipeline import IndexJob
from retrieval.catalog.catalog_file import sqlite_file
from retrieval.catalog.database import Catalog
from retrieval.catalog.identity import read_index_id
from retrieval.catalog.migrate import current_revision, head_revision, upgrade_database
from retrieval.config import Settings
from retrieval.errors import CatalogMismatch, CatalogSchemaMismatch
from retrieval.models.encoder import Encoder
from retrieval.search import Searcher
from tests.conftest import BOTH_DATABASES, fresh_database
from tests.fixtures.catalogs import downgrade_catalog, drop_catalog


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


def _unready(client: TestClient, code: str = "not_ready") -> str:
    """Assert that nothing is served (requests get `code`), and return the reason /ready gives."""
    ready = client.get("/ready")
    assert ready.status_code == 503 and ready.json()["ready"] is False
    reason = str(ready.json()["reason"])
    for route in ("/search?q=a+red+circle", "/index", "/images/1"):
        refused = client.get(route)
        assert refused.status_code == 503, route
        assert refused.json() == {"code": code, "message": reason}
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
    assert "removed" in _unready(client) or "holds no index" in _unready(client)

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


def test_a_file_removed_in_the_middle_of_a_poll_is_named_as_removed(
    sqlite_only: Path,
    settings: Settings,
    encoder: Encoder,
    indexed: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The file goes just after the poll's file-watch check and before its schema check: the
    # reason is the file watch's, as when the removal comes before the poll (it read "holds no
    # index" in that window, so the reason a user saw depended on timing).
    catalog = Catalog(settings.resolved_database_url)
    searcher = Searcher(catalog, settings.resolved_index_dir, encoder)
    try:
        searcher.refresh(force=True)
        checked = catalog.reopen_if_replaced

        def remove_after_the_check() -> bool:
            answer = checked()
            sqlite_only.unlink()
            return answer

        monkeypatch.setattr(catalog, "reopen_if_replaced", remove_after_the_check)
        with pytest.raises(CatalogMismatch, match="was removed while in use"):
            searcher.refresh()
    finally:
        searcher.close()
        catalog.dispose()


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


# --- no catalog, an un-migrated one, an unreadable one: unready with the reason, then back ----


def _no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    assert "Traceback" not in caplog.text
    assert all(record.exc_info is None for record in caplog.records)


def test_the_window_of_a_refused_index_beside_a_deleted_catalog(
    sqlite_only: Path,
    client: TestClient,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The catalog is deleted while the API serves; before the fix, a refused `clipsearch index`
    then created and migrated a new, empty file at its path, and the poller met a raw
    OperationalError in between and kept serving the deleted catalog's generation."""
    generation = _serving(client)
    _backup(sqlite_only, tmp_path / "backup.db")
    drop_catalog(f"sqlite:///{sqlite_only}")
    sqlite3.connect(sqlite_only).close()  # an empty file where the catalog was
    with caplog.at_level(logging.WARNING), pytest.raises(CatalogMismatch):
        _reload(client)
    reason = _unready(client)
    assert "has no clipsearch tables" in reason or "holds no index" in reason
    engine = create_engine(f"sqlite:///{sqlite_only}")
    upgrade_database(engine, "0001")  # half migrated: an older schema, no index
    engine.dispose()
    with caplog.at_level(logging.WARNING), pytest.raises(CatalogSchemaMismatch):
        _reload(client)
    assert "is at schema revision 0001, older than" in _unready(client)
    _no_traceback(caplog)

    _put_file(sqlite_only, tmp_path / "backup.db")
    _reload(client)
    assert _serving(client) == generation


def test_an_older_catalog_turns_the_api_unready_until_db_upgrade(
    db_url: str, client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    generation = _serving(client)
    downgrade_catalog(db_url, "0005")  # what an older clipsearch, restored from backup, left
    with caplog.at_level(logging.WARNING), pytest.raises(CatalogSchemaMismatch):
        _reload(client)
    shown = client.app.state.services.catalog.shown_url  # type: ignore[attr-defined]
    assert _unready(client) == (
        f"the catalog in {shown} is at schema revision 0005, older than this clipsearch's "
        f"{head_revision()}; run `clipsearch db upgrade` (with the same --data-dir or "
        "--database-url) to migrate it"
    )
    engine = create_engine(db_url)
    assert current_revision(engine) == "0005"  # the API migrated nothing
    engine.dispose()
    _no_traceback(caplog)

    upgraded = Catalog(db_url)
    upgraded.upgrade()  # what `clipsearch db upgrade` does
    upgraded.dispose()
    _reload(client)
    assert _serving(client) == generation
    assert "ready again" in caplog.text


def test_a_dropped_postgres_schema_turns_the_api_unready_and_requests_get_a_503(
    db_url: str,
    client: TestClient,
    settings: Settings,
    encoder: Encoder,
    indexed: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    if sqlite_file(db_url) is not None:
        pytest.skip("a schema is Postgres's; the SQLite file's removal has its own tests")
    _serving(client)
    schema = db_url.rsplit("%3D", 1)[-1]
    with create_engine(db_url).begin() as conn:
        conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    with caplog.at_level(logging.WARNING):
        # A request before the poller notices: a 503 naming the database's error, no 500.
        refused = client.get("/images/1")
        assert refused.status_code == 503 and refused.json()["code"] == "catalog_unreadable"
        assert refused.json()["message"].startswith("The catalog cannot be read: ")
        with pytest.raises(CatalogMismatch):
            _reload(client)
    assert "holds no index" in _unready(client)
    _no_traceback(caplog)

    with create_engine(db_url).begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    fresh = Catalog(db_url)
    IndexJob(settings, fresh, lambda: encoder, progress=False, rebuild_catalog=True).run(
        [str(indexed)]
    )
    fresh.dispose()
    _reload(client)
    _serving(client)


def test_an_api_started_before_the_first_index_is_unready_until_it_creates_the_catalog(
    settings: Settings,
    encoder: Encoder,
    photos: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    new = tmp_path / "new"
    new.mkdir()
    fresh = settings.model_copy(update={"data_dir": new, "database_url": None, "index_dir": None})
    app = create_app(
        fresh.model_copy(update={"reload_interval_seconds": 0}), encoder_factory=lambda _: encoder
    )
    with caplog.at_level(logging.WARNING), TestClient(app) as client:
        assert _unready(client, "no_catalog") == (
            f"no clipsearch catalog in sqlite:///{new / 'catalog.db'}; run `clipsearch index "
            "ROOT` to create one"
        )
        assert list(new.iterdir()) == []  # the API created nothing
        catalog = Catalog(fresh.resolved_database_url)
        IndexJob(fresh, catalog, lambda: encoder, progress=False).run([str(photos)])
        catalog.dispose()
        _reload(client)
        assert _serving(client) == 1
    _no_traceback(caplog)

"""An indexed corpus of generated shapes and a TestClient on the app built around it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from indexer.pipeline import IndexJob
from retrieval.catalog.database import Catalog
from retrieval.config import Settings, load_settings
from retrieval.models.encoder import Encoder
from retrieval.training.shapes import generate_shapes
from tests.conftest import BOTH_DATABASES, TINY, fresh_database
from tests.fixtures.bad_images import write_good_images
from tests.serving import ServeProcess, running_server

CORPUS_SIZE = 36
READ_KEY = "read-key-123"
ADMIN_KEY = "admin-key-456"


@pytest.fixture
def db_url(tmp_path: Path) -> Iterator[str]:
    """HTTP behaviour does not depend on the database: SQLite here. The catalog, pipeline
    and filter tests run on both databases."""
    yield from fresh_database("sqlite", tmp_path)


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    generate_shapes(root, 24, seed=5)
    (root / "captions.csv").unlink()
    write_good_images(root / "mixed", 12, seed=2)  # eight formats, several sizes
    return root


@pytest.fixture
def indexed(settings: Settings, catalog: Catalog, encoder: Encoder, photos: Path) -> Path:
    IndexJob(settings, catalog, lambda: encoder, progress=False).run([str(photos)])
    return photos


@pytest.fixture
def make_client(
    settings: Settings, encoder: Encoder, indexed: Path
) -> Iterator[Callable[..., TestClient]]:
    clients: list[TestClient] = []

    def build(**overrides: object) -> TestClient:
        app_settings = settings.model_copy(
            update={"reload_interval_seconds": 0, "microbatch_wait_ms": 1.0, **overrides}
        )
        client = TestClient(create_app(app_settings, encoder_factory=lambda _: encoder))
        client.__enter__()
        clients.append(client)
        return client

    yield build
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


@pytest.fixture
def auth_client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(api_keys=[READ_KEY], admin_keys=[ADMIN_KEY])


@pytest.fixture(scope="session", params=BOTH_DATABASES)
def live_server(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_checkpoint: Path,
    encoder: Encoder,
) -> Iterator[ServeProcess]:
    """A real `clipsearch serve` (uvicorn) over a small indexed corpus, once a session on each
    database, for the tests that attack it over HTTP (no keys: every route is reachable)."""
    tmp = tmp_path_factory.mktemp(f"live-{request.param}")
    with contextlib.contextmanager(fresh_database)(request.param, tmp) as db_url:
        settings = load_settings(
            data_dir=tmp / "data",
            database_url=db_url,
            model=TINY,
            pretrained=str(tiny_checkpoint),
            device="cpu",
            workers=0,
        )
        catalog = Catalog(db_url)
        catalog.upgrade()
        photos = tmp / "photos"
        generate_shapes(photos, 12, seed=3)
        write_good_images(photos / "mixed", 8, seed=2)  # every format
        IndexJob(settings, catalog, lambda: encoder, progress=False).run([str(photos)])
        catalog.dispose()
        env = {
            "CLIPSEARCH_DATA_DIR": str(settings.data_dir),
            "CLIPSEARCH_DATABASE_URL": db_url,
            "CLIPSEARCH_MODEL": TINY,
            "CLIPSEARCH_PRETRAINED": str(tiny_checkpoint),
            "CLIPSEARCH_DEVICE": "cpu",
            "CLIPSEARCH_RELOAD_INTERVAL_SECONDS": "0",
        }
        with running_server(env, tmp / "serve.log") as server:
            yield server

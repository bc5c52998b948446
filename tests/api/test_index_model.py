"""The API serves the model recorded in the index unless its settings name one explicitly."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from retrieval.config import Settings, load_settings
from retrieval.models.encoder import Encoder
from tests.conftest import TINY


@pytest.mark.parametrize(
    ("named", "loaded"),
    [({}, "index"), ({"model": TINY, "pretrained": "none"}, "named")],
    ids=["nothing named: the index's", "named: as named"],
)
def test_the_app_loads_the_indexs_model_unless_one_is_named(
    named: dict[str, str],
    loaded: str,
    settings: Settings,
    encoder: Encoder,
    indexed: Path,
    tiny_checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("CLIPSEARCH_MODEL", "CLIPSEARCH_PRETRAINED", "CLIPSEARCH_MODEL_CONFIG_DIR"):
        monkeypatch.delenv(name, raising=False)
    app_settings = load_settings(
        data_dir=settings.data_dir,
        database_url=settings.resolved_database_url,
        reload_interval_seconds=0,
        **named,
    )
    seen: list[tuple[str, str]] = []

    def build(served: Settings) -> Encoder:
        seen.append((served.model, served.pretrained))
        return encoder

    with TestClient(create_app(app_settings, encoder_factory=build)) as client:
        assert client.get("/index").status_code == 200
    expected = (TINY, str(tiny_checkpoint.resolve())) if loaded == "index" else (TINY, "none")
    assert seen == [expected]

from __future__ import annotations

from pathlib import Path

import pytest

from retrieval.config import load_settings
from retrieval.errors import ConfigError


def test_defaults_derive_from_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPSEARCH_DATA_DIR", str(tmp_path))
    settings = load_settings()
    assert settings.resolved_database_url == f"sqlite:///{tmp_path / 'catalog.db'}"
    assert settings.resolved_index_dir == tmp_path / "index"
    assert settings.model == "ViT-B-32"
    assert settings.pretrained == "laion2b_s34b_b79k"


def test_roots_accept_pathsep_and_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPSEARCH_ROOTS", "/a:/b")
    assert load_settings().roots == [Path("/a"), Path("/b")]
    monkeypatch.setenv("CLIPSEARCH_ROOTS", '["/c d", "/e"]')
    assert load_settings().roots == [Path("/c d"), Path("/e")]


def test_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPSEARCH_BATCH_SIZE", "8")
    assert load_settings().batch_size == 8
    assert load_settings(batch_size=32).batch_size == 32
    assert load_settings(batch_size=None).batch_size == 8


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CLIPSEARCH_BATCH_SIZE", "0"),
        ("CLIPSEARCH_BATCH_SIZE", "many"),
        ("CLIPSEARCH_DEVICE", "tpu"),
        ("CLIPSEARCH_PRECISION", "fp8"),
        ("CLIPSEARCH_WORKERS", "-1"),
        ("CLIPSEARCH_DATABASE_URL", "mysql://x"),
        ("CLIPSEARCH_INDEX_KIND", "lsh"),
    ],
)
def test_bad_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert info.value.setting == variable
    assert variable in str(info.value)


def test_bare_postgres_url_uses_psycopg3() -> None:
    settings = load_settings(database_url="postgresql://u@h/db")
    assert settings.resolved_database_url == "postgresql+psycopg://u@h/db"


def test_the_encode_queue_must_hold_one_classify_at_its_limit() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(classify_max_prompts=5000, microbatch_max_pending=4000)
    assert caught.value.setting == "CLIPSEARCH_MICROBATCH_MAX_PENDING"
    assert "CLIPSEARCH_CLASSIFY_MAX_PROMPTS (5000)" in caught.value.detail
    assert load_settings(classify_max_prompts=4000, microbatch_max_pending=4000)

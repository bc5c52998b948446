"""Shared fixtures: a tiny open_clip model loaded through the real loader, and both databases."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from sqlalchemy import create_engine, text

from retrieval.catalog.database import Catalog
from retrieval.config import Settings, load_settings
from retrieval.models.encoder import Encoder, load_encoder
from retrieval.models.identity import ModelSpec
from retrieval.models.weights import register_model_configs

if TYPE_CHECKING:
    from playwright.sync_api import Browser

TINY = "clipsearch-tiny"
PG_URL = os.environ.get("CLIPSEARCH_TEST_DATABASE_URL")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random init with a fixed seed, saved like any user checkpoint."""
    import open_clip

    register_model_configs()
    torch.manual_seed(1234)
    model = open_clip.create_model(TINY, pretrained=None)
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return path


@pytest.fixture(scope="session")
def encoder(tiny_checkpoint: Path) -> Encoder:
    return load_encoder(ModelSpec(TINY, str(tiny_checkpoint), device="cpu"))


@pytest.fixture(scope="session")
def tiny_export_cache(tmp_path_factory: pytest.TempPathFactory, encoder: Encoder) -> Path:
    """A model cache (CLIPSEARCH_MODEL_CACHE_DIR) holding the ONNX export of the `encoder`
    fixture's model, fp32 and int8, made once a session by the product's own export path.
    Copy it before changing it."""
    from dataclasses import replace

    from retrieval.models.identity import RuntimeSpec
    from retrieval.models.runtimes.choice import ensure_export

    cache = tmp_path_factory.mktemp("exports")
    spec = ModelSpec(TINY, encoder.identity.pretrained, device="cpu", cache_dir=cache)
    spec = replace(spec, runtime=RuntimeSpec("onnx", quantize="int8"))
    ensure_export(spec, encoder.backend, rebuild_corrupt=False)
    return cache


@dataclass(frozen=True)
class FamilyModel:
    """A tiny model of one family, as settings name it: CLIPSEARCH_MODEL and _PRETRAINED."""

    family: str
    model: str
    pretrained: str
    config_dir: Path | None = None  # CLIPSEARCH_MODEL_CONFIG_DIR

    def spec(self) -> ModelSpec:
        return ModelSpec(self.model, self.pretrained, device="cpu", config_dir=self.config_dir)


@pytest.fixture(scope="session")
def family_models(
    tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path
) -> dict[str, FamilyModel]:
    """One tiny model per family, with seeded random weights saved where its loader reads them:
    an open_clip checkpoint, a Chinese-CLIP checkpoint, transformers CLIP and SigLIP folders, and
    open_clip's multilingual (a transformers text tower) and SigLIP shapes with a local Hugging
    Face tokenizer."""
    from tests.fixtures.hf_models import write_tiny_clip, write_tiny_siglip
    from tests.fixtures.open_clip_hf import SIGLIP, XLMR, write_configs

    cn_clip = "cn-clip:clipsearch-tiny-zh"
    cn_path = tmp_path_factory.mktemp("cn-clip") / "tiny-zh.pt"
    cn_model = load_encoder(ModelSpec(cn_clip, "none", device="cpu", seed=7)).model
    torch.save({"state_dict": cn_model.state_dict()}, cn_path)
    hf_folder = write_tiny_clip(tmp_path_factory.mktemp("hf") / "tiny-clip")
    siglip_folder = write_tiny_siglip(tmp_path_factory.mktemp("hf") / "tiny-siglip")
    configs = write_configs(tmp_path_factory.mktemp("open-clip-hf"))
    return {
        "open_clip-xlmr": FamilyModel("open_clip", XLMR, "none", configs),
        "open_clip-siglip": FamilyModel("open_clip", SIGLIP, "none", configs),
        "hf-siglip": FamilyModel("hf", f"hf:{siglip_folder}", ""),
        "open_clip": FamilyModel("open_clip", TINY, str(tiny_checkpoint)),
        "cn_clip": FamilyModel("cn_clip", cn_clip, str(cn_path)),
        "hf": FamilyModel("hf", f"hf:{hf_folder}", ""),
    }


def _pg_schema_url(schema: str) -> str:
    assert PG_URL is not None
    sep = "&" if "?" in PG_URL else "?"
    return f"{PG_URL}{sep}options=-csearch_path%3D{schema}"


BOTH_DATABASES = [
    "sqlite",
    pytest.param(
        "postgres",
        marks=[
            pytest.mark.postgres,
            pytest.mark.skipif(
                PG_URL is None, reason="set CLIPSEARCH_TEST_DATABASE_URL to test Postgres"
            ),
        ],
    ),
]


def fresh_database(kind: str, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty catalog database: a SQLite file, or a private Postgres schema."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'catalog.db'}"
        return
    assert PG_URL is not None
    schema = "t_" + uuid.uuid4().hex[:12]
    admin = create_engine(PG_URL)
    with admin.connect() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
        conn.commit()
    try:
        yield _pg_schema_url(schema)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
            conn.commit()
        admin.dispose()


@pytest.fixture(params=BOTH_DATABASES)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    yield from fresh_database(request.param, tmp_path)


@pytest.fixture
def catalog(db_url: str) -> Iterator[Catalog]:
    cat = Catalog(db_url)
    cat.upgrade()
    yield cat
    cat.dispose()


@pytest.fixture
def settings(tmp_path: Path, db_url: str, tiny_checkpoint: Path) -> Settings:
    return load_settings(
        data_dir=tmp_path / "data",
        database_url=db_url,
        model=TINY,
        pretrained=str(tiny_checkpoint),
        device="cpu",
        workers=0,
        batch_size=16,
        retire_grace_seconds=0,
    )


def _trained_models_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """The demo's trained-models cache, so a suite run after `scripts/setup.sh` (which runs the
    demo) reuses the model the demo trained: one cache, one key (retrieval.training
    .shapes_model.recipe_key, which changes with the model and training code).

    CLIPSEARCH_TEST_MODEL_CACHE=DIR moves it; set empty, the models are trained every run.
    """
    from retrieval.training.shapes_model import trained_models_dir

    cache = os.environ.get("CLIPSEARCH_TEST_MODEL_CACHE")
    if cache is None:
        return trained_models_dir()
    return Path(cache) if cache else tmp_path_factory.mktemp(name)


@pytest.fixture(scope="session")
def semantic_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model trained on generated shapes by the product's own finetune, once a session.

    Set CLIPSEARCH_TEST_MODEL_CACHE to a directory to keep it between sessions (CI can cache
    that directory); the file name holds a digest of retrieval/ and the library versions, so
    any change to the code that makes it trains a new one.
    """
    from retrieval.training.shapes_model import (
        STEPS,
        cached_shapes_model,
        shapes_model_path,
        train_shapes_model,
    )

    out = shapes_model_path(folder=_trained_models_dir(tmp_path_factory, "semantic-model"))
    if cached_shapes_model(out, min_steps=STEPS) is not None:
        return out
    work = tmp_path_factory.mktemp("semantic-data")
    result = train_shapes_model(work, out, steps=STEPS, device="cpu", progress=False)
    return result.checkpoint


@pytest.fixture(scope="session")
def semantic_zh_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Chinese-CLIP tiny model trained on Chinese-captioned shapes by `clipsearch finetune`
    (the command, in its own process), once a session; cached like `semantic_checkpoint`."""
    from retrieval.training.shapes import generate_shapes
    from retrieval.training.shapes_model import (
        CHINESE,
        TRAIN_IMAGES,
        TRAIN_SEED,
        cached_shapes_model,
        shapes_model_path,
    )
    from tests.serving import run_cli

    out = shapes_model_path(CHINESE, _trained_models_dir(tmp_path_factory, "semantic-zh-model"))
    if cached_shapes_model(out, min_steps=CHINESE.steps, recipe=CHINESE) is not None:
        return out
    work = tmp_path_factory.mktemp("semantic-zh-data")
    data = CHINESE.training_data(work)
    generate_shapes(data.parent, TRAIN_IMAGES, seed=TRAIN_SEED, language="zh")
    settings = load_settings(data_dir=work / "state", model=CHINESE.model, pretrained="none")
    trained = run_cli(
        settings,
        "finetune",
        str(data),
        "--out",
        str(out),
        "--templates",
        "|".join(CHINESE.templates),
        "--steps",
        str(CHINESE.steps),
        "--batch-size",
        "96",
        "--lr",
        str(CHINESE.lr),
        "--loss",
        "class-aware",
        "--image-pairs",
        str(CHINESE.image_pairs),
        "--val-fraction",
        "0.05",
        "--no-progress",
        timeout=1800,
    )
    assert trained.returncode == 0, trained.stderr
    assert cached_shapes_model(out, min_steps=CHINESE.steps, recipe=CHINESE) is not None
    return out


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    """One headless Chromium a session, for every test that opens the page (tests/web/browser.py):
    Playwright's sync API runs one instance a thread."""
    from tests.web.browser import launched_chromium

    with launched_chromium() as launched:
        yield launched

"""The tiny model's export (tests/conftest.py's `tiny_export_cache`), copied for each test."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from retrieval.models.encoder import Encoder, load_encoder
from retrieval.models.identity import ModelSpec, RuntimeSpec

ONNX = RuntimeSpec("onnx")


def onnx_spec(spec: ModelSpec, cache: Path, **runtime: str) -> ModelSpec:
    return replace(spec, cache_dir=cache, runtime=replace(ONNX, **runtime))  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def tiny_spec(tiny_checkpoint: Path) -> ModelSpec:
    return ModelSpec("clipsearch-tiny", str(tiny_checkpoint), device="cpu")


@pytest.fixture
def export_cache(tiny_export_cache: Path, tmp_path: Path) -> Path:
    """A copy of the cache with the tiny model's export, for a test to change."""
    cache = tmp_path / "cache"
    shutil.copytree(tiny_export_cache, cache)
    return cache


def load(spec: ModelSpec, cache: Path, **runtime: str) -> Encoder:
    return load_encoder(onnx_spec(spec, cache, **runtime))

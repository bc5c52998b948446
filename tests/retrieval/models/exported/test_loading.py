"""CLIPSEARCH_RUNTIME=onnx loads the export alone (no torch model), torch or no torch; where
torch is not installed, an export of other weights or of an older clipsearch is never used and
the error says how to make one."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval.errors import WeightsUnavailable
from retrieval.models.encoder import Encoder
from retrieval.models.exported import loading
from retrieval.models.exported.backend import ExportBackend
from retrieval.models.identity import ModelSpec
from retrieval.models.runtimes.onnx_store import MANIFEST, export_folder, read_manifest
from tests.retrieval.models.runtimes.conftest import load, onnx_spec

TEXTS = ["a red circle", "一只猫", "🙂", ""]


@pytest.fixture
def no_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a torch-free install (tests/test_torch_free.py runs the real thing)."""
    monkeypatch.setattr(loading, "torch_installed", lambda: False)


def _pictures() -> list[Image.Image]:
    return [Image.new("RGB", (90, 60), (200, 30, 30)), Image.new("L", (40, 100), 90)]


def test_onnx_runs_the_export_alone_with_the_torch_models_results(
    tiny_spec: ModelSpec, encoder: Encoder, export_cache: Path
) -> None:
    exported = load(tiny_spec, export_cache)
    assert isinstance(exported.backend, ExportBackend) and exported.model is None
    assert exported.identity == encoder.identity
    np.testing.assert_allclose(exported.encode_texts(TEXTS), encoder.encode_texts(TEXTS), atol=1e-5)
    pictures = _pictures()
    np.testing.assert_allclose(
        exported.encode_images(pictures), encoder.encode_images(pictures), atol=1e-5
    )
    assert exported.score_rule == encoder.score_rule


def test_without_torch_the_export_is_found_by_the_weights_file(
    tiny_spec: ModelSpec, encoder: Encoder, export_cache: Path, tmp_path: Path, no_torch: None
) -> None:
    # The same checkpoint under another name is the same model; the export serves it.
    moved = tmp_path / "moved.pt"
    shutil.copyfile(tiny_spec.pretrained, moved)
    exported = load(replace(tiny_spec, pretrained=str(moved)), export_cache)
    np.testing.assert_allclose(exported.encode_texts(TEXTS), encoder.encode_texts(TEXTS), atol=1e-5)


def test_without_torch_an_export_of_other_weights_is_never_used(
    tiny_spec: ModelSpec, export_cache: Path, tmp_path: Path, no_torch: None
) -> None:
    other = tmp_path / "other.pt"
    other.write_bytes(Path(tiny_spec.pretrained).read_bytes() + b"\0")  # other sha256
    with pytest.raises(WeightsUnavailable) as info:
        load(replace(tiny_spec, pretrained=str(other)), export_cache)
    assert str(info.value) == (
        f"Model clipsearch-tiny ({other}) has no ONNX export in "
        f"{export_cache / 'clipsearch-exports'}, and torch, which makes one, is not installed "
        "here. Where torch is installed (pip install 'clipsearch[torch,onnx]'), run "
        "`clipsearch export` with the same model, then copy the folder it prints into "
        f"{export_cache / 'clipsearch-exports'}."
    )


def _make_it_format_1(folder: Path) -> None:
    """An export as clipsearch wrote them before they carried their tokenizer."""
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["format"] = 1
    manifest["versions"]["format"] = "1"
    del manifest["portable"]
    (folder / MANIFEST).write_text(json.dumps(manifest))
    shutil.rmtree(folder / "tokenizer")


def test_an_export_from_before_tokenizers_is_refused_without_torch_and_rebuilt_with_it(
    tiny_spec: ModelSpec,
    encoder: Encoder,
    export_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    folder = export_folder(encoder.identity, export_cache)
    _make_it_format_1(folder)
    with monkeypatch.context() as patch:
        patch.setattr(loading, "torch_installed", lambda: False)
        with pytest.raises(WeightsUnavailable) as info:
            load(tiny_spec, export_cache)
    assert f"has only an export made by an older clipsearch ({folder}, without" in str(info.value)
    assert "run `clipsearch export` with the same model" in str(info.value)
    exported = load(tiny_spec, export_cache)  # torch installed: rebuilt, then run alone
    assert "(it was made with other versions of format)" in caplog.text
    assert isinstance(exported.backend, ExportBackend)
    manifest = read_manifest(folder)
    assert manifest is not None and "portable" in manifest.extra


def test_auto_without_torch_runs_the_export(
    tiny_spec: ModelSpec, export_cache: Path, no_torch: None
) -> None:
    spec = onnx_spec(tiny_spec, export_cache, name="auto")
    assert loading.runs_from_export(spec)
    assert isinstance(loading.load_exported(spec).backend, ExportBackend)  # type: ignore[union-attr]

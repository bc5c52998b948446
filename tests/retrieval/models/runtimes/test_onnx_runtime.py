"""CLIPSEARCH_RUNTIME=onnx and auto: the cached export is used, never a stale one; a corrupt one
is refused or falls back to torch as CLIPSEARCH_ONNX_FALLBACK says; a missing package names the
extra; int8 graphs run when asked for."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from retrieval.errors import ConfigError, ExportUnusable, ModelMismatch
from retrieval.models.encoder import Encoder, load_encoder
from retrieval.models.identity import ModelSpec
from retrieval.models.runtimes.base import TorchRuntime
from retrieval.models.runtimes.calibration import CALIBRATION
from retrieval.models.runtimes.onnx_runner import OnnxRuntime
from retrieval.models.runtimes.onnx_store import (
    MANIFEST,
    export_folder,
    file_records,
    read_manifest,
    stale_reason,
    write_manifest,
)
from tests.retrieval.models.runtimes.conftest import load

TEXTS = ["a red circle", "a blue square on a wooden table"]


def _folder(encoder: Encoder, cache: Path) -> Path:
    return export_folder(encoder.identity, cache)


def _same_as_torch(exported: Encoder, encoder: Encoder) -> None:
    np.testing.assert_allclose(exported.encode_texts(TEXTS), encoder.encode_texts(TEXTS), atol=1e-5)


def test_the_cached_export_is_used_as_it_is(
    tiny_spec: ModelSpec, encoder: Encoder, export_cache: Path
) -> None:
    folder = _folder(encoder, export_cache)
    before = {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}
    exported = load(tiny_spec, export_cache)
    assert isinstance(exported.runtimes.text, OnnxRuntime)
    assert exported.runtimes.describe() == "onnx (CPUExecutionProvider)"
    _same_as_torch(exported, encoder)
    assert {path.name: path.stat().st_mtime_ns for path in folder.iterdir()} == before


def test_an_export_of_other_weights_is_never_used_but_rebuilt(
    tiny_spec: ModelSpec,
    encoder: Encoder,
    export_cache: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The same architecture with other (random) weights, exported, then put where the tiny
    # checkpoint's export belongs: as if the cache held an export from different weights.
    other_spec = ModelSpec("clipsearch-tiny", "none", device="cpu", seed=5)
    other = load(other_spec, tmp_path / "other")
    folder = _folder(encoder, export_cache)
    shutil.rmtree(folder)
    shutil.copytree(_folder(other, tmp_path / "other"), folder)
    stale = read_manifest(folder)
    assert stale is not None
    with pytest.raises(ModelMismatch):  # the identity guard
        encoder.identity.require_same(stale.identity)
    assert stale_reason(stale, encoder.identity) == (
        f"it was made from another model ({other.identity.describe()}), not "
        f"{encoder.identity.describe()}"
    )

    with caplog.at_level(logging.WARNING):
        exported = load(tiny_spec, export_cache)
    assert "(it was made from another model" in caplog.text
    _same_as_torch(exported, encoder)  # not the other weights' embeddings
    rebuilt = read_manifest(folder)
    assert rebuilt is not None and rebuilt.identity == encoder.identity


def test_an_export_made_with_other_versions_is_stale(encoder: Encoder, export_cache: Path) -> None:
    folder = _folder(encoder, export_cache)
    manifest = read_manifest(folder)
    assert manifest is not None and stale_reason(manifest, encoder.identity) is None
    older = {**manifest.versions, "onnxruntime": "1.0.0", "torch": "2.0.0"}
    from dataclasses import replace

    assert stale_reason(replace(manifest, versions=older), encoder.identity) == (
        "it was made with other versions of onnxruntime, torch"
    )


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupt_export_falls_back_to_torch_by_default(
    tiny_spec: ModelSpec,
    encoder: Encoder,
    export_cache: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    folder = _folder(encoder, export_cache)
    _flip_a_byte(folder / "text.onnx.data")
    with caplog.at_level(logging.WARNING):
        exported = load(tiny_spec, export_cache)
    assert isinstance(exported.runtimes.text, TorchRuntime)
    assert (
        f"The ONNX export in {folder} cannot be used: text.onnx.data: sha256 differs from its "
        "manifest. Run `clipsearch export --force` to build it again, or set "
        "CLIPSEARCH_RUNTIME=torch. Running torch instead."
    ) in caplog.text
    _same_as_torch(exported, encoder)
    assert read_manifest(folder) is not None  # left as it was found, for a look


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        ("truncate", "image.onnx has 100 bytes, its manifest says"),
        ("delete", "image.onnx is missing"),
        ("garbage", "ONNX Runtime cannot load image.onnx ("),
        ("manifest", f"its manifest {MANIFEST} cannot be read ("),
    ],
)
def test_a_corrupt_export_is_refused_when_the_setting_says_so(
    tiny_spec: ModelSpec, encoder: Encoder, export_cache: Path, damage: str, problem: str
) -> None:
    folder = _folder(encoder, export_cache)
    graph = folder / "image.onnx"
    if damage == "truncate":
        graph.write_bytes(graph.read_bytes()[:100])
    elif damage == "delete":
        graph.unlink()
    elif damage == "garbage":
        # Not a graph at all, with a manifest that agrees: only ONNX Runtime can tell.
        graph.write_bytes(b"not an onnx graph" * 10)
        manifest = read_manifest(folder)
        assert manifest is not None
        from dataclasses import replace

        write_manifest(folder, replace(manifest, files=file_records(folder)))
    else:
        (folder / MANIFEST).write_text("{ not json", encoding="utf-8")
    with pytest.raises(ExportUnusable) as info:
        load(tiny_spec, export_cache, fallback="refuse")
    message = str(info.value)
    assert message.startswith(f"The ONNX export in {folder} cannot be used: {problem}")
    assert message.endswith(
        "Run `clipsearch export --force` to build it again, or set CLIPSEARCH_RUNTIME=torch."
    )


def test_a_missing_onnxruntime_names_the_extra(
    tiny_spec: ModelSpec, export_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with pytest.raises(ConfigError) as info:
        load(tiny_spec, export_cache)
    assert str(info.value) == (
        "Invalid setting CLIPSEARCH_RUNTIME: CLIPSEARCH_RUNTIME=onnx needs the package "
        "onnxruntime, not installed here; install it with: pip install 'clipsearch[onnx]'"
    )
    # auto runs torch where there is no onnxruntime
    assert isinstance(load(tiny_spec, export_cache, name="auto").runtimes.text, TorchRuntime)


def test_onnx_runs_fp32_weights_only(tiny_spec: ModelSpec, export_cache: Path) -> None:
    from dataclasses import replace

    with pytest.raises(ConfigError) as info:
        load(replace(tiny_spec, precision="bf16"), export_cache)
    assert str(info.value) == (
        "Invalid setting CLIPSEARCH_PRECISION: bf16 is a torch precision; "
        "CLIPSEARCH_RUNTIME=onnx runs fp32 weights (int8 with CLIPSEARCH_QUANTIZE=int8). "
        "Use auto or fp32."
    )


def test_int8_graphs_run_when_asked_for(
    tiny_spec: ModelSpec, encoder: Encoder, export_cache: Path
) -> None:
    exported = load(tiny_spec, export_cache, quantize="int8")
    assert exported.runtimes.describe() == "onnx-int8 (CPUExecutionProvider)"
    ours, reference = exported.encode_texts(TEXTS), encoder.encode_texts(TEXTS)
    assert (ours * reference).sum(axis=1).min() > 0.99
    assert not np.allclose(ours, reference, atol=1e-5)  # other weights than fp32's


def test_auto_measures_once_and_keeps_what_it_chose(
    tiny_spec: ModelSpec,
    encoder: Encoder,
    export_cache: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO):
        first = load(tiny_spec, export_cache, name="auto")
    assert "CLIPSEARCH_RUNTIME=auto: measuring torch and ONNX Runtime" in caplog.text
    calibration = json.loads((_folder(encoder, export_cache) / CALIBRATION).read_text())
    (entry,) = calibration.values()
    assert set(entry["text_ms"]) == {"torch", "onnx"} == set(entry["image_batch_ms"])
    chosen = entry["chosen"]
    for tower in ("image", "text"):
        runtime = getattr(first.runtimes, tower)
        assert runtime.name == chosen[tower]
        if chosen[tower] == "onnx":
            assert set(runtime.sessions) == {t for t in chosen if chosen[t] == "onnx"}
    _same_as_torch(first, encoder)

    caplog.clear()
    with caplog.at_level(logging.INFO):
        second = load(tiny_spec, export_cache, name="auto")
    assert "measuring" not in caplog.text
    assert second.runtimes.describe() == first.runtimes.describe()


def test_a_torch_encoder_is_unchanged(encoder: Encoder) -> None:
    assert encoder.runtimes.describe() == "torch fp32 on cpu"
    assert load_encoder(ModelSpec("clipsearch-tiny", "none", device="cpu")).runtimes.image.name == (
        "torch"
    )

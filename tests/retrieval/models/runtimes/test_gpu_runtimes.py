"""The CUDA paths of ONNX Runtime (the CUDA provider in fp16, TensorRT), as far as a machine
without a GPU can check them: the settings each device refuses, the provider options and the
engine cache, the fp16 graphs (made and verified on the CPU), batches run in parts, and a clear
error where onnxruntime has no GPU provider. `bench/gpu_check.py` runs them on a GPU."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from retrieval.errors import ConfigError
from retrieval.models.encoder import Encoder
from retrieval.models.identity import ModelSpec, RuntimeSpec
from retrieval.models.runtimes import gpu
from retrieval.models.runtimes.base import TorchRuntime
from retrieval.models.runtimes.choice import choose_runtimes, ensure_export, onnx_weights
from retrieval.models.runtimes.onnx_runner import OnnxRuntime
from retrieval.models.runtimes.onnx_store import (
    check_files,
    export_folder,
    publish,
    read_manifest,
)
from tests.retrieval.models.runtimes.conftest import onnx_spec

REPO = Path(__file__).resolve().parents[4]
TEXTS = ["a red circle", "a blue square on a wooden table", "一只猫"]


def test_which_graphs_each_runtime_runs() -> None:
    onnx, trt = RuntimeSpec("onnx"), RuntimeSpec("tensorrt")
    assert onnx_weights(onnx) == "fp32"
    assert onnx_weights(onnx, "fp16") == "fp16"  # the CUDA provider runs the fp16 copy
    assert onnx_weights(trt, "fp16") == "fp32"  # TensorRT makes its own fp16 from fp32
    assert onnx_weights(replace(onnx, quantize="int8"), "fp32") == "int8"


@pytest.mark.parametrize(
    ("runtime", "device", "precision", "message"),
    [
        (
            RuntimeSpec("tensorrt"),
            "cpu",
            "fp32",
            "Invalid setting CLIPSEARCH_RUNTIME: tensorrt needs a CUDA device (the device is "
            "cpu); use onnx or auto on a CPU",
        ),
        (
            RuntimeSpec("onnx", quantize="int8"),
            "cuda",
            "fp16",
            "Invalid setting CLIPSEARCH_QUANTIZE: int8 is ONNX Runtime's CPU quantization; on a "
            "CUDA device use fp16 (CLIPSEARCH_PRECISION=fp16 or auto) instead",
        ),
        (
            RuntimeSpec("tensorrt"),
            "cuda:0",
            "bf16",
            "Invalid setting CLIPSEARCH_PRECISION: bf16 is a torch precision; "
            "CLIPSEARCH_RUNTIME=tensorrt runs fp32 weights (fp16 on a CUDA device, int8 with "
            "CLIPSEARCH_QUANTIZE=int8). Use auto or fp32.",
        ),
    ],
)
def test_settings_a_device_cannot_run_are_refused_before_any_export(
    encoder: Encoder,
    tmp_path: Path,
    runtime: RuntimeSpec,
    device: str,
    precision: str,
    message: str,
) -> None:
    spec = ModelSpec("clipsearch-tiny", "none", device=device, cache_dir=tmp_path, runtime=runtime)
    with pytest.raises(ConfigError) as info:
        choose_runtimes(spec, encoder.backend, device, precision, torch.float32)
    assert str(info.value) == message
    assert not any(tmp_path.iterdir())  # nothing exported


def test_a_cpu_only_onnxruntime_on_a_cuda_device_names_the_gpu_extra(
    tiny_spec: ModelSpec,
    encoder: Encoder,
    export_cache: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert gpu.CUDA_PROVIDER not in gpu._available()  # the CPU package, as installed here
    before = sorted(p.name for p in export_folder(encoder.identity, export_cache).iterdir())
    for kind in ("onnx", "tensorrt"):
        spec = onnx_spec(tiny_spec, export_cache, name=kind)
        with pytest.raises(ConfigError) as info:
            choose_runtimes(spec, encoder.backend, "cuda", "fp16", torch.float16)
        assert "pip uninstall onnxruntime, then pip install 'clipsearch[gpu]'" in str(info.value)
    # auto leaves ONNX Runtime out and runs torch
    spec = onnx_spec(tiny_spec, export_cache, name="auto")
    with caplog.at_level(logging.INFO):
        runtimes = choose_runtimes(spec, encoder.backend, "cuda", "fp16", torch.float16)
    assert isinstance(runtimes.image, TorchRuntime) and isinstance(runtimes.text, TorchRuntime)
    assert "CLIPSEARCH_RUNTIME=auto leaves out onnx: " in caplog.text
    after = sorted(p.name for p in export_folder(encoder.identity, export_cache).iterdir())
    assert after == before  # no fp16 graphs made for a provider that is not there


def test_tensorrt_options_cache_engines_by_export_gpu_and_precision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        gpu,
        "_available",
        lambda: {gpu.TENSORRT_PROVIDER, gpu.CUDA_PROVIDER, "CPUExecutionProvider"},
    )
    export = tmp_path / "exports" / "identity" / "versions"
    cache16 = gpu.engine_cache(export, "cuda:1", fp16=True)
    assert cache16 == gpu.engine_cache(export, "cuda:1", fp16=True)  # stable: a restart finds it
    assert cache16.parent == export / gpu.ENGINES and cache16.name.endswith("-fp16")
    assert gpu.engine_cache(export, "cuda:1", fp16=False) != cache16
    profile = gpu.profile_shapes("text", ("ids", "mask"), 224, 77)
    assert profile == {
        "trt_profile_min_shapes": "ids:1x1,mask:1x1",
        "trt_profile_opt_shapes": "ids:1x16,mask:1x16",
        "trt_profile_max_shapes": f"ids:{gpu.MAX_BATCH}x77,mask:{gpu.MAX_BATCH}x77",
    }
    assert gpu.profile_shapes("image", ("pixels",), 224, 77)["trt_profile_max_shapes"] == (
        f"pixels:{gpu.MAX_BATCH}x3x224x224"
    )
    providers = gpu.tensorrt_providers("cuda:1", fp16=True, cache=cache16, profile=profile)
    name, options = providers[0]
    assert name == gpu.TENSORRT_PROVIDER
    assert options["device_id"] == 1 and options["trt_fp16_enable"] is True
    assert options["trt_engine_cache_enable"] is True
    assert options["trt_engine_cache_path"] == str(cache16) == options["trt_timing_cache_path"]
    assert options["trt_profile_opt_shapes"] == "ids:1x16,mask:1x16"
    assert providers[1] == (gpu.CUDA_PROVIDER, {"device_id": 1})
    assert providers[2] == "CPUExecutionProvider"
    assert cache16.is_dir()

    # A rebuilt export replaces its folder: its engines go with it, never used with new graphs.
    (cache16 / "model.engine").write_bytes(b"engine")
    built = tmp_path / "built"
    built.mkdir()
    (built / "export.json").write_text("{}")
    publish(built, export)
    assert not (export / gpu.ENGINES).exists()


class _Session:
    def __init__(self, first: str) -> None:
        self.first = first

    def get_providers(self) -> list[str]:
        return [self.first, "CPUExecutionProvider"]


def test_tensorrt_that_did_not_start_is_an_error_not_a_silent_cuda_run(tmp_path: Path) -> None:
    gpu.check_tensorrt_loaded(_Session(gpu.TENSORRT_PROVIDER), tmp_path / "image.onnx")
    with pytest.raises(ConfigError) as info:
        gpu.check_tensorrt_loaded(_Session(gpu.CUDA_PROVIDER), tmp_path / "image.onnx")
    assert str(info.value).startswith(
        "Invalid setting CLIPSEARCH_RUNTIME: ONNX Runtime could not start TensorRT for image.onnx"
    )


@pytest.mark.slow  # converts and verifies both towers
def test_fp16_graphs_are_made_once_verified_and_recorded(
    tiny_spec: ModelSpec, encoder: Encoder, export_cache: Path
) -> None:
    spec = onnx_spec(tiny_spec, export_cache)
    result = ensure_export(spec, encoder.backend, rebuild_corrupt=False, weights="fp16")
    assert not result.built  # added to the cached export, not a new one
    manifest = read_manifest(result.folder)
    assert manifest is not None
    for tower in ("image", "text"):
        graph = manifest.towers[tower].graphs["fp16"]
        assert graph.file == f"{tower}.fp16.onnx"
        assert graph.cosine_min >= gpu.FP16_COSINE_MIN and graph.max_abs_diff > 0
    check_files(result.folder, manifest, manifest.graph_files("fp16"))  # sha256 recorded
    stamps = {p.name: p.stat().st_mtime_ns for p in result.folder.iterdir()}
    ensure_export(spec, encoder.backend, rebuild_corrupt=False, weights="fp16")
    assert {p.name: p.stat().st_mtime_ns for p in result.folder.iterdir()} == stamps

    # The fp16 graphs run (here on the CPU provider) close to torch fp32, not equal to it.
    runtime = OnnxRuntime.open(
        encoder.backend, result.folder, manifest, weights="fp16", device="cpu", threads=0
    )
    assert runtime.name == "onnx-fp16"
    tokens = encoder.tokenize(TEXTS)
    ours = runtime.encode_text(tokens, trim=True)
    ours = ours / np.linalg.norm(ours, axis=1, keepdims=True)
    reference = encoder.encode_texts(TEXTS)  # torch fp32, unit rows
    assert (ours * reference).sum(axis=1).min() >= gpu.FP16_COSINE_MIN
    assert not np.allclose(ours, reference, atol=1e-7)


def test_batches_above_the_engine_profile_run_in_parts(
    tiny_spec: ModelSpec, encoder: Encoder, export_cache: Path
) -> None:
    folder = export_folder(encoder.identity, export_cache)
    manifest = read_manifest(folder)
    assert manifest is not None
    whole = OnnxRuntime.open(
        encoder.backend, folder, manifest, weights="fp32", device="cpu", threads=0
    )
    parts = OnnxRuntime(
        encoder.backend, folder, manifest, whole.sessions, kind="tensorrt", max_batch=2
    )
    assert parts.only(["text"]).max_batch == 2 and parts.only(["text"]).kind == "tensorrt"
    size = encoder.identity.image_size
    pixels = torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(0))
    calls: list[int] = []
    session: Any = whole.sessions["image"]

    class Counting:
        def run(self, names: Any, feed: dict[str, np.ndarray]) -> Any:
            calls.append(len(feed["pixels"]))
            return session.run(names, feed)

    parts.sessions = {**whole.sessions, "image": Counting()}
    np.testing.assert_allclose(parts.encode_image(pixels), whole.encode_image(pixels), atol=1e-6)
    assert calls == [2, 2, 1]
    tokens = encoder.tokenize(TEXTS)
    np.testing.assert_allclose(
        parts.encode_text(tokens, trim=True),
        whole.encode_text(tokens, trim=True),
        atol=1e-6,
    )


def test_gpu_check_says_no_gpu_in_one_line_on_a_machine_without_one(tmp_path: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on a machine with one
    done = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--out", str(tmp_path / "out")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 1
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("no GPU: torch sees no CUDA device")

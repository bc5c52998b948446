"""ONNX Runtime on a CUDA device: the CUDA provider, or TensorRT, in fp16.

- `CLIPSEARCH_RUNTIME=onnx` on a CUDA device runs the export with the CUDA execution provider.
  In fp16 (CLIPSEARCH_PRECISION=fp16, or auto, which is fp16 on CUDA) it runs a half-precision
  copy of the export's graphs (`image.fp16.onnx`, `text.fp16.onnx`, float32 in and out), made
  once, verified against torch fp32 and recorded in the export's manifest like the int8 graphs.
- `CLIPSEARCH_RUNTIME=tensorrt` runs the fp32 export through ONNX Runtime's TensorRT provider,
  which builds its own engine (fp16 kernels where the precision is fp16). Building takes minutes,
  so the engines are kept in the export's folder, keyed by the GPU and the versions that built
  them (`engine_cache`): a second start loads them. The engines hold optimisation profiles for
  batches up to `MAX_BATCH`; larger batches are run in parts.

Both need `onnxruntime-gpu` (the `gpu` extra), which takes the place of `onnxruntime`: the two
packages install the same module and must not be installed together. TensorRT also needs
TensorRT's own libraries, of the version the installed onnxruntime-gpu was built against.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retrieval.errors import ConfigError

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

CUDA_PROVIDER = "CUDAExecutionProvider"
TENSORRT_PROVIDER = "TensorrtExecutionProvider"
GPU_EXTRA = "gpu"
ENGINES = "tensorrt"  # the sub-folder of an export that holds its TensorRT engines
MAX_BATCH = 256  # the largest batch a TensorRT profile takes (the optimum: OPT_BATCH)
OPT_BATCH = 64  # the indexer's default batch (CLIPSEARCH_BATCH_SIZE)
OPT_TEXT_LENGTH = 16  # a trimmed query's tokens, about
FP16_COSINE_MIN = 0.999  # an fp16 graph further than this from torch fp32 is not kept


def device_id(device: str) -> int:
    """The CUDA ordinal of a resolved device (`cuda` is cuda:0)."""
    return int(device[5:]) if device.startswith("cuda:") else 0


def _available() -> set[str]:
    import onnxruntime as ort

    return set(ort.get_available_providers())


def cuda_providers(device: str, setting: str = "CLIPSEARCH_RUNTIME") -> list[Any]:
    """The CUDA execution provider (then the CPU, for the few nodes CUDA has no kernel for)."""
    if CUDA_PROVIDER not in _available():
        raise ConfigError(
            setting,
            f"the device is {device}, but the installed onnxruntime runs on the CPU only; "
            f"install onnxruntime-gpu in its place (pip uninstall onnxruntime, then pip install "
            f"'clipsearch[{GPU_EXTRA}]'), or use CLIPSEARCH_RUNTIME=torch",
        )
    return [(CUDA_PROVIDER, {"device_id": device_id(device)}), "CPUExecutionProvider"]


def require_provider(kind: str, device: str) -> None:
    """ConfigError now, before any graph is made, when the installed onnxruntime cannot run
    `kind` (onnx, tensorrt) on this CUDA device."""
    if kind == "tensorrt" and TENSORRT_PROVIDER not in _available():
        raise ConfigError(
            "CLIPSEARCH_RUNTIME",
            "tensorrt needs onnxruntime-gpu with its TensorRT provider "
            f"(pip uninstall onnxruntime, then pip install 'clipsearch[{GPU_EXTRA}]'), "
            "or use CLIPSEARCH_RUNTIME=onnx or torch",
        )
    cuda_providers(device)


def gpu_key(device: str) -> str:
    """What a TensorRT engine is only valid for: the GPU model and its compute capability, and
    the versions of onnxruntime and TensorRT that built it."""
    material: dict[str, Any] = {}
    try:
        import torch

        index = device_id(device)
        material["gpu"] = torch.cuda.get_device_name(index)
        material["capability"] = list(torch.cuda.get_device_capability(index))
    except Exception:  # noqa: BLE001 - no torch, or no CUDA: the versions still key it
        material["gpu"] = "unknown"
    for package in ("onnxruntime-gpu", "onnxruntime", "tensorrt", "tensorrt-cu12-libs"):
        try:
            material[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:12]


def engine_cache(export: Path, device: str, fp16: bool) -> Path:
    """The folder of the TensorRT engines built from one export (an export is keyed by model
    identity and exporter versions), for this GPU and precision. A rebuilt export replaces its
    whole folder, engines included, so an engine never outlives the graph it was built from."""
    return export / ENGINES / f"{gpu_key(device)}-{'fp16' if fp16 else 'fp32'}"


def profile_shapes(
    tower: str, inputs: tuple[str, ...], image_size: int, context: int
) -> dict[str, str]:
    """TensorRT's optimisation profile of one tower: the smallest, usual and largest input of
    each name, as its provider options spell them (`ids:1x1,mask:1x1`)."""

    def spell(batch: int, length: int) -> str:
        if tower == "image":
            return f"pixels:{batch}x3x{image_size}x{image_size}"
        return ",".join(f"{name}:{batch}x{length}" for name in inputs)

    if tower == "image":
        return {
            "trt_profile_min_shapes": spell(1, 0),
            "trt_profile_opt_shapes": spell(OPT_BATCH, 0),
            "trt_profile_max_shapes": spell(MAX_BATCH, 0),
        }
    return {
        "trt_profile_min_shapes": spell(1, 1),
        "trt_profile_opt_shapes": spell(1, min(OPT_TEXT_LENGTH, context)),
        "trt_profile_max_shapes": spell(MAX_BATCH, context),
    }


def tensorrt_providers(
    device: str, *, fp16: bool, cache: Path, profile: dict[str, str]
) -> list[Any]:
    """TensorRT first (with its engine and timing caches in `cache`), then CUDA for what
    TensorRT does not take, then the CPU."""
    require_provider("tensorrt", device)
    cache.mkdir(parents=True, exist_ok=True)
    options: dict[str, Any] = {
        "device_id": device_id(device),
        "trt_fp16_enable": fp16,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache),
        **profile,
    }
    return [(TENSORRT_PROVIDER, options), *cuda_providers(device)]


def check_tensorrt_loaded(session: Any, graph: Path) -> None:
    """ConfigError when ONNX Runtime fell back to CUDA because TensorRT's libraries did not load
    (it only logs that): `tensorrt` must mean TensorRT."""
    if session.get_providers()[0] != TENSORRT_PROVIDER:
        raise ConfigError(
            "CLIPSEARCH_RUNTIME",
            f"ONNX Runtime could not start TensorRT for {graph.name} (its libraries were not "
            "found or do not match this onnxruntime-gpu); install the TensorRT version its "
            "documentation names, or use CLIPSEARCH_RUNTIME=onnx",
        )

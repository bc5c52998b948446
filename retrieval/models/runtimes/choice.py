"""Which runtime runs each tower (CLIPSEARCH_RUNTIME), and the export it needs.

- `torch`: the loaded model itself.
- `onnx`: ONNX Runtime on the model's export, made now if the cache has none for this model
  and these versions (a stale one is rebuilt); a corrupt export falls back to torch with a
  warning, or is refused (CLIPSEARCH_ONNX_FALLBACK).
- `tensorrt` (a CUDA device): ONNX Runtime's TensorRT provider on the same export, its engines
  cached beside it (`gpu`).
- `auto`: per tower, the fastest of torch and the runtimes installed for this device (ONNX
  Runtime; on a CUDA device also TensorRT where onnxruntime-gpu has it), measured on this
  machine; the measurement is made once and kept beside the export (`calibration`).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retrieval.errors import ConfigError, ExportUnusable, ModelMismatch
from retrieval.models.backend import ModelBackend, load_backend
from retrieval.models.identity import ModelSpec, RuntimeSpec
from retrieval.models.runtimes.base import Runtimes, TorchRuntime, TowerRuntime
from retrieval.models.runtimes.packages import (
    EXPORT_PACKAGES,
    RUNTIME_PACKAGES,
    missing_packages,
    require_packages,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

RUNTIME_SETTING = "CLIPSEARCH_RUNTIME"


@dataclass(frozen=True)
class ExportResult:
    folder: Path
    built: bool  # False: the cached export was used


def onnx_weights(runtime: RuntimeSpec, precision: str = "fp32") -> str:
    """Which graphs of the export run: int8 when quantized; on a CUDA device in fp16, the
    fp16 graphs (ONNX Runtime's CUDA provider; TensorRT makes its own fp16 from fp32)."""
    if runtime.quantize == "int8":
        return "int8"
    return "fp16" if precision == "fp16" and runtime.name != "tensorrt" else "fp32"


def _add_graphs(
    weights: str, spec: ModelSpec, backend: ModelBackend, folder: Path, manifest: Any
) -> Any:
    """The manifest with the `weights` graphs (int8, fp16) added to the export in `folder`."""
    from retrieval.models.runtimes.onnx_export import quantize_export

    require_packages(EXPORT_PACKAGES, RUNTIME_SETTING, f"making the {weights} graphs")
    fp32 = fp32_cpu_backend(spec, backend)
    if weights == "fp16":
        from retrieval.models.runtimes.onnx_export import half_export

        return half_export(fp32, folder, manifest)
    return quantize_export(fp32, folder, manifest)


def ensure_export(
    spec: ModelSpec,
    backend: ModelBackend,
    *,
    rebuild_corrupt: bool,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
    weights: str | None = None,
) -> ExportResult:
    """The model's verified export in the cache (built if missing or stale, with the int8
    graphs when CLIPSEARCH_QUANTIZE=int8, the fp16 ones for `weights` fp16). A corrupt one
    raises ExportUnusable unless `rebuild_corrupt` (`clipsearch export` rebuilds it; a loading
    service does not)."""
    from retrieval.models.runtimes.onnx_export import build_folder, export_model
    from retrieval.models.runtimes.onnx_store import (
        check_files,
        export_folder,
        export_lock,
        publish,
        read_manifest,
        stale_reason,
        write_manifest,
    )

    identity = backend.identity
    folder = export_folder(identity, spec.cache_dir)
    weights = weights or onnx_weights(spec.runtime)
    with export_lock(identity, spec.cache_dir):
        reason = "forced" if force else None
        if reason is None:
            try:
                manifest = read_manifest(folder)
                if manifest is None:
                    reason = "none made yet"
                else:
                    reason = stale_reason(manifest, identity)
                    if reason is None:
                        check_files(folder, manifest, manifest.graph_files("fp32"))
                        if weights != "fp32" and not manifest.graph_files(weights):
                            added = _add_graphs(weights, spec, backend, folder, manifest)
                            write_manifest(folder, added)
                        elif weights != "fp32":
                            check_files(folder, manifest, manifest.graph_files(weights))
                        return ExportResult(folder, built=False)
            except ExportUnusable:
                if not rebuild_corrupt:
                    raise
                reason = "corrupt"
        log.warning(
            "exporting %s to ONNX in %s (%s); this is done once per model",
            identity.describe(),
            folder,
            reason,
        )
        require_packages(EXPORT_PACKAGES, RUNTIME_SETTING, "exporting a model to ONNX")
        fp32 = fp32_cpu_backend(spec, backend)
        build = build_folder(folder)
        try:
            manifest = export_model(fp32, build, quantize=weights == "int8", progress=progress)
            if weights == "fp16":
                write_manifest(build, _add_graphs(weights, spec, fp32, build, manifest))
            publish(build, folder)
        finally:
            shutil.rmtree(build, ignore_errors=True)
    return ExportResult(folder, built=True)


def fp32_cpu_backend(spec: ModelSpec, backend: ModelBackend) -> ModelBackend:
    """The backend itself when it is fp32 on the CPU; else the same model loaded so (an export
    is made from fp32 weights, never from half-precision copies)."""
    import torch

    tensors = [*backend.model.parameters(), *backend.model.buffers()]
    if all(
        t.device.type == "cpu" and (t.dtype == torch.float32 or not t.is_floating_point())
        for t in tensors
    ):
        return backend
    loaded = load_backend(replace(spec, device="cpu", precision="fp32"), "cpu", "fp32")
    loaded.identity = backend.identity
    return loaded


def _check_settings(runtime: RuntimeSpec, device: str, precision: str) -> None:
    """ConfigError for a runtime setting this device or precision cannot run."""
    on_cuda = device.startswith("cuda")
    if runtime.name == "tensorrt" and not on_cuda:
        raise ConfigError(
            RUNTIME_SETTING,
            f"tensorrt needs a CUDA device (the device is {device}); use onnx or auto on a CPU",
        )
    if runtime.name in ("onnx", "tensorrt"):
        if precision == "bf16" or (precision == "fp16" and not on_cuda):
            raise ConfigError(
                "CLIPSEARCH_PRECISION",
                f"{precision} is a torch precision; CLIPSEARCH_RUNTIME={runtime.name} runs fp32 "
                "weights (fp16 on a CUDA device, int8 with CLIPSEARCH_QUANTIZE=int8). "
                "Use auto or fp32.",
            )
    if runtime.quantize == "int8" and on_cuda and runtime.name != "torch":
        raise ConfigError(
            "CLIPSEARCH_QUANTIZE",
            "int8 is ONNX Runtime's CPU quantization; on a CUDA device use fp16 "
            "(CLIPSEARCH_PRECISION=fp16 or auto) instead",
        )


def choose_runtimes(
    spec: ModelSpec, backend: ModelBackend, device: str, precision: str, dtype: torch.dtype
) -> Runtimes:
    """The runtime of each tower, as `spec.runtime` asks (see the module docstring)."""
    torch_runtime = TorchRuntime(backend, device, dtype)
    runtime = spec.runtime
    if runtime.name == "torch":
        return Runtimes(torch_runtime, torch_runtime)
    if runtime.name == "auto" and missing_packages(RUNTIME_PACKAGES):
        log.info("CLIPSEARCH_RUNTIME=auto: onnxruntime is not installed; running torch")
        return Runtimes(torch_runtime, torch_runtime)
    if runtime.name in ("onnx", "tensorrt"):
        require_packages(RUNTIME_PACKAGES, RUNTIME_SETTING, f"CLIPSEARCH_RUNTIME={runtime.name}")
    _check_settings(runtime, device, precision)
    kinds = [runtime.name] if runtime.name != "auto" else _auto_kinds(device)
    candidates: dict[str, TowerRuntime] = {}
    for kind in kinds:
        try:
            candidates[kind] = open_onnx_runtime(spec, backend, device, kind, precision)
        except ExportUnusable as exc:
            if runtime.name != "auto" and runtime.fallback == "refuse":
                raise
            log.warning("%s Running torch instead.", exc)
            return Runtimes(torch_runtime, torch_runtime)
        except ConfigError as exc:
            if runtime.name != "auto":
                raise
            log.info("CLIPSEARCH_RUNTIME=auto leaves out %s: %s", kind, exc)
    if runtime.name != "auto":
        chosen = candidates[runtime.name]
        return Runtimes(chosen, chosen)
    if not candidates:
        return Runtimes(torch_runtime, torch_runtime)
    from retrieval.models.runtimes.calibration import fastest

    return fastest(backend, torch_runtime, candidates, spec)


def _auto_kinds(device: str) -> list[str]:
    """What `auto` measures beside torch: ONNX Runtime, and TensorRT where a CUDA device and
    onnxruntime-gpu's TensorRT provider are there."""
    if not device.startswith("cuda"):
        return ["onnx"]
    import onnxruntime as ort

    from retrieval.models.runtimes.gpu import TENSORRT_PROVIDER

    trt = TENSORRT_PROVIDER in ort.get_available_providers()
    return ["onnx", "tensorrt"] if trt else ["onnx"]


def open_onnx_runtime(
    spec: ModelSpec,
    backend: ModelBackend,
    device: str,
    kind: str = "onnx",
    precision: str = "fp32",
) -> TowerRuntime:
    """ONNX Runtime sessions of the model's cached export (built first where needed): `kind`
    onnx on the device's provider, or tensorrt."""
    from retrieval.models.runtimes.onnx_runner import OnnxRuntime
    from retrieval.models.runtimes.onnx_store import read_manifest

    if device.startswith("cuda"):
        from retrieval.models.runtimes.gpu import require_provider

        require_provider(kind, device)
    weights = onnx_weights(replace(spec.runtime, name=kind), precision)
    result = ensure_export(spec, backend, rebuild_corrupt=False, weights=weights)
    manifest = read_manifest(result.folder)
    if manifest is None:  # published a moment ago, then removed
        raise ExportUnusable(str(result.folder), "its manifest is gone", "Start again.")
    try:
        backend.identity.require_same(manifest.identity)
    except ModelMismatch as exc:  # the identity guard, once more at the point of use
        raise ExportUnusable(str(result.folder), str(exc), "Start again.") from None
    return OnnxRuntime.open(
        backend,
        result.folder,
        manifest,
        weights=weights,
        device=device,
        threads=spec.runtime.threads,
        kind=kind,
        fp16=precision == "fp16",
    )

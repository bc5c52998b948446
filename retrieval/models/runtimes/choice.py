"""Which runtime runs each tower (CLIPSEARCH_RUNTIME), and the export it needs.

- `torch`: the loaded model itself.
- `onnx`: ONNX Runtime on the model's export, made now if the cache has none for this model
  and these versions (a stale one is rebuilt); a corrupt export falls back to torch with a
  warning, or is refused (CLIPSEARCH_ONNX_FALLBACK).
- `auto`: ONNX Runtime where it is installed and measured faster on this machine, per tower;
  the measurement is made once and kept beside the export (`calibration`).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

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


def onnx_weights(runtime: RuntimeSpec) -> str:
    return "int8" if runtime.quantize == "int8" else "fp32"


def ensure_export(
    spec: ModelSpec,
    backend: ModelBackend,
    *,
    rebuild_corrupt: bool,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """The model's verified export in the cache (built if missing or stale, with the int8
    graphs when CLIPSEARCH_QUANTIZE=int8). A corrupt one raises ExportUnusable unless
    `rebuild_corrupt` (`clipsearch export` rebuilds it; a loading service does not)."""
    from retrieval.models.runtimes.onnx_export import build_folder, export_model, quantize_export
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
    weights = onnx_weights(spec.runtime)
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
                        if weights == "int8" and not manifest.graph_files("int8"):
                            require_packages(EXPORT_PACKAGES, RUNTIME_SETTING, "quantizing")
                            fp32 = fp32_cpu_backend(spec, backend)
                            write_manifest(folder, quantize_export(fp32, folder, manifest))
                        elif weights == "int8":
                            check_files(folder, manifest, manifest.graph_files("int8"))
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
            export_model(fp32, build, quantize=weights == "int8", progress=progress)
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
    if runtime.name == "onnx":
        require_packages(RUNTIME_PACKAGES, RUNTIME_SETTING, "CLIPSEARCH_RUNTIME=onnx")
        if precision in ("fp16", "bf16"):
            raise ConfigError(
                "CLIPSEARCH_PRECISION",
                f"{precision} is a torch precision; CLIPSEARCH_RUNTIME=onnx runs fp32 weights "
                "(int8 with CLIPSEARCH_QUANTIZE=int8). Use auto or fp32.",
            )
    try:
        onnx_runtime = open_onnx_runtime(spec, backend, device)
    except ExportUnusable as exc:
        if runtime.name == "onnx" and runtime.fallback == "refuse":
            raise
        log.warning("%s Running torch instead.", exc)
        return Runtimes(torch_runtime, torch_runtime)
    if runtime.name == "onnx":
        return Runtimes(onnx_runtime, onnx_runtime)
    from retrieval.models.runtimes.calibration import fastest

    return fastest(backend, torch_runtime, onnx_runtime, spec)


def open_onnx_runtime(spec: ModelSpec, backend: ModelBackend, device: str) -> TowerRuntime:
    """ONNX Runtime sessions of the model's cached export (built first where needed)."""
    from retrieval.models.runtimes.onnx_runner import OnnxRuntime
    from retrieval.models.runtimes.onnx_store import read_manifest

    result = ensure_export(spec, backend, rebuild_corrupt=False)
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
        weights=onnx_weights(spec.runtime),
        device=device,
        threads=spec.runtime.threads,
    )

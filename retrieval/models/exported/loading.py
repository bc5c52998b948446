"""CLIPSEARCH_RUNTIME=onnx: finding the model's export and loading an encoder from it alone.

The export is found by what the settings name, without loading the model: the family and
name, and the weights (the sha256 of a checkpoint file that is here, the seed of random weights,
or else the pretrained tag), or the exact naming it was made with. Where torch is installed, an
export must also have been made by the installed torch, onnx and onnxruntime (else it is stale,
and the torch path rebuilds it); without torch, any export of the current format will do, since
nothing here could make another.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from retrieval.errors import ConfigError, ExportUnusable, WeightsUnavailable
from retrieval.models.cache import exports_dir
from retrieval.models.identity import HF, ModelIdentity, ModelSource, ModelSpec, parse_model_name
from retrieval.models.runtimes.packages import torch_installed
from retrieval.models.weights import RANDOM_INIT, sha256_file

if TYPE_CHECKING:
    from retrieval.models.exported.backend import ExportBackend
    from retrieval.models.runtimes.base import Runtimes
    from retrieval.models.runtimes.onnx_store import ExportManifest

log = logging.getLogger(__name__)


def runs_from_export(spec: ModelSpec) -> bool:
    """Whether the settings run the model from its export: onnx, or auto where there is no
    torch to compare it with."""
    return spec.runtime.name == "onnx" or (spec.runtime.name == "auto" and not torch_installed())


@dataclass
class _Wanted:
    spec: ModelSpec

    @cached_property
    def checkpoint_sha256(self) -> str | None:
        path = Path(self.spec.pretrained).expanduser()
        return sha256_file(path) if path.is_file() else None

    def matches(self, identity: ModelIdentity) -> bool:
        family, name = parse_model_name(self.spec.name)
        if identity.family != family:
            return False
        pretrained = self.spec.pretrained
        if pretrained.lower() in RANDOM_INIT and family != HF:
            weights_match = identity.weights_sha256 == f"random-init-seed{self.spec.seed}"
        elif self.checkpoint_sha256 is not None:
            weights_match = identity.weights_sha256 == self.checkpoint_sha256
        else:
            weights_match = identity.pretrained == pretrained
        if not weights_match:
            return False
        if identity.source is not None and identity.source == ModelSource.of(self.spec):
            return True
        return identity.name in (name, f"{family}:{name}")


def _manifests(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(root.glob("*/*/export.json"), key=lambda path: path.stat().st_mtime, reverse=True)


def find_export(spec: ModelSpec, *, strict_versions: bool) -> tuple[Path, ExportManifest] | None:
    """The newest sound-looking export of the model the spec names (its folder and manifest), or
    None. Unreadable manifests are passed over (the torch path reports them)."""
    found, _ = _search(spec, strict_versions=strict_versions)
    return found


def _search(
    spec: ModelSpec, *, strict_versions: bool
) -> tuple[tuple[Path, ExportManifest] | None, Path | None]:
    """(`find_export`'s answer, the folder of an export of the model in an older format)."""
    from retrieval.models.runtimes.onnx_store import FORMAT, ExportManifest, runtime_versions

    wanted = _Wanted(spec)
    versions = runtime_versions() if strict_versions else None
    older = None
    for path in _manifests(exports_dir(spec.cache_dir)):
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            manifest = ExportManifest.from_dict(raw)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        if not wanted.matches(manifest.identity):
            continue
        if raw.get("format") != FORMAT:
            older = older or path.parent
            continue
        if versions is not None and manifest.versions != versions:
            continue
        return (path.parent, manifest), older
    return None, older


def _device(spec: ModelSpec, has_torch: bool) -> str:
    if has_torch:
        from retrieval.models.device import resolve_device

        return resolve_device(spec.device)
    return "cpu" if spec.device in ("auto", "cpu") else spec.device


@dataclass(frozen=True)
class ExportedModel:
    """A model's export ready to run alone: what `retrieval.models.encoder` wraps."""

    backend: ExportBackend
    device: str
    runtimes: Runtimes


def load_exported(spec: ModelSpec) -> ExportedModel | None:
    """The model's export alone (`ExportBackend` + `OnnxRuntime`), or None where
    torch is installed and must act first: there is no sound export yet (it makes one), the
    export cannot run without torch, or it is corrupt and CLIPSEARCH_ONNX_FALLBACK=torch (it
    then runs torch, with a warning). Without torch each of these is an error."""
    from retrieval.models.exported.backend import ExportBackend, portable_section
    from retrieval.models.runtimes.base import Runtimes
    from retrieval.models.runtimes.choice import RUNTIME_SETTING, onnx_weights
    from retrieval.models.runtimes.onnx_runner import OnnxRuntime
    from retrieval.models.runtimes.packages import EXPORTED_PACKAGES, require_packages

    require_packages(EXPORTED_PACKAGES, RUNTIME_SETTING, f"{RUNTIME_SETTING}={spec.runtime.name}")
    has_torch = torch_installed()
    if has_torch and spec.precision in ("fp16", "auto") and spec.device != "cpu":
        from retrieval.models.device import resolve_device

        if resolve_device(spec.device).startswith("cuda"):
            return None  # fp16 on CUDA: the torch path makes and checks the fp16 graphs (`gpu`)
    if spec.precision in ("fp16", "bf16"):
        raise ConfigError(
            "CLIPSEARCH_PRECISION",
            f"{spec.precision} is a torch precision; CLIPSEARCH_RUNTIME=onnx runs fp32 weights "
            "(int8 with CLIPSEARCH_QUANTIZE=int8). Use auto or fp32.",
        )
    weights = onnx_weights(spec.runtime)
    found, older = _search(spec, strict_versions=has_torch)
    folder = exports_dir(spec.cache_dir)
    if found is None:
        if has_torch:
            return None
        which = (
            f"only an export made by an older clipsearch ({older}, without the tokenizer and "
            "preprocessing a torch-free install runs)"
            if older is not None
            else "no ONNX export"
        )
        raise WeightsUnavailable(
            f"Model {spec.name} ({spec.pretrained or 'none'}) has {which} in {folder}, "
            "and torch, which makes one, is not installed here. Where torch is installed "
            "(pip install 'clipsearch[torch,onnx]'), run `clipsearch export` with the same "
            f"model, then copy the folder it prints into {folder}."
        )
    folder, manifest = found
    from retrieval.models.runtimes.onnx_store import check_files

    problem = None
    if portable_section(manifest) is None:
        section = manifest.extra.get("portable")
        why = section.get("why") if isinstance(section, dict) else None
        problem = why or "it was made before exports carried their tokenizer and preprocessing"
    elif weights == "int8" and not manifest.graph_files("int8"):
        problem = "it has no int8 graphs (`clipsearch export --quantize int8` adds them)"
    if problem is not None:
        if has_torch:
            return None
        raise ConfigError(
            RUNTIME_SETTING,
            f"the ONNX export in {folder} cannot run without torch: {problem}; run "
            "`clipsearch export` where torch is installed (pip install 'clipsearch[torch,onnx]')",
        )
    device = _device(spec, has_torch)
    identity = replace(manifest.identity, source=ModelSource.of(spec))
    try:
        check_files(folder, manifest, manifest.graph_files(weights))
        backend = ExportBackend(folder, manifest, identity)
        runtime = OnnxRuntime.open(
            backend, folder, manifest, weights=weights, device=device, threads=spec.runtime.threads
        )
    except ExportUnusable:
        if has_torch and spec.runtime.fallback == "torch":
            return None  # the torch path says so and runs torch
        raise
    log.info("%s runs on %s, from %s", identity.describe(), runtime.describe(), folder)
    return ExportedModel(backend, device, Runtimes(runtime, runtime))

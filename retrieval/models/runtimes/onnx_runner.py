"""Running an export's towers with ONNX Runtime: the CPU provider, or on a CUDA device the CUDA
provider (`onnx`) or TensorRT (`tensorrt`; see `gpu`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import ExportUnusable
from retrieval.models.backend import ModelBackend, TokenBatch
from retrieval.models.runtimes.base import TowerRuntime
from retrieval.models.runtimes.onnx_store import REBUILD_ADVICE, ExportManifest

log = logging.getLogger(__name__)


def providers_for(device: str, setting: str = "CLIPSEARCH_RUNTIME") -> list[Any]:
    """ONNX Runtime's execution providers for a resolved device (`cpu`, `cuda`, `cuda:N`)."""
    if not device.startswith("cuda"):
        return ["CPUExecutionProvider"]
    from retrieval.models.runtimes.gpu import cuda_providers

    return cuda_providers(device, setting)


def open_session(path: Path, providers: Sequence[Any], threads: int, *, fp16: bool = False) -> Any:
    """An InferenceSession of one graph; ExportUnusable when ONNX Runtime cannot load it.
    `fp16`: a half-precision graph, optimised short of the CPU layout rewrites (with them,
    onnxruntime 1.32 crashes creating the session of an fp16 graph)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings are about graph rewrites
    if fp16:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    # Its worker threads would spin between runs, on the cores that torch (a tower `auto` left
    # there), the indexer's decoders or another process need: measured on 2 cores, a torch
    # query run after ONNX Runtime ones took 795 ms instead of 122.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for a bad file
        first = " ".join(str(exc).split())[:300]
        raise ExportUnusable(
            str(path.parent), f"ONNX Runtime cannot load {path.name} ({first})", REBUILD_ADVICE
        ) from None


def as_numpy(values: Any, dtype: type) -> np.ndarray:
    """A CPU numpy array of a numpy array or a torch tensor (ONNX Runtime's feed)."""
    if not isinstance(values, np.ndarray):
        values = values.detach().cpu().numpy()
    return np.ascontiguousarray(values, dtype=dtype)


class OnnxRuntime(TowerRuntime):
    """An export's towers in ONNX Runtime sessions (either may be absent: `auto` may keep one
    tower on torch). Texts are trimmed by the backend, exactly as torch trims them. Batches
    above `max_batch` (TensorRT's profile) run in parts."""

    def __init__(
        self,
        backend: ModelBackend,
        folder: Path,
        manifest: ExportManifest,
        sessions: dict[str, Any],
        weights: str = "fp32",
        *,
        kind: str = "onnx",
        max_batch: int = 0,
    ) -> None:
        self.backend = backend
        self.folder = folder
        self.manifest = manifest
        self.sessions = sessions
        self.weights = weights
        self.kind = kind  # onnx, tensorrt: as CLIPSEARCH_RUNTIME names it
        self.max_batch = max_batch
        self.name = kind if weights == "fp32" else f"{kind}-{weights}"

    @classmethod
    def open(
        cls,
        backend: ModelBackend,
        folder: Path,
        manifest: ExportManifest,
        *,
        weights: str,
        device: str,
        threads: int,
        towers: Sequence[str] = ("image", "text"),
        kind: str = "onnx",
        fp16: bool = False,
    ) -> OnnxRuntime:
        """`kind` onnx: the `weights` graphs on the CPU or CUDA provider, as `device` says;
        tensorrt: the fp32 graphs through TensorRT (fp16 kernels with `fp16`)."""
        if kind == "tensorrt":
            return cls._open_tensorrt(backend, folder, manifest, device, threads, towers, fp16)
        providers = providers_for(device)
        sessions = {
            tower: open_session(
                folder / manifest.towers[tower].graphs[weights].file,
                providers,
                threads,
                fp16=weights == "fp16",
            )
            for tower in towers
        }
        return cls(backend, folder, manifest, sessions, weights)

    @classmethod
    def _open_tensorrt(
        cls,
        backend: ModelBackend,
        folder: Path,
        manifest: ExportManifest,
        device: str,
        threads: int,
        towers: Sequence[str],
        fp16: bool,
    ) -> OnnxRuntime:
        from retrieval.models.runtimes.gpu import (
            MAX_BATCH,
            check_tensorrt_loaded,
            engine_cache,
            profile_shapes,
            tensorrt_providers,
        )

        cache = engine_cache(folder, device, fp16)
        if not any(cache.glob("*.engine")):
            log.warning(
                "building TensorRT engines for %s in %s; this takes minutes, once per model "
                "and GPU",
                backend.identity.describe(),
                cache,
            )
        sessions = {}
        for tower in towers:
            export = manifest.towers[tower]
            profile = profile_shapes(
                tower, export.inputs, backend.identity.image_size, manifest.context_length
            )
            graph = folder / export.graphs["fp32"].file
            providers = tensorrt_providers(device, fp16=fp16, cache=cache, profile=profile)
            sessions[tower] = open_session(graph, providers, threads)
            check_tensorrt_loaded(sessions[tower], graph)
        weights = "fp16" if fp16 else "fp32"
        return cls(
            backend, folder, manifest, sessions, weights, kind="tensorrt", max_batch=MAX_BATCH
        )

    def only(self, towers: Sequence[str]) -> OnnxRuntime:
        """The same runtime holding only these towers' sessions (the others are released)."""
        return OnnxRuntime(
            self.backend,
            self.folder,
            self.manifest,
            {name: self.sessions[name] for name in towers},
            self.weights,
            kind=self.kind,
            max_batch=self.max_batch,
        )

    def _parts(self, rows: int) -> list[slice]:
        step = self.max_batch or rows
        return [slice(start, start + step) for start in range(0, rows, step)]

    def _run(self, tower: str, feed: dict[str, np.ndarray]) -> np.ndarray:
        """The session's features for `feed`, in parts of at most `max_batch` rows."""
        session = self.sessions[tower]
        rows = len(next(iter(feed.values())))
        parts = [
            session.run(None, {name: value[part] for name, value in feed.items()})[0]
            for part in self._parts(rows)
        ]
        features: np.ndarray = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return features

    def encode_image(self, pixels: Any) -> np.ndarray:
        return self._run("image", {"pixels": as_numpy(pixels, np.float32)})

    def encode_text(self, tokens: TokenBatch, *, trim: bool) -> np.ndarray:
        if trim:
            tokens = self.backend.trimmed(tokens)
        feed = {"ids": as_numpy(tokens.ids, np.int64)}
        if "mask" in self.manifest.towers["text"].inputs:
            if tokens.mask is None:
                raise ValueError("this export's text tower needs an attention mask")
            feed["mask"] = as_numpy(tokens.mask, np.int64)
        return self._run("text", feed)

    def describe(self) -> str:
        session = next(iter(self.sessions.values()), None)
        provider = session.get_providers()[0] if session is not None else "no session"
        return f"{self.name} ({provider})"

"""Running an export's towers with ONNX Runtime: the CPU provider, or CUDA (TensorRT first where
the installed onnxruntime has it) for a CUDA device."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import ConfigError, ExportUnusable
from retrieval.models.backend import ModelBackend, TokenBatch
from retrieval.models.runtimes.base import TowerRuntime
from retrieval.models.runtimes.onnx_store import REBUILD_ADVICE, ExportManifest

log = logging.getLogger(__name__)

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def providers_for(device: str, setting: str = "CLIPSEARCH_RUNTIME") -> list[Any]:
    """ONNX Runtime's execution providers for a resolved device (`cpu`, `cuda`, `cuda:N`)."""
    import onnxruntime as ort

    if not device.startswith("cuda"):
        return ["CPUExecutionProvider"]
    available = set(ort.get_available_providers())
    gpu = [name for name in GPU_PROVIDERS if name in available]
    if not gpu:
        raise ConfigError(
            setting,
            f"the device is {device}, but the installed onnxruntime runs on the CPU only "
            "(install onnxruntime-gpu in its place), or use CLIPSEARCH_RUNTIME=torch",
        )
    options = {"device_id": int(device[5:]) if device.startswith("cuda:") else 0}
    return [(name, options) for name in gpu] + ["CPUExecutionProvider"]


def open_session(path: Path, providers: Sequence[Any], threads: int) -> Any:
    """An InferenceSession of one graph; ExportUnusable when ONNX Runtime cannot load it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings are about graph rewrites
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
    tower on torch). Texts are trimmed by the backend, exactly as torch trims them."""

    def __init__(
        self,
        backend: ModelBackend,
        folder: Path,
        manifest: ExportManifest,
        sessions: dict[str, Any],
        weights: str = "fp32",
    ) -> None:
        self.backend = backend
        self.folder = folder
        self.manifest = manifest
        self.sessions = sessions
        self.weights = weights
        self.name = "onnx" if weights == "fp32" else f"onnx-{weights}"

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
    ) -> OnnxRuntime:
        providers = providers_for(device)
        sessions = {
            tower: open_session(
                folder / manifest.towers[tower].graphs[weights].file, providers, threads
            )
            for tower in towers
        }
        return cls(backend, folder, manifest, sessions, weights)

    def only(self, towers: Sequence[str]) -> OnnxRuntime:
        """The same runtime holding only these towers' sessions (the others are released)."""
        return OnnxRuntime(
            self.backend,
            self.folder,
            self.manifest,
            {name: self.sessions[name] for name in towers},
            self.weights,
        )

    def encode_image(self, pixels: Any) -> np.ndarray:
        feed = {"pixels": as_numpy(pixels, np.float32)}
        features: np.ndarray = self.sessions["image"].run(None, feed)[0]
        return features

    def encode_text(self, tokens: TokenBatch, *, trim: bool) -> np.ndarray:
        if trim:
            tokens = self.backend.trimmed(tokens)
        feed = {"ids": as_numpy(tokens.ids, np.int64)}
        if "mask" in self.manifest.towers["text"].inputs:
            if tokens.mask is None:
                raise ValueError("this export's text tower needs an attention mask")
            feed["mask"] = as_numpy(tokens.mask, np.int64)
        features: np.ndarray = self.sessions["text"].run(None, feed)[0]
        return features

    def describe(self) -> str:
        session = next(iter(self.sessions.values()), None)
        provider = session.get_providers()[0] if session is not None else "no session"
        return f"{self.name} ({provider})"

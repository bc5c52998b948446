"""The encoder: any model family behind one seam, returning L2-normalised float32 embeddings."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from retrieval.errors import ConfigError
from retrieval.models.backend import ModelBackend, ScoreRule, TokenBatch, load_backend
from retrieval.models.device import resolve_device
from retrieval.models.identity import ModelIdentity, ModelSource, ModelSpec
from retrieval.models.recorded import spec_of
from retrieval.models.runtimes.base import Runtimes, TorchRuntime

if TYPE_CHECKING:
    import torch

    from retrieval.config import Settings

log = logging.getLogger(__name__)


def resolve_precision(precision: str, device: str) -> str:
    if precision == "auto":
        return "fp16" if device.startswith("cuda") else "fp32"
    if precision == "fp16" and device == "cpu":
        # Half-precision matmuls on CPU are slow or unsupported; refuse early and clearly.
        raise ConfigError("CLIPSEARCH_PRECISION", "fp16 needs a CUDA device; use fp32 on CPU")
    return precision


class Encoder:
    """Embeds images and texts with one loaded model of any family (see `ModelBackend`).

    Returns L2-normalised float32 rows. One encoder serves many threads (API workers): calls
    into the model hold a lock, since torch modules are not re-entrant-safe for every backend,
    and batching is done upstream anyway. Each tower is run by its runtime (torch unless
    told otherwise: see `retrieval.models.runtimes`). The backend may be an export's, which
    runs without torch (`retrieval.models.exported`): then batches are numpy arrays.
    """

    def __init__(
        self,
        backend: ModelBackend,
        device: str,
        dtype: torch.dtype | None,
        runtimes: Runtimes | None = None,
    ) -> None:
        self.backend = backend
        self.device = device
        self.dtype = dtype
        if runtimes is None:
            assert dtype is not None, "a torch backend runs in a torch dtype"
            torch_runtime = TorchRuntime(backend, device, dtype)
            runtimes = Runtimes(torch_runtime, torch_runtime)
        self.runtimes = runtimes
        self._lock = threading.Lock()

    @property
    def model(self) -> torch.nn.Module:
        return self.backend.model

    @property
    def preprocess(self) -> Callable[[Image.Image], Any]:
        return self.backend.preprocess

    @property
    def identity(self) -> ModelIdentity:
        return self.backend.identity

    @property
    def dim(self) -> int:
        return self.identity.dim

    @property
    def score_rule(self) -> ScoreRule:
        return self.backend.score_rule()

    @property
    def logit_scale(self) -> float:
        return self.score_rule.logit_scale

    def _normalised(self, features: Any) -> np.ndarray:
        if isinstance(features, np.ndarray):  # from ONNX Runtime
            rows = features.astype(np.float32, copy=False)
            norms = np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), np.float32(1e-12))
            return np.ascontiguousarray(rows / norms, dtype=np.float32)
        features = features.float()  # a torch tensor
        features = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return np.ascontiguousarray(features.cpu().numpy(), dtype=np.float32)

    def _no_grad(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype is None:  # an export: no torch here
            return contextlib.nullcontext()
        import torch

        return torch.inference_mode()

    def encode_image_tensors(self, batch: Any) -> np.ndarray:
        """Embed a preprocessed batch (N, 3, H, W): a torch tensor, or for an export's backend
        a float32 numpy array."""
        if batch.shape[0] == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._no_grad(), self._lock:
            features = self.runtimes.image.encode_image(batch)
        return self._normalised(features)

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.encode_image_tensors(self.backend.stack([self.preprocess(im) for im in images]))

    def tokenize(self, texts: Sequence[str]) -> TokenBatch:
        return self.backend.tokenize(texts)

    def encode_texts(self, texts: Sequence[str], *, trim: bool = True) -> np.ndarray:
        """Embed texts. With trim (default) the text tower runs only as far as its family can
        without changing the result (see `ModelBackend.encode_text`)."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        tokens = self.tokenize(texts)
        with self._no_grad(), self._lock:
            features = self.runtimes.text.encode_text(tokens, trim=trim)
        return self._normalised(features)

    def encode_texts_batched(
        self,
        texts: Sequence[str],
        batch_size: int = 256,
        on_batch: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Embed many texts (thousands of prompts) in batches; `on_batch(n)` after each."""
        parts = []
        for start in range(0, len(texts), batch_size):
            parts.append(self.encode_texts(texts[start : start + batch_size]))
            if on_batch is not None:
                on_batch(len(parts[-1]))
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)


def load_encoder(spec: ModelSpec) -> Encoder:
    """Load the model once, through its family, and its runtimes. Raises WeightsUnavailable
    with instructions when weights are missing, ConfigError when the family's package (or the
    runtime's) is not installed, DeviceUnavailable when the CUDA device named is not there,
    ExportUnusable when CLIPSEARCH_RUNTIME=onnx meets a corrupt export and may not fall back.

    CLIPSEARCH_RUNTIME=onnx runs the model's export alone, torch or no torch (`exported`):
    where torch is installed and there is no sound export yet, the model is loaded in torch
    once to make it, then dropped."""
    from retrieval.models.exported.loading import runs_from_export

    if runs_from_export(spec):
        exported = _from_export(spec)
        if exported is not None:
            return exported
        built = load_torch_encoder(spec)
        if all(
            runtime.name.startswith("onnx")
            for runtime in (built.runtimes.image, built.runtimes.text)
        ):
            return _from_export(spec) or built
        return built  # a corrupt export, torch running instead
    return load_torch_encoder(spec)


def _from_export(spec: ModelSpec) -> Encoder | None:
    """An encoder of the model's export alone, or None (see `load_exported`)."""
    from retrieval.models.exported.loading import load_exported

    found = load_exported(spec)
    return None if found is None else Encoder(found.backend, found.device, None, found.runtimes)


def load_torch_encoder(spec: ModelSpec) -> Encoder:
    """The model loaded in torch, each tower run by the runtime `spec.runtime` chooses."""
    from retrieval.models.runtimes.packages import torch_installed, torch_missing

    if not torch_installed():
        error = torch_missing("CLIPSEARCH_RUNTIME", f"CLIPSEARCH_RUNTIME={spec.runtime.name}")
        raise ConfigError(
            error.setting, f"{error.detail}, or set CLIPSEARCH_RUNTIME=onnx to run its ONNX export"
        )
    import torch

    from retrieval.models.runtimes.choice import choose_runtimes

    device = resolve_device(spec.device)
    precision = resolve_precision(spec.precision, device)
    backend = load_backend(spec, device, precision)
    # Recorded with the identity, so that reading commands can load the index's model again.
    backend.identity = replace(backend.identity, source=ModelSource.of(spec))
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    runtimes = choose_runtimes(spec, backend, device, precision, dtype)
    if spec.runtime.name != "torch":
        log.info("%s runs on %s", backend.identity.describe(), runtimes.describe())
    return Encoder(backend, device, dtype, runtimes)


def model_spec(settings: Settings) -> ModelSpec:
    """The model the settings name: architecture, weights, device, precision, configs, cache."""
    return spec_of(settings)


def encoder_from_settings(settings: Settings) -> Encoder:
    """The encoder the settings name (see `model_spec`).

    Applies CLIPSEARCH_TORCH_THREADS first: torch's thread pool is per process.
    """
    from retrieval.models.runtimes.packages import torch_installed

    if settings.torch_threads and torch_installed():
        import torch

        torch.set_num_threads(settings.torch_threads)
    return load_encoder(model_spec(settings))

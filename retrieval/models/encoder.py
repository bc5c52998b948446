"""The CLIP encoder: loads any open_clip model and returns L2-normalised float32 embeddings."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from retrieval.errors import WeightsUnavailable
from retrieval.models.identity import ModelIdentity, ModelSpec
from retrieval.models.weights import (
    register_model_configs,
    resolve_weights,
    sha256_file,
    weights_help,
)

if TYPE_CHECKING:
    from retrieval.config import Settings

log = logging.getLogger(__name__)

# open_clip's defaults, used when a model does not record its own normalisation.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise WeightsUnavailable(
            f"CLIPSEARCH_DEVICE={device} but no CUDA device is visible; use auto or cpu."
        )
    return device


def resolve_precision(precision: str, device: str) -> str:
    if precision == "auto":
        return "fp16" if device.startswith("cuda") else "fp32"
    if precision == "fp16" and device == "cpu":
        # Half-precision matmuls on CPU are slow or unsupported; refuse early and clearly.
        raise WeightsUnavailable("CLIPSEARCH_PRECISION=fp16 needs a CUDA device; use fp32 on CPU.")
    return precision


class Encoder:
    """Embeds images and texts with one loaded open_clip model."""

    def __init__(
        self,
        model: torch.nn.Module,
        preprocess: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[..., torch.Tensor],
        identity: ModelIdentity,
        device: str,
        dtype: torch.dtype,
    ) -> None:
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.identity = identity
        self.device = device
        self.dtype = dtype
        # One model, many threads (API workers): torch modules are not re-entrant-safe
        # for every backend, and batching is done upstream anyway.
        self._lock = threading.Lock()

    @property
    def dim(self) -> int:
        return self.identity.dim

    @property
    def logit_scale(self) -> float:
        scale = getattr(self.model, "logit_scale", None)
        return float(scale.exp().item()) if scale is not None else 100.0

    def _normalised(self, features: torch.Tensor) -> np.ndarray:
        features = features.float()
        features = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return np.ascontiguousarray(features.cpu().numpy(), dtype=np.float32)

    @torch.inference_mode()
    def encode_image_tensors(self, batch: torch.Tensor) -> np.ndarray:
        """Embed a preprocessed batch (N, 3, H, W)."""
        if batch.shape[0] == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            features = self.model.encode_image(batch.to(self.device, dtype=self.dtype))  # type: ignore[operator]
        return self._normalised(features)

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.encode_image_tensors(torch.stack([self.preprocess(im) for im in images]))

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def _can_trim_text(self) -> bool:
        import open_clip

        model = self.model
        return (
            isinstance(model, open_clip.CLIP)
            and getattr(model, "attn_mask", None) is not None
            and getattr(model, "text_pool_type", "argmax") in ("argmax", "eos")
            and isinstance(self.tokenizer, open_clip.tokenizer.SimpleTokenizer)
        )

    def _encode_tokens_trimmed(self, tokens: torch.Tensor) -> torch.Tensor:
        # The text tower's attention mask is causal and pooling reads the EOT position,
        # so padding after the longest real sequence never influences the result: running
        # only up to that length gives identical features for a fraction of the cost.
        from open_clip.transformer import text_global_pool

        model: Any = self.model
        length = max(1, int((tokens != 0).sum(dim=1).max().item()))
        tokens = tokens[:, :length]
        cast_dtype = model.transformer.get_cast_dtype()
        x = model.token_embedding(tokens).to(cast_dtype)
        x = x + model.positional_embedding[:length].to(cast_dtype)
        x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
        x = model.ln_final(x)
        x = text_global_pool(
            x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None)
        )
        if model.text_projection is not None:
            if isinstance(model.text_projection, torch.nn.Linear):
                x = model.text_projection(x)
            else:
                x = x @ model.text_projection
        return x

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], *, trim: bool = True) -> np.ndarray:
        """Embed texts. With trim (default) the text tower runs only to the longest token."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        tokens = self.tokenize(texts).to(self.device)
        with self._lock:
            if trim and self._can_trim_text():
                features = self._encode_tokens_trimmed(tokens)
            else:
                features = self.model.encode_text(tokens)  # type: ignore[operator]
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
    """Load the model once. Raises WeightsUnavailable with instructions when weights are missing."""
    import open_clip

    register_model_configs(spec.config_dir)
    if open_clip.get_model_config(spec.name) is None:
        known = ", ".join(open_clip.list_models()[:12])
        raise WeightsUnavailable(
            f"Unknown model '{spec.name}'. Known models include: {known}, ... "
            "(add your own JSON config with CLIPSEARCH_MODEL_CONFIG_DIR)."
        )
    device = resolve_device(spec.device)
    precision = resolve_precision(spec.precision, device)
    checkpoint, overrides = resolve_weights(spec)
    if checkpoint is None:
        log.warning(
            "Model %s has RANDOM weights (pretrained=%r): embeddings carry no meaning.",
            spec.name,
            spec.pretrained,
        )
        # Fixed seed so that random-init runs (benchmarks, demos) are reproducible.
        torch.manual_seed(0)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            spec.name,
            pretrained=checkpoint,
            precision=precision,
            device=device,
            cache_dir=str(spec.cache_dir) if spec.cache_dir else None,
            **overrides,
        )
    except (RuntimeError, KeyError, ValueError, OSError) as exc:
        raise WeightsUnavailable(
            weights_help(spec, f"open_clip could not load them ({str(exc)[:300]}).")
        ) from None
    model.eval()
    tokenizer = open_clip.get_tokenizer(spec.name)
    weights_sha = sha256_file(checkpoint) if checkpoint else "random-init-seed0"
    visual: Any = model.visual
    image_size = visual.image_size
    size = int(image_size[0] if isinstance(image_size, tuple | list) else image_size)
    mean = tuple(float(v) for v in getattr(visual, "image_mean", None) or OPENAI_MEAN)
    std = tuple(float(v) for v in getattr(visual, "image_std", None) or OPENAI_STD)
    with torch.inference_mode():
        probe = model.encode_text(tokenizer(["probe"]).to(device))
    identity = ModelIdentity(
        name=spec.name,
        pretrained=spec.pretrained,
        weights_sha256=weights_sha,
        dim=int(probe.shape[-1]),
        image_size=size,
        mean=mean,
        std=std,
    )
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    return Encoder(model, preprocess, tokenizer, identity, device, dtype)


def model_spec(settings: Settings) -> ModelSpec:
    """The model the settings name: architecture, weights, device, precision, configs, cache."""
    return ModelSpec(
        name=settings.model,
        pretrained=settings.pretrained,
        device=settings.device,
        precision=settings.precision,
        config_dir=settings.model_config_dir,
        cache_dir=settings.model_cache_dir,
    )


def encoder_from_settings(settings: Settings) -> Encoder:
    """The encoder the settings name (see `model_spec`).

    Applies CLIPSEARCH_TORCH_THREADS first: torch's thread pool is per process.
    """
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    return load_encoder(model_spec(settings))

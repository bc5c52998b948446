"""The CLIP encoder: loads any open_clip model and returns L2-normalised float32 embeddings."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image

from retrieval.errors import ModelMismatch, WeightsUnavailable

if TYPE_CHECKING:
    from retrieval.config import Settings

log = logging.getLogger(__name__)

# `pretrained` values that mean "no weights": only for timing benchmarks and the
# no-weights demo; results carry no meaning and the CLI says so.
RANDOM_INIT = frozenset({"", "none", "random"})
BUNDLED_CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered_dirs: set[str] = set()
# open_clip's defaults, used when a model does not record its own normalisation.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_register_lock = threading.Lock()


@dataclass(frozen=True)
class ModelSpec:
    """What to load: an open_clip architecture plus a pretrained tag or checkpoint path."""

    name: str
    pretrained: str
    device: str = "auto"
    precision: str = "auto"
    config_dir: Path | None = None
    cache_dir: Path | None = None


@dataclass(frozen=True)
class ModelIdentity:
    """Everything that decides which vector an image gets. Stored in shard.json and the DB."""

    name: str
    pretrained: str
    weights_sha256: str
    dim: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def key(self) -> str:
        # `pretrained` is left out on purpose: the same weights file moved to another
        # path, or fetched by tag, is the same model.
        material = json.dumps(
            [self.name, self.weights_sha256, self.dim, self.image_size, self.mean, self.std]
        )
        return hashlib.sha256(material.encode()).hexdigest()[:16]

    def describe(self) -> str:
        return (
            f"{self.name} / {self.pretrained} (weights {self.weights_sha256[:12]}, dim {self.dim})"
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mean"] = list(self.mean)
        data["std"] = list(self.std)
        data["key"] = self.key
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelIdentity:
        return cls(
            name=data["name"],
            pretrained=data["pretrained"],
            weights_sha256=data["weights_sha256"],
            dim=int(data["dim"]),
            image_size=int(data["image_size"]),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
        )

    def require_same(self, indexed: ModelIdentity | None) -> None:
        """Raise ModelMismatch unless `indexed` is None (empty index) or the same model."""
        if indexed is not None and indexed.key != self.key:
            raise ModelMismatch(self.describe(), indexed.describe())


def register_model_configs(extra_dir: Path | None = None) -> None:
    """Register the bundled configs and any user configs (open_clip JSON files) once."""
    import open_clip

    dirs = [BUNDLED_CONFIG_DIR] + ([extra_dir] if extra_dir else [])
    with _register_lock:
        for directory in dirs:
            key = str(Path(directory).resolve())
            if key in _registered_dirs:
                continue
            if not Path(directory).is_dir():
                raise WeightsUnavailable(f"Model config directory {directory} does not exist.")
            open_clip.add_model_config(directory)
            _registered_dirs.add(key)


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


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _host_resolves(url: str, timeout: float = 3.0) -> bool:
    """A quick DNS probe, so an offline machine fails in seconds, not after a minute of retries."""
    host = urlparse(url).hostname or ""
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.getaddrinfo(host, 443)
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _weights_help(spec: ModelSpec, reason: str) -> str:
    return (
        f"Cannot load weights '{spec.pretrained}' for model {spec.name}: {reason}\n"
        "Do one of these:\n"
        "  * set CLIPSEARCH_PRETRAINED (or --pretrained) to a local checkpoint file "
        "(.pt, .bin or .safetensors), or\n"
        "  * pre-populate the model cache on a machine with internet access, e.g.\n"
        f"      python -c \"import open_clip; open_clip.create_model('{spec.name}', "
        f"pretrained='{spec.pretrained}')\"\n"
        "    then copy the Hugging Face cache (~/.cache/huggingface, or HF_HOME) here and "
        "point HF_HOME or CLIPSEARCH_MODEL_CACHE_DIR at it."
    )


def _cached_tag_file(cfg: dict[str, Any], cache_dir: Path | None) -> str | None:
    """The local file for a pretrained tag if it is already cached; never touches the network."""
    from huggingface_hub import hf_hub_download
    from open_clip import pretrained as oc_pretrained

    if cfg.get("file"):
        return str(cfg["file"])
    hub = cfg.get("hf_hub", "")
    if hub:
        model_id, filename = os.path.split(hub)
        filename = filename or "open_clip_pytorch_model.bin"
        alternatives: Callable[[str], list[str]] = getattr(
            oc_pretrained, "_get_safe_alternatives", lambda name: []
        )
        for candidate in [*alternatives(filename), filename]:
            try:
                return str(
                    hf_hub_download(
                        model_id,
                        candidate,
                        cache_dir=str(cache_dir) if cache_dir else None,
                        local_files_only=True,
                    )
                )
            except Exception:  # noqa: BLE001 - any failure here just means "not cached"
                continue
    url = cfg.get("url", "")
    if url:
        root = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "clip"
        target = root / os.path.basename(urlparse(url).path)
        if target.is_file():
            return str(target)
    return None


def _resolve_weights(spec: ModelSpec) -> tuple[str | None, dict[str, Any]]:
    """Return (checkpoint path or None for random init, preprocess overrides from the tag)."""
    import open_clip

    if spec.pretrained.lower() in RANDOM_INIT:
        return None, {}
    if os.path.isfile(spec.pretrained):
        return spec.pretrained, {}
    cfg = open_clip.get_pretrained_cfg(spec.name, spec.pretrained)
    if not cfg:
        if os.sep in spec.pretrained or spec.pretrained.endswith((".pt", ".bin", ".safetensors")):
            raise WeightsUnavailable(_weights_help(spec, "that checkpoint file does not exist."))
        tags = open_clip.list_pretrained_tags_by_model(spec.name)
        raise WeightsUnavailable(
            _weights_help(
                spec,
                f"it is neither an existing file nor a known tag for {spec.name} "
                f"(known tags: {', '.join(tags) or 'none'}).",
            )
        )
    overrides = {
        "image_mean": cfg.get("mean"),
        "image_std": cfg.get("std"),
        "image_interpolation": cfg.get("interpolation"),
        "image_resize_mode": cfg.get("resize_mode"),
        "force_quick_gelu": bool(cfg.get("quick_gelu", False)),
    }
    overrides = {key: value for key, value in overrides.items() if value is not None}
    cached = _cached_tag_file(cfg, spec.cache_dir)
    if cached:
        return cached, overrides
    source = f"https://huggingface.co/{cfg['hf_hub']}" if cfg.get("hf_hub") else cfg.get("url", "")
    if not source or not _host_resolves(source):
        raise WeightsUnavailable(
            _weights_help(spec, "they are not in the local cache and the hub is unreachable.")
        )
    try:
        path = open_clip.download_pretrained(
            cfg, cache_dir=str(spec.cache_dir) if spec.cache_dir else None
        )
    except Exception as exc:  # noqa: BLE001 - hub errors are many; the user needs one message
        raise WeightsUnavailable(_weights_help(spec, f"download failed ({exc}).")) from None
    if not path:
        raise WeightsUnavailable(_weights_help(spec, "the tag has no download source."))
    return str(path), overrides


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
    checkpoint, overrides = _resolve_weights(spec)
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
            _weights_help(spec, f"open_clip could not load them ({str(exc)[:300]}).")
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


def encoder_from_settings(settings: Settings) -> Encoder:
    """The encoder the settings name (model, weights, device, precision, configs, cache).

    Applies CLIPSEARCH_TORCH_THREADS first: torch's thread pool is per process.
    """
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    return load_encoder(
        ModelSpec(
            name=settings.model,
            pretrained=settings.pretrained,
            device=settings.device,
            precision=settings.precision,
            config_dir=settings.model_config_dir,
            cache_dir=settings.model_cache_dir,
        )
    )

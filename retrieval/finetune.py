"""Contrastive fine-tuning of any open_clip model on captioned, class-folder or labelme data.

The checkpoint it writes is a plain open_clip state dict, so every command accepts it as
`pretrained=<path>`, and `open_clip.create_model(name, pretrained=path)` loads it too.

Two objectives:
- `clip`: open_clip's `ClipLoss`. Every other caption in the batch is a negative, which is
  right for unique captions and wrong for repeated ones: two pictures captioned "a red circle"
  are then pushed apart, and training plateaus (near 0.5 zero-shot accuracy on the shapes).
- `class-aware`: each image is scored against the batch's DISTINCT captions, and every caption
  of its group (same class, else same caption text) is a positive; each caption's positives are
  all the images of its group. With unique captions and no classes it equals `clip`.
`auto` picks class-aware whenever a group occurs more than once in the training set.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from retrieval.encoder import (
    RANDOM_INIT,
    ModelSpec,
    load_encoder,
    register_model_configs,
    resolve_device,
    sha256_file,
)
from retrieval.errors import ConfigError, ImageError, TrainingDataError, WeightsUnavailable
from retrieval.evaluate import ZeroShotAccuracy, zero_shot_accuracy
from retrieval.prompts import DEFAULT_PROMPT, class_text_embeddings
from retrieval.training_data import (
    DEFAULT_MAX_PIXELS,
    TrainingSample,
    TrainingSet,
    load_sample_image,
    load_training_set,
)

log = logging.getLogger(__name__)

LOSSES = ("auto", "clip", "class-aware")
FREEZE = ("none", "image", "text")
REPORT_SUFFIX = ".report.json"
# open_clip clamps the learned temperature at 100 (ln 100 = 4.6052) in its own training.
MAX_LOGIT_SCALE = math.log(100)


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything `finetune` needs. Steps are optimizer steps; `steps` wins over `epochs`."""

    data: Path
    out: Path
    model: str = "ViT-B-32"
    pretrained: str = "laion2b_s34b_b79k"  # a tag, a checkpoint path, or "none" (random init)
    data_format: str = "auto"
    templates: tuple[str, ...] = (DEFAULT_PROMPT,)  # class name -> caption; one drawn per use
    epochs: float = 1.0
    steps: int | None = None
    batch_size: int = 64  # the contrastive batch: negatives come from one micro-batch
    accum_steps: int = 1  # micro-batches per optimizer step
    lr: float = 1e-5  # peak; 1e-5 suits a pretrained model, about 1e-3 training from scratch
    warmup: float = 0.1  # fraction of the steps with a linear ramp; cosine decay to 0 after
    weight_decay: float = 0.1  # on matrices only, not on biases, norms, embeddings' scales
    loss: str = "auto"
    # class-aware only: weight of an image-to-image term (same class = positive), which
    # tightens each class's images for search by example; 0 = text-image terms only
    image_pairs: float = 0.0
    freeze: str = "none"  # none, image or text: that tower's weights stay as loaded
    val_fraction: float = 0.1
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # torch.autocast on CUDA (bf16 where supported, else fp16); no-op on CPU
    patch_dropout: float = 0.0  # drop this fraction of ViT patches while training (FLIP)
    max_pixels: int = DEFAULT_MAX_PIXELS
    # Pre-decode the set once into one tensor when it fits in this many bytes (float16);
    # decoding every step costs far more than the small models' forward pass.
    cache_bytes: int = 2 * 2**30
    workers: int = min(4, os.cpu_count() or 1)
    config_dir: Path | None = None
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        checks: list[tuple[str, bool, str]] = [
            ("loss", self.loss in LOSSES, f"must be one of {', '.join(LOSSES)}"),
            ("freeze", self.freeze in FREEZE, f"must be one of {', '.join(FREEZE)}"),
            ("batch_size", self.batch_size >= 2, "must be at least 2 (contrastive pairs)"),
            ("accum_steps", self.accum_steps >= 1, "must be at least 1"),
            ("epochs", self.epochs > 0, "must be positive"),
            ("steps", self.steps is None or self.steps >= 1, "must be at least 1"),
            ("lr", self.lr > 0, "must be positive"),
            ("warmup", 0 <= self.warmup < 1, "must be a fraction in [0, 1)"),
            ("weight_decay", self.weight_decay >= 0, "must not be negative"),
            ("image_pairs", self.image_pairs >= 0, "must not be negative"),
            ("val_fraction", 0 <= self.val_fraction < 1, "must be a fraction in [0, 1)"),
            ("patch_dropout", 0 <= self.patch_dropout < 1, "must be a fraction in [0, 1)"),
            ("templates", bool(self.templates), "must not be empty"),
        ]
        for name, ok, message in checks:
            if not ok:
                raise ConfigError(f"finetune {name}", f"{message} (got {getattr(self, name)!r})")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        plain = {key: str(v) if isinstance(v, Path) else v for key, v in data.items()}
        plain["templates"] = list(self.templates)
        return plain


@dataclass
class FinetuneResult:
    checkpoint: Path
    report_path: Path
    report: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Losses


def class_aware_loss(
    image_features: torch.Tensor,
    caption_features: torch.Tensor,
    image_groups: torch.Tensor,
    caption_groups: torch.Tensor,
    logit_scale: torch.Tensor,
    image_pairs: float = 0.0,
) -> torch.Tensor:
    """Symmetric contrastive loss over DISTINCT captions with group-level positives.

    image_features (B, D) and caption_features (U, D) are unit vectors; image_groups (B,) and
    caption_groups (U,) are group ids. Image i's target is spread evenly over the captions of
    its group; caption u's target over the images of its group. `image_pairs` > 0 adds that
    weight of `image_pair_loss`.
    """
    logits = logit_scale * image_features @ caption_features.T  # (B, U)
    positive = (image_groups[:, None] == caption_groups[None, :]).to(logits.dtype)
    image_targets = positive / positive.sum(dim=1, keepdim=True)
    caption_targets = positive.T / positive.T.sum(dim=1, keepdim=True)
    loss = (F.cross_entropy(logits, image_targets) + F.cross_entropy(logits.T, caption_targets)) / 2
    if image_pairs:
        loss = loss + image_pairs * image_pair_loss(image_features, image_groups, logit_scale)
    return loss


def image_pair_loss(
    image_features: torch.Tensor, image_groups: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Supervised-contrastive term between images: the same group's images are positives.

    Text-image terms alone leave each class's images in a loose cone around its caption, so
    two classes with close captions ("a green star", "a green triangle") can overlap in
    image-to-image search. Images without another of their group in the batch add nothing.
    """
    count = image_features.shape[0]
    logits = logit_scale * image_features @ image_features.T
    itself = torch.eye(count, dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(itself, float("-inf"))
    positive = (image_groups[:, None] == image_groups[None, :]) & ~itself
    rows = positive.any(dim=1)
    if not bool(rows.any()):
        return logits.new_zeros(())
    targets = positive[rows].to(logits.dtype)
    targets = targets / targets.sum(dim=1, keepdim=True)
    log_probs = F.log_softmax(logits[rows], dim=1).masked_fill(itself[rows], 0.0)
    return -(targets * log_probs).sum(dim=1).mean()


def clip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """open_clip's ClipLoss (single process): the i-th caption is the i-th image's only positive."""
    from open_clip.loss import ClipLoss

    return ClipLoss()(image_features, text_features, logit_scale)


# --------------------------------------------------------------------------------------------
# Data on the way to the model


def split_samples(
    samples: Sequence[TrainingSample], fraction: float, seed: int
) -> tuple[list[TrainingSample], list[TrainingSample]]:
    """(train, val) with round(fraction * n) validation samples, stratified by class.

    Each class gives its proportional share (the rounding remainders go to randomly chosen
    classes), and always keeps at least one training sample.
    """
    target = round(len(samples) * fraction)
    if target == 0 or len(samples) < 2:
        return list(samples), []
    rng = random.Random(seed)
    by_class: dict[str | None, list[int]] = {}
    for index, sample in enumerate(samples):
        by_class.setdefault(sample.label, []).append(index)
    groups = list(by_class.values())
    quotas = [math.floor(len(members) * fraction) for members in groups]
    spare = sorted(
        range(len(groups)),
        key=lambda g: (-(len(groups[g]) * fraction - quotas[g]), rng.random()),
    )
    for g in spare[: max(0, target - sum(quotas))]:
        quotas[g] += 1
    val: set[int] = set()
    for members, quota in zip(groups, quotas, strict=True):
        val.update(rng.sample(members, min(quota, len(members) - 1)))
    train = [s for i, s in enumerate(samples) if i not in val]
    return train, [s for i, s in enumerate(samples) if i in val]


class ImageSource:
    """Preprocessed pixels of samples, by index: pre-decoded in one tensor, or decoded on demand."""

    def __init__(
        self,
        samples: Sequence[TrainingSample],
        preprocess: Callable[[Any], torch.Tensor],
        *,
        max_pixels: int,
        cache_bytes: int,
        workers: int,
    ) -> None:
        self.samples = list(samples)
        self.preprocess = preprocess
        self.max_pixels = max_pixels
        self.workers = max(1, workers)
        self.warnings: list[str] = []
        self.cache: torch.Tensor | None = None
        # The first decodable sample tells the tensor size (map is lazy: it stops there).
        loaded = map(self._load, range(len(self.samples)))
        probe = next((t for t in loaded if isinstance(t, torch.Tensor)), None)
        per_sample = int(probe.numel()) * 2 if isinstance(probe, torch.Tensor) else 0
        self.usable = list(range(len(self.samples)))
        if per_sample and per_sample * len(self.samples) <= cache_bytes:
            self._fill_cache(probe.shape)  # type: ignore[union-attr]

    def _load(self, index: int) -> torch.Tensor | ImageError:
        try:
            image = load_sample_image(self.samples[index], max_pixels=self.max_pixels)
        except ImageError as exc:
            return exc
        return self.preprocess(image)

    def _fill_cache(self, shape: torch.Size) -> None:
        cache = torch.empty((len(self.samples), *shape), dtype=torch.float16)
        ok = []
        # Pillow and torchvision release the GIL for most of the work, so threads help.
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            for index, item in enumerate(pool.map(self._load, range(len(self.samples)))):
                if isinstance(item, ImageError):
                    self.warnings.append(f"{self.samples[index].image}: {item.reason}; skipped")
                    continue
                cache[index] = item
                ok.append(index)
        self.cache = cache
        self.usable = ok

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
        """Pixels (float32) of the given sample indices; undecodable ones are dropped."""
        if self.cache is not None:
            return self.cache[list(indices)].float(), list(indices)
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            loaded = list(pool.map(self._load, indices))
        kept = [i for i, t in zip(indices, loaded, strict=True) if isinstance(t, torch.Tensor)]
        for index, item in zip(indices, loaded, strict=True):
            if isinstance(item, ImageError):
                message = f"{self.samples[index].image}: {item.reason}; skipped"
                if message not in self.warnings:
                    self.warnings.append(message)
        tensors = [t for t in loaded if isinstance(t, torch.Tensor)]
        if not tensors:
            return torch.empty(0), []
        return torch.stack(tensors), kept


def _group_keys(samples: Sequence[TrainingSample]) -> list[str]:
    # A class groups its samples whatever the caption; without one, identical text does.
    return [f"class:{s.label}" if s.label is not None else f"text:{s.caption}" for s in samples]


def choose_loss(config_loss: str, samples: Sequence[TrainingSample]) -> str:
    if config_loss != "auto":
        return config_loss
    keys = _group_keys(samples)
    return "class-aware" if len(set(keys)) < len(keys) else "clip"


# --------------------------------------------------------------------------------------------
# Model


@dataclass
class _StartModel:
    model: torch.nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Callable[..., torch.Tensor]
    weights: str  # what it started from, for the report


def check_model(config: FinetuneConfig) -> None:
    """Refuse, before any work, a model that is unknown or whose checkpoint would load wrong."""
    import open_clip

    register_model_configs(config.config_dir)
    if open_clip.get_model_config(config.model) is None:
        raise WeightsUnavailable(
            f"Unknown model '{config.model}' (add your own JSON config with "
            "CLIPSEARCH_MODEL_CONFIG_DIR)."
        )
    tag_cfg = open_clip.get_pretrained_cfg(config.model, config.pretrained)
    if tag_cfg.get("quick_gelu") and "quickgelu" not in config.model.lower():
        # A checkpoint path carries no architecture flags: loaded later as `config.model`, it
        # would get GELU where these weights were trained with QuickGELU.
        raise ConfigError(
            "CLIPSEARCH_MODEL",
            f"weights '{config.pretrained}' need QuickGELU; fine-tune {config.model}-quickgelu "
            "instead, so the checkpoint loads with the same activation everywhere",
        )


def _load_start_model(config: FinetuneConfig, device: str) -> _StartModel:
    import open_clip

    extra = {"force_patch_dropout": config.patch_dropout} if config.patch_dropout else {}
    if config.pretrained.lower() in RANDOM_INIT:
        torch.manual_seed(config.seed)
        model, _, preprocess = open_clip.create_model_and_transforms(
            config.model, pretrained=None, device=device, **extra
        )
        return _StartModel(model, preprocess, open_clip.get_tokenizer(config.model), "random")
    encoder = load_encoder(
        ModelSpec(
            config.model,
            config.pretrained,
            device=device,
            precision="fp32",
            config_dir=config.config_dir,
            cache_dir=config.cache_dir,
        )
    )
    model = encoder.model
    if config.patch_dropout:
        from open_clip.transformer import PatchDropout

        visual: Any = getattr(model, "visual", None)
        if visual is None or not hasattr(visual, "patch_dropout"):
            raise ConfigError("finetune patch_dropout", f"{config.model} has no ViT patches")
        visual.patch_dropout = PatchDropout(config.patch_dropout)
    return _StartModel(
        model, encoder.preprocess, encoder.tokenizer, encoder.identity.weights_sha256
    )


def _tower_parameters(model: torch.nn.Module) -> dict[str, list[torch.nn.Parameter]]:
    towers: dict[str, list[torch.nn.Parameter]] = {"image": [], "text": [], "shared": []}
    for name, param in model.named_parameters():
        if name.startswith("visual."):
            towers["image"].append(param)
        elif name in ("logit_scale", "logit_bias"):
            towers["shared"].append(param)
        else:
            towers["text"].append(param)
    return towers


def _optimizer(
    model: torch.nn.Module, config: FinetuneConfig
) -> tuple[torch.optim.Optimizer, list[torch.nn.Parameter]]:
    towers = _tower_parameters(model)
    if config.freeze != "none":
        for param in towers[config.freeze]:
            param.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # As open_clip's training does: no decay on gains, biases and the temperature (1-D), which
    # decay would only pull towards zero.
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    return optimizer, trainable


def lr_at(step: int, total: int, warmup_steps: int) -> float:
    """Multiplier of the peak LR: linear warmup, then cosine decay to zero (one cycle)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# --------------------------------------------------------------------------------------------
# Training


class _Trainer:
    """One fine-tuning run's state; `finetune` below is the public entry point."""

    def __init__(self, config: FinetuneConfig, start: _StartModel, device: str) -> None:
        self.config = config
        self.model = start.model
        self.tokenizer = start.tokenizer
        self.device = device
        self._tokens: dict[str, torch.Tensor] = {}
        self.amp_dtype: torch.dtype | None = None
        if config.amp and device.startswith("cuda"):
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype)

    def tokens(self, captions: Sequence[str]) -> torch.Tensor:
        missing = [c for c in captions if c not in self._tokens]
        if missing:
            for caption, row in zip(missing, self.tokenizer(missing), strict=True):
                self._tokens[caption] = row
        return torch.stack([self._tokens[c] for c in captions]).to(self.device)

    def encode(
        self, pixels: torch.Tensor, captions: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        model: Any = self.model
        freeze = self.config.freeze
        with torch.no_grad() if freeze == "image" else contextlib.nullcontext():
            image = model.encode_image(pixels.to(self.device, non_blocking=True), normalize=True)
        with torch.no_grad() if freeze == "text" else contextlib.nullcontext():
            text = model.encode_text(self.tokens(captions), normalize=True)
        return image, text

    def batch_loss(
        self, pixels: torch.Tensor, captions: Sequence[str], groups: Sequence[str], loss: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss of one batch, and its unit image embeddings (validation reuses them)."""
        # Only distinct captions go through the text tower; with 24 classes in a batch of 96
        # that is a quarter of the text work, and `clip` gets identical rows either way.
        distinct = list(dict.fromkeys(captions))
        position = {caption: n for n, caption in enumerate(distinct)}
        with self.autocast():
            image, text = self.encode(pixels, distinct)
            scale = self.model.logit_scale.exp()  # type: ignore[operator]
            if loss == "clip":
                rows = torch.tensor([position[c] for c in captions], device=self.device)
                return clip_loss(image.float(), text.float()[rows], scale), image
            group_id = {g: n for n, g in enumerate(dict.fromkeys(groups))}
            caption_group = {c: group_id[g] for c, g in zip(captions, groups, strict=True)}
            image_groups = torch.tensor([group_id[g] for g in groups], device=self.device)
            caption_groups = torch.tensor([caption_group[c] for c in distinct], device=self.device)
            value = class_aware_loss(
                image.float(),
                text.float(),
                image_groups,
                caption_groups,
                scale,
                self.config.image_pairs,
            )
            return value, image

    def train_mode(self) -> None:
        self.model.train()
        model: Any = self.model
        # A frozen tower also keeps its dropout and norm statistics as loaded.
        if self.config.freeze == "image":
            model.visual.eval()
        elif self.config.freeze == "text":
            for name, module in model.named_children():
                if name != "visual":
                    module.eval()


def _micro_batches(count: int, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Endless shuffled batches of positions 0..count-1; each epoch drops its short remainder."""
    size = min(batch_size, count)
    while True:
        order = torch.randperm(count, generator=generator).tolist()
        for start in range(0, count - size + 1, size):
            yield order[start : start + size]


def _validate(
    trainer: _Trainer,
    source: ImageSource,
    samples: Sequence[TrainingSample],
    loss: str,
    classes: list[str],
) -> tuple[float | None, ZeroShotAccuracy | None]:
    """Mean loss over the validation split (canonical captions) and zero-shot accuracy."""
    if not source.usable:
        return None, None
    model: Any = trainer.model
    model.eval()
    losses, weights, features = [], [], []
    positions = source.usable
    embedded: list[int] = []
    with torch.no_grad():
        for start in range(0, len(positions), trainer.config.batch_size):
            chunk = positions[start : start + trainer.config.batch_size]
            pixels, kept = source.batch(chunk)
            if not kept:
                continue
            embedded += kept
            if len(kept) >= 2:
                captions = [samples[i].caption for i in kept]
                groups = _group_keys([samples[i] for i in kept])
                value, image = trainer.batch_loss(pixels, captions, groups, loss)
                losses.append(float(value))
                weights.append(len(kept))
            else:  # one image: no contrastive loss, but it still counts for zero-shot
                with trainer.autocast():
                    image = model.encode_image(pixels.to(trainer.device), normalize=True)
            features.append(image.float().cpu().numpy())
    val_loss = float(np.average(losses, weights=weights)) if losses else None
    labelled = all(s.label is not None for s in samples)
    if not (labelled and classes and features):
        return val_loss, None

    def encode_texts(texts: list[str]) -> np.ndarray:
        with torch.no_grad(), trainer.autocast():
            out = model.encode_text(trainer.tokens(texts), normalize=True)
        return np.asarray(out.float().cpu().numpy(), dtype=np.float32)

    index = {name: n for n, name in enumerate(classes)}
    labels = np.array([index[samples[i].label or ""] for i in embedded], dtype=np.int64)
    class_vectors = class_text_embeddings(encode_texts, classes, trainer.config.templates)
    return val_loss, zero_shot_accuracy(np.concatenate(features), labels, class_vectors)


def _save_checkpoint(model: torch.nn.Module, path: Path, meta: dict[str, Any]) -> str:
    """Write atomically (temp file, fsync, rename): a killed run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        key: value.detach().to("cpu", torch.float32) for key, value in model.state_dict().items()
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        # Only tensors and plain values: open_clip loads with torch.load(weights_only=True).
        torch.save({"state_dict": state, "clipsearch": meta}, tmp)
        with open(tmp, "rb") as stream:
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return sha256_file(path)


def report_path_for(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.stem + REPORT_SUFFIX)


def finetune(
    config: FinetuneConfig,
    *,
    progress: bool | None = None,
    dataset: TrainingSet | None = None,
) -> FinetuneResult:
    """Train, validate, and write the checkpoint plus `<name>.report.json` beside it.

    `progress`: a tqdm bar with the running loss (None: only on a terminal). `dataset` skips
    reading `config.data` (for callers that already loaded it).
    """
    started = time.monotonic()
    random.seed(config.seed)
    np.random.seed(config.seed % 2**32)
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    check_model(config)
    data = dataset or load_training_set(
        config.data,
        fmt=config.data_format,
        templates=config.templates,
        max_pixels=config.max_pixels,
    )
    warnings = list(data.warnings)
    train_samples, val_samples = split_samples(data.samples, config.val_fraction, config.seed)
    if len(train_samples) < 2:
        raise TrainingDataError(str(config.data), "fewer than two training samples")
    loss_name = choose_loss(config.loss, train_samples)

    start = _load_start_model(config, device)
    sources = {
        name: ImageSource(
            samples,
            start.preprocess,
            max_pixels=config.max_pixels,
            cache_bytes=config.cache_bytes,
            workers=config.workers,
        )
        for name, samples in (("train", train_samples), ("val", val_samples))
    }
    train_source = sources["train"]
    if len(train_source.usable) < 2:
        raise TrainingDataError(str(config.data), "fewer than two decodable training images")
    prepare_seconds = time.monotonic() - started  # data, model and pre-decoding

    per_step = config.batch_size * config.accum_steps
    total_steps = config.steps or max(
        1, math.ceil(config.epochs * len(train_source.usable) / per_step)
    )
    warmup_steps = max(1, round(config.warmup * total_steps)) if config.warmup else 0
    trainer = _Trainer(config, start, device)
    optimizer, trainable = _optimizer(start.model, config)
    if not trainable:
        raise ConfigError("finetune freeze", "nothing left to train")
    generator = torch.Generator().manual_seed(config.seed)
    caption_rng = random.Random(config.seed)
    batches = _micro_batches(len(train_source.usable), config.batch_size, generator)
    model: Any = start.model
    trainer.train_mode()
    recent: list[float] = []
    window = max(1, min(20, total_steps // 5))  # steps averaged into the reported final loss
    first_loss = float("nan")
    bar = tqdm(
        total=total_steps,
        desc=f"finetune {config.model}",
        unit="step",
        disable=None if progress is None else not progress,
        dynamic_ncols=True,
    )
    train_started = time.monotonic()
    with bar:
        for step in range(total_steps):
            for group in optimizer.param_groups:
                group["lr"] = config.lr * lr_at(step, total_steps, warmup_steps)
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for _ in range(config.accum_steps):
                positions = [train_source.usable[p] for p in next(batches)]
                pixels, kept = train_source.batch(positions)
                if len(kept) < 2:
                    continue
                chosen = [train_samples[i] for i in kept]
                captions = [caption_rng.choice(s.captions) for s in chosen]
                loss, _ = trainer.batch_loss(pixels, captions, _group_keys(chosen), loss_name)
                trainer.scaler.scale(loss / config.accum_steps).backward()
                step_loss += float(loss.detach()) / config.accum_steps
            trainer.scaler.step(optimizer)
            trainer.scaler.update()
            with torch.no_grad():
                model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            if step == 0:
                first_loss = step_loss
            recent = (recent + [step_loss])[-window:]
            bar.set_postfix(
                loss=f"{np.mean(recent):.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}"
            )
            bar.update()
    train_seconds = time.monotonic() - train_started

    val_loss, zero_shot = _validate(
        trainer, sources["val"], val_samples, loss_name, data.classes if data.has_classes else []
    )
    warnings += train_source.warnings + sources["val"].warnings
    model.eval()
    meta = {"model": config.model, "started_from": config.pretrained, "steps": total_steps}
    checkpoint_sha = _save_checkpoint(model, config.out, meta)
    report = {
        "checkpoint": str(config.out),
        "checkpoint_sha256": checkpoint_sha,
        "model": config.model,
        "started_from": config.pretrained,
        "start_weights": start.weights,
        "args": config.to_dict(),
        "data": {
            "format": data.format,
            "samples": len(data.samples),
            "train": len(train_source.usable),
            "val": len(sources["val"].usable),
            "classes": len(data.classes),
            "warnings": len(warnings),
        },
        "loss": loss_name,
        "device": device,
        "amp": str(trainer.amp_dtype).replace("torch.", "") if trainer.amp_dtype else None,
        "pre_decoded": train_source.cache is not None,
        "steps": total_steps,
        "epochs": round(total_steps * per_step / len(train_source.usable), 3),
        "first_train_loss": round(first_loss, 5),
        "final_train_loss": round(float(np.mean(recent)), 5) if recent else None,
        "val_loss": round(val_loss, 5) if val_loss is not None else None,
        "val_zero_shot": zero_shot.to_dict() if zero_shot else None,
        "logit_scale": round(float(model.logit_scale.detach().exp()), 3),
        "seconds": round(time.monotonic() - started, 2),
        "prepare_seconds": round(prepare_seconds, 2),
        "train_seconds": round(train_seconds, 2),
        "warnings": warnings[:100],
    }
    report_path = report_path_for(config.out)
    report_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return FinetuneResult(config.out, report_path, report, warnings)

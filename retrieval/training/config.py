"""What a fine-tuning run is asked to do (`FinetuneConfig`) and what it reports having done."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from retrieval.errors import ConfigError
from retrieval.models.identity import ModelSpec
from retrieval.models.prompts import DEFAULT_PROMPT
from retrieval.training.data import DEFAULT_MAX_PIXELS
from retrieval.training.evaluate import ZeroShotAccuracy
from retrieval.training.losses import LOSSES

FREEZE = ("none", "image", "text")
REPORT_SUFFIX = ".report.json"


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything `finetune` needs. Steps are optimizer steps; `steps` wins over `epochs`."""

    data: Path
    out: Path
    # The starting model: its pretrained is a tag, a checkpoint path, or "none" (random init).
    # Training always runs in fp32 (with autocast on CUDA), whatever its precision says.
    model: ModelSpec = ModelSpec("ViT-B-32", "laion2b_s34b_b79k")
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
    # class-aware and sigmoid: weight of an image-to-image term (same class = positive), which
    # tightens each class's images for search by example; 0 = text-image terms only
    image_pairs: float = 0.0
    freeze: str = "none"  # none, image or text: that tower's weights stay as loaded
    val_fraction: float = 0.1
    seed: int = 0
    amp: bool = True  # torch.autocast on CUDA (bf16 where supported, else fp16); no-op on CPU
    patch_dropout: float = 0.0  # drop this fraction of ViT patches while training (FLIP)
    max_pixels: int = DEFAULT_MAX_PIXELS
    # Pre-decode the set once into one tensor when it fits in this many bytes (float16);
    # decoding every step costs far more than the small models' forward pass.
    cache_bytes: int = 2 * 2**30
    workers: int = min(4, os.cpu_count() or 1)

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
        """Flat, JSON-ready arguments (the report's "args"): the model spec's fields inline."""
        spec = self.model
        data = {key: value for key, value in asdict(self).items() if key != "model"}
        data.update(
            model=spec.name,
            pretrained=spec.pretrained,
            device=spec.device,
            config_dir=spec.config_dir,
            cache_dir=spec.cache_dir,
        )
        plain = {key: str(v) if isinstance(v, Path) else v for key, v in data.items()}
        plain["templates"] = list(self.templates)
        return plain


@dataclass(frozen=True)
class DataSummary:
    """What the training set held, and how it was split."""

    format: str
    samples: int
    train: int  # decodable training samples
    val: int  # decodable validation samples
    classes: int
    warnings: int


@dataclass(frozen=True)
class FinetuneReport:
    """What a run did; written beside the checkpoint as <name>.report.json."""

    checkpoint: str
    checkpoint_sha256: str
    model: str
    started_from: str
    start_weights: str  # the sha256 of the starting weights, or "random"
    args: dict[str, Any]
    data: DataSummary
    loss: str
    device: str
    amp: str | None
    pre_decoded: bool
    steps: int
    epochs: float
    first_train_loss: float
    final_train_loss: float | None
    val_loss: float | None
    val_zero_shot: ZeroShotAccuracy | None
    logit_scale: float
    seconds: float
    prepare_seconds: float
    train_seconds: float
    warnings: list[str]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["val_zero_shot"] = self.val_zero_shot.to_dict() if self.val_zero_shot else None
        return data


@dataclass
class FinetuneResult:
    checkpoint: Path
    report_path: Path
    report: FinetuneReport
    warnings: list[str] = field(default_factory=list)


def report_path_for(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.stem + REPORT_SUFFIX)

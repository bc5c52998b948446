"""Contrastive fine-tuning of any open_clip model on captioned, class-folder or labelme data.

The checkpoint it writes is a plain open_clip state dict, so every command accepts it as
`pretrained=<path>`, and `open_clip.create_model(name, pretrained=path)` loads it too. The
objectives are in `retrieval.training.losses`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from retrieval.errors import ConfigError, TrainingDataError, WeightsUnavailable
from retrieval.models.backend import ModelBackend, TokenBatch
from retrieval.models.encoder import load_encoder, resolve_device
from retrieval.models.identity import OPEN_CLIP, RuntimeSpec
from retrieval.models.prompts import class_text_embeddings
from retrieval.models.weights import register_model_configs, sha256_file
from retrieval.training.batches import ImageSource, micro_batches, split_samples
from retrieval.training.config import (
    DataSummary,
    FinetuneConfig,
    FinetuneReport,
    FinetuneResult,
    report_path_for,
)
from retrieval.training.data import (
    TrainingSample,
    TrainingSet,
    load_training_set,
)
from retrieval.training.evaluate import ZeroShotAccuracy, zero_shot_accuracy
from retrieval.training.losses import (
    SOFTMAX_LOSSES,
    choose_loss,
    class_aware_loss,
    clip_loss,
    group_keys,
    image_pair_loss,
    sigmoid_loss,
)

log = logging.getLogger(__name__)

# open_clip clamps the learned temperature at 100 (ln 100 = 4.6052) in its own training.
MAX_LOGIT_SCALE = math.log(100)

# --------------------------------------------------------------------------------------------
# Model


@dataclass
class _StartModel:
    backend: ModelBackend
    weights: str  # what it started from, for the report

    @property
    def model(self) -> torch.nn.Module:
        return self.backend.model

    @property
    def preprocess(self) -> Callable[[Any], torch.Tensor]:
        return self.backend.preprocess


def check_model(config: FinetuneConfig) -> None:
    """Refuse, before any work, a model whose checkpoint would load wrong (open_clip)."""
    spec = config.model
    if spec.family != OPEN_CLIP:
        return  # loading it is the check (`_load_start_model`)
    import open_clip

    register_model_configs(spec.config_dir)
    name = spec.family_name
    if open_clip.get_model_config(name) is None:
        raise WeightsUnavailable(
            f"Unknown model '{name}' (add your own JSON config with CLIPSEARCH_MODEL_CONFIG_DIR)."
        )
    tag_cfg = open_clip.get_pretrained_cfg(name, spec.pretrained)
    if tag_cfg.get("quick_gelu") and "quickgelu" not in name.lower():
        # A checkpoint path carries no architecture flags: loaded later as `name`, it
        # would get GELU where these weights were trained with QuickGELU.
        raise ConfigError(
            "CLIPSEARCH_MODEL",
            f"weights '{spec.pretrained}' need QuickGELU; fine-tune {name}-quickgelu "
            "instead, so the checkpoint loads with the same activation everywhere",
        )


def _check_loss(loss: str, backend: ModelBackend, name: str) -> None:
    """A sigmoid model trains with the sigmoid loss only, and a softmax model never with it."""
    sigmoid = backend.score_rule().is_sigmoid
    if sigmoid and loss in SOFTMAX_LOSSES:
        raise ConfigError(
            "finetune loss",
            f"{name} scores with a sigmoid and a bias (SigLIP); the softmax loss {loss} would "
            "unlearn its calibration. Use --loss sigmoid (what auto picks).",
        )
    if loss == "sigmoid" and (not sigmoid or backend.logit_bias_parameter() is None):
        raise ConfigError(
            "finetune loss",
            f"{name} scores with a softmax and has no logit bias to train; use clip, "
            "class-aware or auto.",
        )


def _load_start_model(config: FinetuneConfig, device: str) -> _StartModel:
    # Trained in torch whatever runtime serves the model (CLIPSEARCH_RUNTIME).
    spec = replace(
        config.model, device=device, precision="fp32", seed=config.seed, runtime=RuntimeSpec()
    )
    encoder = load_encoder(spec)
    backend = encoder.backend
    if config.patch_dropout:
        from open_clip.transformer import PatchDropout

        visual: Any = getattr(backend.model, "visual", None)
        if spec.family != OPEN_CLIP or not hasattr(visual, "patch_dropout"):
            raise ConfigError("finetune patch_dropout", f"{spec.name} has no ViT patches")
        visual.patch_dropout = PatchDropout(config.patch_dropout)
    # Each family decides what its `pretrained` means (hf: "" is the folder's own weights);
    # random weights are recorded as such in the identity.
    random = encoder.identity.random_weights
    return _StartModel(backend, "random" if random else encoder.identity.weights_sha256)


def _tower_parameters(start: _StartModel) -> dict[str, list[torch.nn.Parameter]]:
    towers: dict[str, list[torch.nn.Parameter]] = {"image": [], "text": [], "shared": []}
    for name, param in start.model.named_parameters():
        towers[start.backend.tower(name)].append(param)
    return towers


def _optimizer(
    start: _StartModel, config: FinetuneConfig
) -> tuple[torch.optim.Optimizer, list[torch.nn.Parameter]]:
    model = start.model
    towers = _tower_parameters(start)
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
        self.backend = start.backend
        self.model = start.model
        self.device = device
        self._tokens: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.amp_dtype: torch.dtype | None = None
        if config.amp and device.startswith("cuda"):
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype)

    def tokens(self, captions: Sequence[str]) -> TokenBatch:
        """Tokens of the captions, each caption tokenized once per run."""
        missing = [c for c in captions if c not in self._tokens]
        if missing:
            batch = self.backend.tokenize(missing)
            for n, caption in enumerate(missing):
                mask = batch.mask[n] if batch.mask is not None else None
                self._tokens[caption] = (batch.ids[n], mask)
        rows = [self._tokens[c] for c in captions]
        masks = [mask for _, mask in rows]
        stacked = TokenBatch(
            torch.stack([ids for ids, _ in rows]),
            None if masks[0] is None else torch.stack([m for m in masks if m is not None]),
        )
        return stacked.to(self.device)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        features = self.backend.encode_image(pixels.to(self.device, non_blocking=True))
        return F.normalize(features, dim=-1)

    def encode_texts(self, captions: Sequence[str]) -> torch.Tensor:
        # Trimmed where the family can trim exactly: the same features for less work.
        features = self.backend.encode_text(self.tokens(captions), trim=True)
        return F.normalize(features, dim=-1)

    def encode(
        self, pixels: torch.Tensor, captions: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        freeze = self.config.freeze
        with torch.no_grad() if freeze == "image" else contextlib.nullcontext():
            image = self.encode_images(pixels)
        with torch.no_grad() if freeze == "text" else contextlib.nullcontext():
            text = self.encode_texts(captions)
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
            scale = self.backend.logit_scale_parameter().exp()
            if loss == "sigmoid":
                return self._sigmoid_loss(image, text, captions, groups, scale), image
            if loss == "clip":
                rows = torch.tensor([position[c] for c in captions], device=self.device)
                return clip_loss(image.float(), text.float()[rows], scale), image
            image_groups, caption_groups = self._group_ids(captions, groups)
            value = class_aware_loss(
                image.float(),
                text.float(),
                image_groups,
                caption_groups,
                scale,
                self.config.image_pairs,
            )
            return value, image

    def _sigmoid_loss(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        captions: Sequence[str],
        groups: Sequence[str],
        scale: torch.Tensor,
    ) -> torch.Tensor:
        image_groups, caption_groups = self._group_ids(captions, groups)
        bias = self.backend.logit_bias_parameter()
        assert bias is not None  # _check_loss refused the model otherwise
        loss = sigmoid_loss(image.float(), text.float(), image_groups, caption_groups, scale, bias)
        if self.config.image_pairs:
            loss = loss + self.config.image_pairs * image_pair_loss(
                image.float(), image_groups, scale
            )
        return loss

    def _group_ids(
        self, captions: Sequence[str], groups: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Group ids of the batch's images and of its distinct captions, in first-seen order."""
        group_id = {g: n for n, g in enumerate(dict.fromkeys(groups))}
        caption_group = {c: group_id[g] for c, g in zip(captions, groups, strict=True)}
        distinct = dict.fromkeys(captions)
        image_groups = torch.tensor([group_id[g] for g in groups], device=self.device)
        caption_groups = torch.tensor([caption_group[c] for c in distinct], device=self.device)
        return image_groups, caption_groups

    def train_mode(self) -> None:
        self.model.train()
        # A frozen tower also keeps its dropout and norm statistics as loaded.
        frozen = self.config.freeze
        if frozen != "none":
            for name, module in self.model.named_children():
                if self.backend.tower(f"{name}.weight") == frozen:
                    module.eval()


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
                groups = group_keys([samples[i] for i in kept])
                value, image = trainer.batch_loss(pixels, captions, groups, loss)
                losses.append(float(value))
                weights.append(len(kept))
            else:  # one image: no contrastive loss, but it still counts for zero-shot
                with trainer.autocast():
                    image = trainer.encode_images(pixels)
            features.append(image.float().cpu().numpy())
    val_loss = float(np.average(losses, weights=weights)) if losses else None
    labelled = all(s.label is not None for s in samples)
    if not (labelled and classes and features):
        return val_loss, None

    def encode_texts(texts: list[str]) -> np.ndarray:
        with torch.no_grad(), trainer.autocast():
            out = trainer.encode_texts(texts)
        return np.asarray(out.float().cpu().numpy(), dtype=np.float32)

    index = {name: n for n, name in enumerate(classes)}
    labels = np.array([index[samples[i].label or ""] for i in embedded], dtype=np.int64)
    class_vectors = class_text_embeddings(encode_texts, classes, trainer.config.templates)
    return val_loss, zero_shot_accuracy(np.concatenate(features), labels, class_vectors)


def _save_checkpoint(backend: ModelBackend, path: Path, meta: dict[str, Any]) -> str:
    """Write atomically (temp file, fsync, rename): a killed run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        key: value.detach().to("cpu", torch.float32)
        for key, value in backend.checkpoint_state().items()
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


@dataclass
class _Run:
    """A prepared run: the data split, the starting model and the pixels of both splits."""

    data: TrainingSet
    train_samples: list[TrainingSample]
    val_samples: list[TrainingSample]
    loss: str
    start: _StartModel
    train: ImageSource
    val: ImageSource
    device: str
    prepare_seconds: float


@dataclass
class _Progress:
    """The training loop's outcome: steps taken, and the losses the report gives."""

    total_steps: int
    per_step: int
    first_loss: float
    recent: list[float]
    seconds: float


def _prepare(config: FinetuneConfig, dataset: TrainingSet | None, started: float) -> _Run:
    """Seed everything, read and split the data, load the model, and pre-decode the pixels."""
    random.seed(config.seed)
    np.random.seed(config.seed % 2**32)
    torch.manual_seed(config.seed)
    device = resolve_device(config.model.device)
    check_model(config)
    data = dataset or load_training_set(
        config.data,
        fmt=config.data_format,
        templates=config.templates,
        max_pixels=config.max_pixels,
    )
    train_samples, val_samples = split_samples(data.samples, config.val_fraction, config.seed)
    if len(train_samples) < 2:
        raise TrainingDataError(str(config.data), "fewer than two training samples")
    start = _load_start_model(config, device)
    loss_name = choose_loss(config.loss, train_samples, start.backend.score_rule().is_sigmoid)
    _check_loss(loss_name, start.backend, config.model.name)
    train, val = (
        ImageSource(
            samples,
            start.preprocess,
            max_pixels=config.max_pixels,
            cache_bytes=config.cache_bytes,
            workers=config.workers,
        )
        for samples in (train_samples, val_samples)
    )
    if len(train.usable) < 2:
        raise TrainingDataError(str(config.data), "fewer than two decodable training images")
    # Data, model and pre-decoding.
    prepare_seconds = time.monotonic() - started
    return _Run(
        data, train_samples, val_samples, loss_name, start, train, val, device, prepare_seconds
    )


def _train(
    config: FinetuneConfig, run: _Run, trainer: _Trainer, progress: bool | None
) -> _Progress:
    """The optimizer steps, with a tqdm bar of the running loss."""
    per_step = config.batch_size * config.accum_steps
    total_steps = config.steps or max(
        1, math.ceil(config.epochs * len(run.train.usable) / per_step)
    )
    warmup_steps = max(1, round(config.warmup * total_steps)) if config.warmup else 0
    optimizer, trainable = _optimizer(run.start, config)
    if not trainable:
        raise ConfigError("finetune freeze", "nothing left to train")
    generator = torch.Generator().manual_seed(config.seed)
    caption_rng = random.Random(config.seed)
    batches = micro_batches(len(run.train.usable), config.batch_size, generator)
    scale_parameter = run.start.backend.logit_scale_parameter()
    trainer.train_mode()
    outcome = _Progress(total_steps, per_step, float("nan"), [], 0.0)
    window = max(1, min(20, total_steps // 5))  # steps averaged into the reported final loss
    bar = tqdm(
        total=total_steps,
        desc=f"finetune {config.model.name}",
        unit="step",
        disable=None if progress is None else not progress,
        dynamic_ncols=True,
    )
    started = time.monotonic()
    with bar:
        for step in range(total_steps):
            for group in optimizer.param_groups:
                group["lr"] = config.lr * lr_at(step, total_steps, warmup_steps)
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for _ in range(config.accum_steps):
                positions = [run.train.usable[p] for p in next(batches)]
                pixels, kept = run.train.batch(positions)
                if len(kept) < 2:
                    continue
                chosen = [run.train_samples[i] for i in kept]
                captions = [caption_rng.choice(s.captions) for s in chosen]
                loss, _ = trainer.batch_loss(pixels, captions, group_keys(chosen), run.loss)
                trainer.scaler.scale(loss / config.accum_steps).backward()
                step_loss += float(loss.detach()) / config.accum_steps
            trainer.scaler.step(optimizer)
            trainer.scaler.update()
            with torch.no_grad():
                scale_parameter.clamp_(0, MAX_LOGIT_SCALE)
            if step == 0:
                outcome.first_loss = step_loss
            outcome.recent = (outcome.recent + [step_loss])[-window:]
            bar.set_postfix(
                loss=f"{np.mean(outcome.recent):.4f}",
                lr=f"{optimizer.param_groups[0]['lr']:.2e}",
            )
            bar.update()
    outcome.seconds = time.monotonic() - started
    return outcome


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
    run = _prepare(config, dataset, started)
    trainer = _Trainer(config, run.start, run.device)
    trained = _train(config, run, trainer, progress)
    data = run.data
    val_loss, zero_shot = _validate(
        trainer, run.val, run.val_samples, run.loss, data.classes if data.has_classes else []
    )
    warnings = list(data.warnings) + run.train.warnings + run.val.warnings
    model: Any = run.start.model
    model.eval()
    spec = config.model
    meta = {"model": spec.name, "started_from": spec.pretrained, "steps": trained.total_steps}
    report = FinetuneReport(
        checkpoint=str(config.out),
        checkpoint_sha256=_save_checkpoint(run.start.backend, config.out, meta),
        model=spec.name,
        started_from=spec.pretrained,
        start_weights=run.start.weights,
        args=config.to_dict(),
        data=DataSummary(
            format=data.format,
            samples=len(data.samples),
            train=len(run.train.usable),
            val=len(run.val.usable),
            classes=len(data.classes),
            warnings=len(warnings),
        ),
        loss=run.loss,
        device=run.device,
        amp=str(trainer.amp_dtype).replace("torch.", "") if trainer.amp_dtype else None,
        pre_decoded=run.train.cache is not None,
        steps=trained.total_steps,
        epochs=round(trained.total_steps * trained.per_step / len(run.train.usable), 3),
        first_train_loss=round(trained.first_loss, 5),
        final_train_loss=round(float(np.mean(trained.recent)), 5) if trained.recent else None,
        val_loss=round(val_loss, 5) if val_loss is not None else None,
        val_zero_shot=zero_shot,
        logit_scale=round(float(run.start.backend.logit_scale_parameter().detach().exp()), 3),
        seconds=round(time.monotonic() - started, 2),
        prepare_seconds=round(run.prepare_seconds, 2),
        train_seconds=round(trained.seconds, 2),
        warnings=warnings[:100],
    )
    report_path = report_path_for(config.out)
    report_path.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    return FinetuneResult(config.out, report_path, report, warnings)

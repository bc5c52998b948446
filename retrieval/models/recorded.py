"""The model an index was built with: reading commands use it unless told otherwise, and a model
that cannot be the index's is refused before its weights are loaded (seconds, not a load)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retrieval.errors import ModelMismatch, WeightsUnavailable
from retrieval.models.identity import (
    CN_CLIP,
    HF,
    OPEN_CLIP,
    ModelIdentity,
    ModelSource,
    ModelSpec,
    RuntimeSpec,
    parse_model_name,
)

if TYPE_CHECKING:
    from retrieval.config import Settings

log = logging.getLogger(__name__)

# The settings that name a model; the index's model replaces those not set explicitly.
MODEL_SETTINGS = ("model", "pretrained", "model_config_dir")


@dataclass(frozen=True)
class ModelChoice:
    """The settings to load the model with, and where the model came from."""

    settings: Settings
    indexed: ModelIdentity | None  # the index's model (None: nothing indexed yet)
    from_index: bool  # the model (or its weights) were taken from the index's record

    def loading_failed(self, error: WeightsUnavailable) -> WeightsUnavailable:
        """The error of a failed load, saying when the model was the index's own."""
        if not self.from_index:
            return error
        return WeightsUnavailable(
            f"{error}\n(This is the model the index was built with, as recorded in the "
            "catalog; pass --model and --pretrained, or set CLIPSEARCH_MODEL and "
            "CLIPSEARCH_PRETRAINED, to say where its weights are now.)"
        )


def spec_of(settings: Settings) -> ModelSpec:
    """The model the settings name (architecture, weights, device, precision, configs, cache),
    without importing torch: the checks before loading run in a fraction of a second."""
    return ModelSpec(
        name=settings.model,
        pretrained=settings.pretrained,
        device=settings.device,
        precision=settings.precision,
        config_dir=settings.model_config_dir,
        cache_dir=settings.model_cache_dir,
        runtime=RuntimeSpec(
            name=settings.runtime,
            quantize=settings.quantize,
            fallback=settings.onnx_fallback,
            threads=settings.torch_threads,
        ),
    )


def recorded_identity(recorded: dict[str, Any] | None) -> ModelIdentity | None:
    """The identity a catalog recorded, or None for nothing (or nothing readable)."""
    if not recorded:
        return None
    try:
        return ModelIdentity.from_dict(recorded)
    except (KeyError, TypeError, ValueError):
        return None


def _loadable(identity: ModelIdentity) -> ModelSource | None:
    """How to load the recorded model again: its recorded source, or for an index written
    before sources were recorded, its name and pretrained value (hf: names are digests)."""
    if identity.source is not None:
        return identity.source
    if identity.family == HF:
        return None
    return ModelSource(identity.name, identity.pretrained)


def choose_model(settings: Settings, recorded: dict[str, Any] | None) -> ModelChoice:
    """The settings with the index's model in place of every model setting that was not set
    explicitly (by a flag or a CLIPSEARCH_* variable).

    A model named explicitly keeps the index's weights only when it is the index's model."""
    indexed = recorded_identity(recorded)
    if indexed is None:
        return ModelChoice(settings, None, False)
    source = _loadable(indexed)
    explicit = settings.model_fields_set
    if source is None or {"model", "pretrained"} <= explicit:
        return ModelChoice(settings, indexed, False)
    update: dict[str, Any] = {}
    if "model" not in explicit:
        update["model"] = source.model
        if "model_config_dir" not in explicit and source.config_dir:
            update["model_config_dir"] = Path(source.config_dir)
    same_model = "model" not in explicit or _same_name(settings.model, source.model)
    if "pretrained" not in explicit and same_model:
        update["pretrained"] = source.pretrained
    if not update:
        return ModelChoice(settings, indexed, False)
    log.info("using the index's model: %s", {k: str(v) for k, v in update.items()})
    return ModelChoice(settings.model_copy(update=update), indexed, True)


def _same_name(a: str, b: str) -> bool:
    try:
        return parse_model_name(a) == parse_model_name(b)
    except Exception:  # noqa: BLE001 - a bad name is never the same model
        return False


def check_before_loading(spec: ModelSpec, indexed: ModelIdentity | None) -> None:
    """ModelMismatch, without loading any weights, when `spec` certainly is not the model the
    index was built with: another family, another architecture, random weights against real
    ones, or a checkpoint file whose sha256 differs. Anything it cannot tell cheaply is left
    to the full check after loading."""
    if indexed is None:
        return
    reason = _certain_difference(spec, indexed)
    if reason is not None:
        raise ModelMismatch(
            f"{spec.name} / {spec.pretrained or '(folder)'}; {reason}", indexed.describe()
        )


def _certain_difference(spec: ModelSpec, indexed: ModelIdentity) -> str | None:
    family, name = parse_model_name(spec.name)
    if family != indexed.family:
        return f"{_article(family)} model, the index's is {_article(indexed.family)} model"
    if family == OPEN_CLIP and name != indexed.name:
        return f"architecture {name}, the index's is {indexed.name}"
    if family == CN_CLIP and f"{CN_CLIP}:{name}" != indexed.name:
        return f"architecture cn_clip:{name}, the index's is {indexed.name}"
    random_values = {"", "none", "random"} if family != HF else {"none", "random"}
    wants_random = spec.pretrained.strip().lower() in random_values
    indexed_random = indexed.random_weights
    if wants_random and not indexed_random:
        return "random weights, the index's are trained ones"
    if wants_random and indexed_random:
        if indexed.weights_sha256 != f"random-init-seed{spec.seed}":
            return "random weights of another seed"
        return None
    path = Path(spec.pretrained).expanduser()
    if not path.is_file():
        if indexed_random and family == OPEN_CLIP:
            from retrieval.models.weights import is_open_clip_tag

            if is_open_clip_tag(spec.pretrained):
                return "trained weights, the index's are random"
        return None
    if indexed.source is not None and _same_file(path, indexed.source.pretrained):
        return None  # the same file as at indexing; the loader's own hash decides
    from retrieval.models.weights import sha256_file

    if sha256_file(path) != indexed.weights_sha256:
        return f"the weights in {path} are not the index's (another sha256)"
    return None


def _article(family: str) -> str:
    return f"an {family}" if family[0] in "aeiouh" else f"a {family}"


def _same_file(path: Path, recorded: str) -> bool:
    try:
        return recorded != "" and os.path.samefile(path, recorded)
    except OSError:
        return False

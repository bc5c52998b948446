"""Which model made a vector: what to load (`ModelSpec`) and what was loaded (`ModelIdentity`).

A model is named `FAMILY:NAME`, or plain `NAME` for open_clip:
- `ViT-B-32`, `xlm-roberta-base-ViT-B-32`, `ViT-B-16-SigLIP2` (open_clip; also `open_clip:...`);
- `cn-clip:ViT-B-16` (Chinese-CLIP, the `cn_clip` package);
- `hf:/models/my-clip` or `hf:OFA-Sys/chinese-clip-vit-base-patch16` (a Hugging Face
  `transformers` CLIPModel, ChineseCLIPModel or SiglipModel folder or hub id).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from retrieval.errors import ConfigError, ModelMismatch

OPEN_CLIP, CN_CLIP, HF = "open_clip", "cn_clip", "hf"
FAMILIES = (OPEN_CLIP, CN_CLIP, HF)
# How users may spell each family's prefix.
_PREFIXES = {
    "open_clip": OPEN_CLIP,
    "open-clip": OPEN_CLIP,
    "openclip": OPEN_CLIP,
    "cn-clip": CN_CLIP,
    "cn_clip": CN_CLIP,
    "chinese-clip": CN_CLIP,
    "hf": HF,
    "transformers": HF,
}

# Said wherever results come from a model with random weights (pretrained "none"): the demo's and
# the tests' tiny models aside, nobody means to search with one, and its results look plausible.
RANDOM_WEIGHTS_WARNING = (
    "random weights (pretrained=none): results are meaningless; `clipsearch models` lists real "
    "weights to index with"
)
RANDOM_WEIGHTS_PREFIX = "random-init"  # how weights_sha256 records random weights

# Prefixes open_clip itself understands in a model name; the whole name goes to open_clip.
_OPEN_CLIP_SCHEMAS = ("hf-hub", "local-dir")


def parse_model_name(name: str) -> tuple[str, str]:
    """(family, the family's own model name) of a `FAMILY:NAME` or plain open_clip `NAME`."""
    prefix, sep, rest = name.partition(":")
    if not sep or "/" in prefix or "\\" in prefix or prefix in _OPEN_CLIP_SCHEMAS:
        # A plain open_clip name, one of open_clip's own `hf-hub:` names, or a path.
        return OPEN_CLIP, name
    family = _PREFIXES.get(prefix.strip().lower())
    if family is None:
        known = ", ".join(sorted(_PREFIXES))
        raise ConfigError(
            "CLIPSEARCH_MODEL",
            f"unknown model family {prefix!r} in {name!r}; use one of {known}, or a plain "
            "open_clip name",
        )
    if not rest.strip():
        raise ConfigError("CLIPSEARCH_MODEL", f"{name!r} names a family but no model")
    return family, rest.strip()


RUNTIMES = ("auto", "torch", "onnx", "tensorrt")  # CLIPSEARCH_RUNTIME
QUANTIZATIONS = ("none", "int8")  # CLIPSEARCH_QUANTIZE
FALLBACKS = ("torch", "refuse")  # CLIPSEARCH_ONNX_FALLBACK


@dataclass(frozen=True)
class RuntimeSpec:
    """What runs the towers once the model is loaded (see `retrieval.models.runtimes`)."""

    name: str = "torch"  # auto (measured, per tower), torch, onnx (ONNX Runtime), tensorrt
    quantize: str = "none"  # int8: ONNX Runtime's dynamic int8 weights (MatMul, Gemm)
    # What `onnx` does when the model's export is corrupt: run torch (with a warning), or refuse.
    fallback: str = "torch"
    threads: int = 0  # intra-op threads (0: the runtime's default, one per core)


@dataclass(frozen=True)
class ModelSpec:
    """What to load: a model name (see the module docstring) plus weights (a pretrained tag or a
    checkpoint path; `hf:` folders carry their own), on which device and in which precision."""

    name: str
    pretrained: str
    device: str = "auto"
    precision: str = "auto"
    config_dir: Path | None = None
    cache_dir: Path | None = None
    seed: int = 0  # seeds random weights (pretrained "none"), for reproducible runs
    runtime: RuntimeSpec = field(default_factory=RuntimeSpec)

    @property
    def family(self) -> str:
        return parse_model_name(self.name)[0]

    @property
    def family_name(self) -> str:
        """The name within its family (`ViT-B-16` for `cn-clip:ViT-B-16`)."""
        return parse_model_name(self.name)[1]


@dataclass(frozen=True)
class ModelSource:
    """How the model was named when it was loaded (CLIPSEARCH_MODEL, _PRETRAINED and
    _MODEL_CONFIG_DIR, paths made absolute), so that reading commands can load it again."""

    model: str
    pretrained: str
    config_dir: str | None = None

    @classmethod
    def of(cls, spec: ModelSpec) -> ModelSource:
        family, name = parse_model_name(spec.name)
        model = spec.name
        if family == HF and _local(name):
            model = f"{HF}:{Path(name).expanduser().resolve()}"
        pretrained = spec.pretrained
        if pretrained and _local(pretrained):
            pretrained = str(Path(pretrained).expanduser().resolve())
        config_dir = str(Path(spec.config_dir).resolve()) if spec.config_dir else None
        return cls(model, pretrained, config_dir)

    @classmethod
    def from_dict(cls, data: Any) -> ModelSource | None:
        if not isinstance(data, dict) or not isinstance(data.get("model"), str):
            return None
        config_dir = data.get("config_dir")
        return cls(
            data["model"],
            str(data.get("pretrained") or ""),
            config_dir if isinstance(config_dir, str) else None,
        )


def recorded_random_weights(recorded: dict[str, Any] | None) -> bool:
    """Whether a model identity as stored (shard.json, the catalog) has random weights."""
    if not recorded:
        return False
    return str(recorded.get("weights_sha256", "")).startswith(RANDOM_WEIGHTS_PREFIX)


def _local(value: str) -> bool:
    """Whether a model or pretrained value names something on disk (not a tag or hub id)."""
    path = Path(value).expanduser()
    return path.exists() or path.is_absolute() or value.startswith((".", "~"))


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
    family: str = OPEN_CLIP
    # What turns text into tokens (its name and, for files, their digest); "" for open_clip,
    # whose model name fixes its tokenizer.
    tokenizer: str = ""
    # How it was named when loaded: not part of what the model computes (a moved file is the
    # same model), so neither in the key nor in comparisons.
    source: ModelSource | None = field(default=None, compare=False)

    @property
    def key(self) -> str:
        # `pretrained` is left out on purpose: the same weights file moved to another
        # path, or fetched by tag, is the same model.
        material: list[Any] = [
            self.name,
            self.weights_sha256,
            self.dim,
            self.image_size,
            self.mean,
            self.std,
        ]
        if self.family != OPEN_CLIP or self.tokenizer:
            # Left out for open_clip models, so that indexes written before families existed
            # keep their key.
            material += [self.family, self.tokenizer]
        return hashlib.sha256(json.dumps(material).encode()).hexdigest()[:16]

    @property
    def random_weights(self) -> bool:
        """Whether the weights were initialised at random (pretrained "none"), not trained."""
        return self.weights_sha256.startswith(RANDOM_WEIGHTS_PREFIX)

    def describe(self) -> str:
        return (
            f"{self.name} / {self.pretrained} (weights {self.weights_sha256[:12]}, dim {self.dim})"
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.source is None:
            del data["source"]
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
            family=str(data.get("family") or OPEN_CLIP),
            tokenizer=str(data.get("tokenizer") or ""),
            source=ModelSource.from_dict(data.get("source")),
        )

    def require_same(self, indexed: ModelIdentity | None) -> None:
        """Raise ModelMismatch unless `indexed` is None (empty index) or the same model."""
        if indexed is not None and indexed.key != self.key:
            raise ModelMismatch(self.describe(), indexed.describe())

"""Chinese-CLIP models (the cn_clip package): a ViT or ModifiedResNet image tower and a Chinese
RoBERTa (BERT) text tower, named `cn-clip:NAME`.

NAME is one of cn_clip's released models (ViT-B-16, ViT-L-14, ViT-L-14-336, ViT-H-14, RN50) or
a JSON config `<NAME>.json` holding the keyword arguments of cn_clip's `CLIP`, found in
CLIPSEARCH_MODEL_CONFIG_DIR (or its `cn_clip/` folder) or among the bundled ones. cn_clip's own
loaders print, download and assert; this module reads cn_clip's registry and configs as data and
builds `CLIP` itself, so that a missing or wrong file is one clear `WeightsUnavailable`.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cn_clip.clip
import torch
from cn_clip.clip.bert_tokenizer import default_vocab
from cn_clip.clip.model import CLIP, convert_weights
from cn_clip.clip.utils import _HUGGINGFACE_ORG, _MODEL_INFO, _MODELS, image_transform
from torchvision.transforms import Normalize

from retrieval.errors import ConfigError, WeightsUnavailable
from retrieval.models.backend import (
    ExportTowers,
    ModelBackend,
    ScoreRule,
    TokenBatch,
)
from retrieval.models.cache import cached_repo_file, clip_cache_dir
from retrieval.models.identity import CN_CLIP, ModelIdentity, ModelSpec
from retrieval.models.recommended import nearest_names
from retrieval.models.sources import WeightsSource, source_for
from retrieval.models.towers import MethodTower
from retrieval.models.weights import (
    BUNDLED_CONFIG_DIR,
    RANDOM_INIT,
    is_open_clip_tag,
    read_checkpoint_file,
    sha256_file,
    state_dict_differences,
    tensor_shapes,
)

log = logging.getLogger(__name__)

# Every released Chinese-CLIP model was trained with this context (cn_clip's `tokenize`).
CONTEXT_LENGTH = 52
CN_CLIP_CONFIG_DIR = BUNDLED_CONFIG_DIR / "cn_clip"
_CN_CLIP_STRUCTURES = Path(cn_clip.clip.__file__).parent / "model_configs"
# `CLIP` arguments a config may not set: the tokenizer is fixed (its vocabulary is in the
# identity), and flash attention renames the weights and needs a package we do not install.
_NOT_CONFIGURABLE = frozenset({"self", "tokenizer", "use_flash_attention"})


@dataclass(frozen=True)
class Release:
    """A checkpoint Chinese-CLIP published for one of its models."""

    model: str  # cn_clip's model name, e.g. ViT-B-16
    filename: str  # e.g. clip_cn_vit-b-16.pt
    repo: str  # the Hugging Face repo that holds it, e.g. OFA-Sys/chinese-clip-vit-base-patch16

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo}/resolve/main/{self.filename}"


@dataclass(frozen=True)
class ChineseClipConfig:
    """One architecture: the keyword arguments of cn_clip's `CLIP` and where they came from."""

    name: str
    model_info: dict[str, Any]
    source: str
    release: Release | None = None

    @property
    def image_size(self) -> int:
        return int(self.model_info["image_resolution"])


def releases() -> dict[str, Release]:
    """cn_clip's released checkpoints by model name (its `_MODELS`, read as data)."""
    return {
        model: Release(model, filename, f"{_HUGGINGFACE_ORG}/{repo}")
        for model, (repo, filename) in _MODELS.items()
    }


def known_models() -> list[str]:
    """cn_clip's released models and the bundled configs."""
    bundled = sorted(path.stem for path in CN_CLIP_CONFIG_DIR.glob("*.json"))
    return [*_MODEL_INFO, *bundled]


def model_config(name: str, config_dir: Path | None = None) -> ChineseClipConfig:
    """The architecture `name` stands for; ConfigError when there is none."""
    if name in _MODEL_INFO:
        # "VISION@TEXT": two of cn_clip's JSON files, merged as its `create_model` merges them.
        vision, text = _MODEL_INFO[name]["struct"].split("@")
        model_info: dict[str, Any] = {}
        for part in (vision, text):
            model_info.update(json.loads((_CN_CLIP_STRUCTURES / f"{part}.json").read_text()))
        source = f"cn_clip's {_MODEL_INFO[name]['struct']}"
        return ChineseClipConfig(
            name, _checked_model_info(model_info, source), source, releases().get(name)
        )
    if config_dir is not None and not config_dir.is_dir():
        raise ConfigError("CLIPSEARCH_MODEL_CONFIG_DIR", f"{config_dir} is not a directory")
    # The user's folder may also hold open_clip configs, so its cn_clip/ sub-folder comes first;
    # the user's configs come before the bundled ones.
    folders = [config_dir / "cn_clip", config_dir] if config_dir is not None else []
    candidates = [folder / f"{name}.json" for folder in [*folders, CN_CLIP_CONFIG_DIR]]
    if Path(name).name != name:  # a name, not a path to some other JSON file
        candidates = []
    for path in candidates:
        if path.is_file():
            return ChineseClipConfig(name, _read_model_info(path), str(path))
    nearest = nearest_names(name, known_models())
    guess = f" (did you mean {' or '.join(nearest)}?)" if nearest else ""
    raise ConfigError(
        "CLIPSEARCH_MODEL",
        f"unknown Chinese-CLIP model {name!r}{guess}; known models: {', '.join(known_models())} "
        "(or add your own <name>.json with the keyword arguments of cn_clip's CLIP to "
        "CLIPSEARCH_MODEL_CONFIG_DIR)",
    )


def _read_model_info(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError("CLIPSEARCH_MODEL_CONFIG_DIR", f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError("CLIPSEARCH_MODEL_CONFIG_DIR", f"{path} does not hold a JSON object")
    if "vision_cfg" in data or "text_cfg" in data:
        raise ConfigError(
            "CLIPSEARCH_MODEL_CONFIG_DIR",
            f"{path} is an open_clip config; a Chinese-CLIP config holds cn_clip's CLIP keyword "
            "arguments (embed_dim, image_resolution, vision_*, vocab_size, text_*)",
        )
    return _checked_model_info(data, str(path))


def _checked_model_info(data: dict[str, Any], source: str) -> dict[str, Any]:
    """The config as `CLIP(**model_info)` takes it; ConfigError naming missing or unknown keys."""
    parameters = inspect.signature(CLIP.__init__).parameters
    allowed = set(parameters) - _NOT_CONFIGURABLE
    required = {name for name in allowed if parameters[name].default is inspect.Parameter.empty}
    missing, unknown = sorted(required - data.keys()), sorted(data.keys() - allowed)
    if missing or unknown:
        raise ConfigError(
            "CLIPSEARCH_MODEL_CONFIG_DIR",
            f"{source} does not fit cn_clip's CLIP: missing {missing or 'nothing'}, "
            f"unknown {unknown or 'nothing'}",
        )
    model_info = dict(data)
    if isinstance(model_info["vision_layers"], str):
        # cn_clip's RN50.json writes the ResNet stages as a string ("[3,4,6,3]").
        model_info["vision_layers"] = json.loads(model_info["vision_layers"])
    return model_info


# --- weights --------------------------------------------------------------------------------


def _help(spec: ModelSpec, reason: str) -> str:
    return (
        f"Cannot load weights '{spec.pretrained}' for model {spec.name}: {reason}\n"
        "Set CLIPSEARCH_PRETRAINED to a local Chinese-CLIP checkpoint file (.pt), to the file "
        "name of a released checkpoint kept in the model cache, or to 'none' for random weights."
    )


def release_source(release: Release) -> WeightsSource:
    """Where a release comes from, with the table's figures when it is a recommended model."""
    model = f"cn-clip:{release.model}"
    known = source_for(model, release.filename)
    if known is not None:
        return known
    return WeightsSource(model, release.filename, release.repo, (release.filename,))


def _release_help(spec: ModelSpec, release: Release, looked_in: Path) -> str:
    source = release_source(release)
    return (
        f"Cannot load weights '{spec.pretrained}' for model {spec.name}: the released checkpoint "
        f"{release.filename} is not here (looked in {looked_in}, the clipsearch import folder "
        "and the Hugging Face cache), and loading a model never downloads Chinese-CLIP "
        "weights.\n"
        f"{source.howto(spec.cache_dir)}\n"
        "  * or set CLIPSEARCH_PRETRAINED to the path of the file."
    )


def _release_named(tag: str) -> Release | None:
    """The release whose checkpoint file `tag` names (with or without `.pt`)."""
    for release in releases().values():
        if tag in (release.filename, release.filename.removesuffix(".pt")):
            return release
    return None


def _cached_release(release: Release, cache_dir: Path | None) -> Path | None:
    """The release's file if it is already on this machine; never touches the network."""
    flat = clip_cache_dir(cache_dir) / release.filename  # where cn_clip downloads
    if flat.is_file():
        return flat
    return cached_repo_file(release.repo, (release.filename,), cache_dir)


def resolve_checkpoint(spec: ModelSpec, config: ChineseClipConfig) -> Path | None:
    """The checkpoint file `spec.pretrained` names, or None for random weights."""
    pretrained = spec.pretrained.strip()
    if pretrained.lower() in RANDOM_INIT:
        return None
    path = Path(pretrained).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise WeightsUnavailable(
            _help(
                spec,
                "that is a folder; a Chinese-CLIP checkpoint is one .pt file (a Hugging Face "
                "ChineseCLIPModel folder loads as hf:/path/to/it).",
            )
        )
    release = _release_named(pretrained)
    if release is None and config.release is not None and is_open_clip_tag(pretrained):
        # The default CLIPSEARCH_PRETRAINED is an open_clip tag: choosing cn-clip:ViT-B-16
        # alone means its own released checkpoint.
        log.info(
            "%s: %r is an open_clip tag; using the model's released checkpoint %s",
            spec.name,
            pretrained,
            config.release.filename,
        )
        release = config.release
    if release is None:
        if "/" in pretrained or "\\" in pretrained or path.suffix in (".pt", ".pth", ".bin"):
            raise WeightsUnavailable(_help(spec, "that checkpoint file does not exist."))
        tag = f" (its released checkpoint: {config.release.filename})" if config.release else ""
        files = [known.filename for known in releases().values()]
        nearest = nearest_names(pretrained, files)
        if nearest and not tag:
            tag = f" (did you mean {' or '.join(nearest)}?)"
        raise WeightsUnavailable(
            _help(spec, f"it is neither an existing file nor a released checkpoint name{tag}.")
        )
    if config.release != release:
        raise WeightsUnavailable(
            _help(
                spec,
                f"{release.filename} is the released checkpoint of cn-clip:{release.model}; "
                f"set CLIPSEARCH_MODEL=cn-clip:{release.model} to use it.",
            )
        )
    cached = _cached_release(release, spec.cache_dir)
    if cached is None:
        raise WeightsUnavailable(_release_help(spec, release, clip_cache_dir(spec.cache_dir)))
    return cached


@dataclass(frozen=True)
class Checkpoint:
    state_dict: dict[str, torch.Tensor]
    clipsearch: dict[str, Any]  # what clipsearch's fine-tuning recorded ({} for other files)


def read_checkpoint(path: Path, spec: ModelSpec) -> Checkpoint:
    """The weights in a cn_clip release (`{"state_dict": ...}` saved from DistributedDataParallel)
    or a clipsearch fine-tuning run (`{"state_dict": ..., "clipsearch": meta}`)."""
    try:
        loaded = read_checkpoint_file(path)
    except ValueError as exc:
        raise WeightsUnavailable(_help(spec, f"{exc}.")) from None
    state = loaded.state_dict
    # Released checkpoints were saved from DistributedDataParallel ("module." prefixes) and keep
    # the BERT pooler, which cn_clip's text tower does not build; cn_clip's `create_model`
    # drops both the same way.
    weights = {key.removeprefix("module."): value for key, value in state.items()}
    weights = {key: value for key, value in weights.items() if "bert.pooler" not in key}
    return Checkpoint(weights, loaded.meta)


def _check_fits(
    model: torch.nn.Module, checkpoint: Checkpoint, spec: ModelSpec, path: Path
) -> None:
    """WeightsUnavailable, naming what differs, unless the checkpoint is of this architecture."""
    weights = checkpoint.state_dict
    expected = tensor_shapes(model.state_dict())
    problems = state_dict_differences(expected, tensor_shapes(weights))
    if not problems:
        return
    unexpected = [key for key in weights if key not in expected]
    origin = checkpoint.clipsearch.get("model")
    hints = [f" It was fine-tuned from {origin}." if origin else ""]
    if any(key.startswith(("text_model.", "vision_model.")) for key in unexpected):
        hints.append(" It looks like a Hugging Face model: load its folder as hf:/path/to/it.")
    raise WeightsUnavailable(
        _help(
            spec,
            f"{path} holds the weights of another architecture: "
            f"{problems} weights.{''.join(hints)}",
        )
    )


@functools.cache
def vocab_digest() -> str:
    """The sha256 of the vocabulary cn_clip's tokenizer reads (its bundled vocab.txt)."""
    return sha256_file(default_vocab())


# --- the backend ----------------------------------------------------------------------------


class ChineseClipBackend(ModelBackend):
    """A cn_clip `CLIP` model; texts tokenized by cn_clip's BERT tokenizer to 52 tokens."""

    def tokenize(self, texts: Sequence[str]) -> TokenBatch:
        # No mask in the batch: cn_clip's `encode_text` derives it from the pad ids itself.
        return TokenBatch(cn_clip.clip.tokenize(list(texts), context_length=CONTEXT_LENGTH))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)  # type: ignore[operator]

    def encode_text(self, tokens: TokenBatch, *, trim: bool) -> torch.Tensor:
        ids = self.trimmed(tokens).ids if trim else tokens.ids
        return self.model.encode_text(ids)  # type: ignore[operator]

    def trimmed(self, tokens: TokenBatch) -> TokenBatch:
        # The BERT tower is bidirectional, but attention to [PAD] keys gets -10000 added
        # before the softmax (exp underflows to exactly 0), positions are absolute and
        # pooling reads [CLS] at 0: columns that are padding in every row change nothing.
        real = (tokens.ids != self.pad_id).any(dim=0).nonzero()
        return tokens.columns(int(real.max().item()) + 1 if len(real) else 1)

    def export_towers(self) -> ExportTowers:
        return ExportTowers(
            MethodTower(self.model, "encode_image"),
            MethodTower(self.model, "encode_text"),
            text_mask=False,
        )

    def trims_exactly(self) -> bool:
        return True

    @property
    def pad_id(self) -> int:
        """The id whose positions cn_clip's `encode_text` masks out ([PAD], 0)."""
        model: Any = self.model
        return int(model.tokenizer.vocab["[PAD]"])

    def score_rule(self) -> ScoreRule:
        scale: Any = self.model.logit_scale
        return ScoreRule(float(scale.exp().item()))

    def tower(self, parameter: str) -> str:
        if parameter.startswith("visual."):
            return "image"
        if parameter == "logit_scale":
            return "shared"
        return "text"


def load(spec: ModelSpec, device: str, precision: str) -> ChineseClipBackend:
    """Load a Chinese-CLIP model. WeightsUnavailable with instructions when weights are missing
    or do not fit; ConfigError for an unknown name or an unsupported precision."""
    if precision not in ("fp32", "fp16"):
        raise ConfigError(
            "CLIPSEARCH_PRECISION",
            f"Chinese-CLIP models run in fp32 or fp16 (cn_clip's half precision), not {precision}",
        )
    config = model_config(spec.family_name, spec.config_dir)
    path = resolve_checkpoint(spec, config)
    checkpoint = read_checkpoint(path, spec) if path is not None else None
    if checkpoint is None:
        log.warning(
            "Model %s has RANDOM weights (pretrained=%r): embeddings carry no meaning.",
            spec.name,
            spec.pretrained,
        )
        # Seeded, so that random-init runs (benchmarks, demos, training) are reproducible.
        torch.manual_seed(spec.seed)
    model = CLIP(**config.model_info)
    if checkpoint is not None and path is not None:
        _check_fits(model, checkpoint, spec, path)
        model.load_state_dict(checkpoint.state_dict)
    model.to(device)
    if precision == "fp16":
        # cn_clip's own half precision: convolutions, linears, attention, BERT and the
        # projections in fp16; its LayerNorms compute in fp32.
        convert_weights(model)
    model.eval()
    preprocess = image_transform(config.image_size)
    normalize = next(step for step in preprocess.transforms if isinstance(step, Normalize))
    identity = ModelIdentity(
        # One spelling for cn-clip:, chinese-clip: and cn_clip:, so that all give one key.
        name=f"{CN_CLIP}:{config.name}",
        pretrained=spec.pretrained,
        weights_sha256=sha256_file(path) if path is not None else f"random-init-seed{spec.seed}",
        dim=int(config.model_info["embed_dim"]),
        image_size=config.image_size,
        mean=tuple(float(v) for v in normalize.mean),
        std=tuple(float(v) for v in normalize.std),
        family=CN_CLIP,
        tokenizer=f"cn_clip-bert-vocab:{vocab_digest()[:12]}",
    )
    return ChineseClipBackend(model, preprocess, identity)

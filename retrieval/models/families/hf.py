"""Hugging Face `transformers` CLIP models, named `hf:FOLDER` or `hf:ORG/NAME` (a hub id).

The folder is what `save_pretrained` writes and what the hub holds: config.json, the weights
(model.safetensors or pytorch_model.bin, possibly sharded), preprocessor_config.json and the
tokenizer's files. config.json's `model_type` picks the architecture: `clip` (CLIPModel),
`chinese_clip` (ChineseCLIPModel, the format of OFA-Sys/chinese-clip-*) or `siglip` (SiglipModel).
A hub id is read only from the local Hugging Face cache; nothing is ever downloaded.

Weights (`spec.pretrained`): the folder carries its own, so "", "folder" and "default" mean the
folder's weights, and so do open_clip's pretrained tags (the default CLIPSEARCH_PRETRAINED is
one; a tag has no meaning for a folder, and refusing it would make every hf user set the
variable). "none" or "random" builds random weights (seeded) from the folder's config, and the
path of a checkpoint file (`{"state_dict": ...}`, as clipsearch's fine-tuning writes it) replaces
the folder's weights. Anything else is refused with the accepted values.

transformers loads many broken folders without a word (a missing vocabulary gives an empty
tokenizer, missing tensors are initialised at random), so this module checks each file itself
and raises one `WeightsUnavailable` that names the folder, the file and what to do.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    ChineseCLIPModel,
    CLIPModel,
    SiglipModel,
)

from retrieval.errors import ConfigError, WeightsUnavailable
from retrieval.models.backend import ExportTowers, ModelBackend, ScoreRule, TokenBatch
from retrieval.models.cache import cached_repo_snapshot
from retrieval.models.identity import HF, ModelIdentity, ModelSpec
from retrieval.models.sources import WeightsSource, source_for
from retrieval.models.weights import (
    file_tensor_shapes,
    is_open_clip_tag,
    read_checkpoint_file,
    sha256_file,
    state_dict_differences,
    tensor_shapes,
    tokenizer_digest,
)

log = logging.getLogger(__name__)

FOLDER_WEIGHTS = frozenset({"", "folder", "default"})
RANDOM_WEIGHTS = frozenset({"none", "random"})
# Where transformers looks for a folder's weights, in its order of preference.
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
TORCH_BIN, TORCH_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
# Keys of config.json that record who saved the folder, not what the model computes.
_CONFIG_METADATA = frozenset(
    {"_name_or_path", "_commit_hash", "transformers_version", "dtype", "torch_dtype"}
)
# `model_max_length` transformers gives a tokenizer that does not know its own.
_UNSET_MAX_LENGTH = 1_000_000


@dataclass(frozen=True)
class Architecture:
    """What clipsearch needs to know about one `model_type`."""

    model_class: Any  # a transformers PreTrainedModel subclass
    # Whether the text tower reads the attention mask. SigLIP's was trained without one (as in
    # big_vision and open_clip): it attends to the padding and pools the last position.
    masked: bool
    pooling: Literal["eos", "cls", "last"]  # CLIP: the first EOS (causal); BERT: [CLS] at 0
    trained_context: int | None = None  # the context it was trained on: a cap on the folder's


ARCHITECTURES: dict[str, Architecture] = {
    "clip": Architecture(CLIPModel, masked=True, pooling="eos"),
    # Every Chinese-CLIP model was trained on 52 tokens (cn_clip's `tokenize`); the hub folders
    # carry a bare BERT vocabulary whose tokenizer would allow 512.
    "chinese_clip": Architecture(ChineseCLIPModel, masked=True, pooling="cls", trained_context=52),
    "siglip": Architecture(SiglipModel, masked=False, pooling="last"),
}


@dataclass(frozen=True)
class FolderWeights:
    """The folder's own weights: one file or the shards an index lists."""

    files: tuple[Path, ...]
    sha256: str  # of the file, or of the shards' names and digests
    safetensors: bool


@dataclass(frozen=True)
class Weights:
    """The weights `spec.pretrained` chose."""

    source: Literal["folder", "random", "checkpoint"]
    checkpoint: Path | None = None


class HfPreprocess:
    """PIL image -> float tensor (3, H, W), exactly as the folder's image processor makes it.

    A class rather than a closure, so that DataLoader workers can pickle it."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels: torch.Tensor = self.processor(images=image, return_tensors="pt")["pixel_values"]
        return pixels[0]


def pooled_features(output: Any) -> torch.Tensor:
    """The projected features of `get_text_features` / `get_image_features`: a tensor up to
    transformers 4, an output object whose `pooler_output` holds them since 5."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return pooled
    raise TypeError(f"unexpected features from transformers: {type(output).__name__}")


class HfImageTower(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        model: Any = self.model
        return pooled_features(model.get_image_features(pixel_values=pixels))


class HfTextTower(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        model: Any = self.model
        return pooled_features(model.get_text_features(input_ids=ids, attention_mask=mask))


class HfBackend(ModelBackend):
    """A transformers CLIPModel, ChineseCLIPModel or SiglipModel with its tokenizer."""

    def __init__(
        self,
        model: torch.nn.Module,
        preprocess: HfPreprocess,
        tokenizer: Any,
        architecture: Architecture,
        context_length: int,
        *,
        identity: ModelIdentity,
    ) -> None:
        super().__init__(model, preprocess, identity)
        self.tokenizer = tokenizer
        self.architecture = architecture
        self.context_length = context_length
        # A Rust tokenizer sets its padding and truncation state on each call, and two threads
        # doing that at once fail with "Already borrowed"; the Encoder tokenizes outside its lock.
        self._tokenizer_lock = threading.Lock()

    def tokenize(self, texts: Sequence[str]) -> TokenBatch:
        # Always the full context: SigLIP pools the last position, so its padding is part of
        # the input it was trained on; the other towers are trimmed in `encode_text`.
        with self._tokenizer_lock:
            batch = self.tokenizer(
                list(texts),
                padding="max_length",
                max_length=self.context_length,
                truncation=True,
                return_attention_mask=self.architecture.masked,
                return_tensors="pt",
            )
        mask = batch["attention_mask"] if self.architecture.masked else None
        return TokenBatch(batch["input_ids"], mask)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return HfImageTower(self.model)(pixels)

    def encode_text(self, tokens: TokenBatch, *, trim: bool) -> torch.Tensor:
        if trim:
            tokens = self.trimmed(tokens)
        return HfTextTower(self.model)(tokens.ids, tokens.mask)

    def trimmed(self, tokens: TokenBatch) -> TokenBatch:
        if not self.trims_exactly() or tokens.mask is None:
            return tokens
        return tokens.columns(self._exact_length(tokens.ids, tokens.mask))

    def export_towers(self) -> ExportTowers:
        return ExportTowers(
            HfImageTower(self.model), HfTextTower(self.model), text_mask=self.architecture.masked
        )

    def trims_exactly(self) -> bool:
        return self.architecture.masked and self.architecture.pooling in ("eos", "cls")

    def _exact_length(self, ids: torch.Tensor, mask: torch.Tensor) -> int:
        """The shortest context that gives the same features as the full one.

        Attention to masked keys is exactly 0 after the softmax and positions are absolute, so
        columns after the last real token change nothing that a real token sees. CLIP's tower
        is causal and pools at its EOS token, ChineseCLIP's pools [CLS] at position 0; the
        pooled position is kept too, in case a tokenizer puts it after the mask."""
        positions = torch.arange(ids.shape[1], device=ids.device)
        last = int((positions * (mask != 0)).max().item())
        if self.architecture.pooling == "eos":
            model: Any = self.model
            eos = model.config.text_config.eos_token_id
            # CLIPTextModel's own rule: configs from before transformers PR #24773 say
            # eos_token_id 2 and pool at the highest token id; newer ones at the first EOS.
            pooled = ids.argmax(dim=-1) if eos == 2 else (ids == eos).int().argmax(dim=-1)
            last = max(last, int(pooled.max().item()))
        return last + 1

    def score_rule(self) -> ScoreRule:
        model: Any = self.model
        bias = getattr(model, "logit_bias", None)
        return ScoreRule(
            float(model.logit_scale.exp().item()),
            float(bias.item()) if bias is not None else None,
        )

    def tower(self, parameter: str) -> str:
        if parameter.startswith(("vision_model.", "visual_projection.")):
            return "image"
        if parameter.startswith(("text_model.", "text_projection.")):
            return "text"
        if parameter in ("logit_scale", "logit_bias"):
            return "shared"
        raise ValueError(f"{parameter} belongs to no tower of {type(self.model).__name__}")


# --- the folder --------------------------------------------------------------------------------


def resolve_folder(spec: ModelSpec) -> Path:
    """The folder `hf:NAME` names: a local folder, or a hub id's snapshot in the local cache."""
    name = spec.family_name
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise WeightsUnavailable(
            f"{spec.name}: {path} is a file; an hf: model is a folder holding config.json, the "
            "weights, preprocessor_config.json and the tokenizer files (what save_pretrained "
            "writes)."
        )
    if path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
        # A path, not a hub id (ORG/NAME): the folder is simply not there.
        raise WeightsUnavailable(
            f"{spec.name}: the folder {path} does not exist. Point CLIPSEARCH_MODEL at "
            "hf:/path/to/the/folder that holds config.json, the weights, "
            "preprocessor_config.json and the tokenizer files (what save_pretrained writes)."
        )
    found = cached_repo_snapshot(name, spec.cache_dir)
    if found is not None:
        return found
    known = source_for(spec.name, spec.pretrained) or source_for(spec.name, "")
    source = known or WeightsSource(spec.name, "", name, ())
    return_help = source.howto(spec.cache_dir)
    raise WeightsUnavailable(
        f"{spec.name}: {name} is neither a folder nor a Hugging Face model here (looked in the "
        "clipsearch import folder and the Hugging Face cache), and loading a model never "
        f"downloads one.\n{return_help}\n"
        "  * or copy a folder that save_pretrained (or snapshot_download) wrote, and set "
        "CLIPSEARCH_MODEL=hf:/path/to/that/folder."
    )


def read_config(folder: Path, spec: ModelSpec) -> dict[str, Any]:
    """config.json as a dict; WeightsUnavailable unless it is a model type this family loads."""
    path = folder / "config.json"
    supported = ", ".join(ARCHITECTURES)
    if not path.is_file():
        raise WeightsUnavailable(
            f"{spec.name}: {folder} is not a Hugging Face model folder: it has no config.json. "
            f"An hf: model is a folder written by save_pretrained (model types: {supported}); "
            "point CLIPSEARCH_MODEL at such a folder."
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WeightsUnavailable(f"{spec.name}: cannot read {path}: {exc}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in ARCHITECTURES:
        hint = (
            " open_clip loads SigLIP 2 models (e.g. CLIPSEARCH_MODEL=ViT-B-16-SigLIP2)."
            if model_type == "siglip2"
            else ""
        )
        raise WeightsUnavailable(
            f"{spec.name}: {path} describes a model of type {model_type!r}; the hf family loads "
            f"the model types {supported} (CLIPModel, ChineseCLIPModel, SiglipModel).{hint}"
        )
    assert isinstance(config, dict)
    return config


def config_digest(config: dict[str, Any]) -> str:
    """A digest of what the config says about the model, not of who saved it or where."""

    def canonical(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: canonical(v) for k, v in sorted(value.items()) if k not in _CONFIG_METADATA}
        if isinstance(value, list):
            return [canonical(v) for v in value]
        return value

    return hashlib.sha256(json.dumps(canonical(config), sort_keys=True).encode()).hexdigest()


def folder_weights(folder: Path, spec: ModelSpec) -> FolderWeights:
    """The weights file(s) transformers would load from the folder; WeightsUnavailable when
    there are none."""
    for name, safetensors in ((SAFETENSORS, True), (TORCH_BIN, False)):
        if (folder / name).is_file():
            return FolderWeights((folder / name,), sha256_file(folder / name), safetensors)
    for name, safetensors in ((SAFETENSORS_INDEX, True), (TORCH_BIN_INDEX, False)):
        if (folder / name).is_file():
            return _sharded_weights(folder, name, safetensors, spec)
    raise WeightsUnavailable(
        f"{spec.name}: {folder} holds no weights: none of {SAFETENSORS}, {TORCH_BIN} (or their "
        f"sharded {SAFETENSORS_INDEX}, {TORCH_BIN_INDEX}) is there.\n"
        "Do one of these:\n"
        "  * copy the model's weights file next to its config.json (model.save_pretrained(folder)"
        " writes it), or\n"
        "  * set CLIPSEARCH_PRETRAINED to a clipsearch fine-tuning checkpoint (.pt) of this "
        "model, or to 'none' for random weights."
    )


def _sharded_weights(folder: Path, index: str, safetensors: bool, spec: ModelSpec) -> FolderWeights:
    try:
        weight_map = json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise WeightsUnavailable(f"{spec.name}: cannot read {folder / index}: {exc}") from None
    missing = [shard for shard in shards if not (folder / shard).is_file()]
    if missing:
        raise WeightsUnavailable(
            f"{spec.name}: {folder / index} lists weight shards that are not in {folder}: "
            f"{', '.join(missing)}. Copy every shard of the model next to its config.json."
        )
    # The shards' own digests, so that the identity does not depend on how the index is written.
    digest = hashlib.sha256()
    for shard in shards:
        digest.update(f"{shard} {sha256_file(folder / shard)}\n".encode())
    return FolderWeights(tuple(folder / s for s in shards), digest.hexdigest(), safetensors)


def choose_weights(spec: ModelSpec) -> Weights:
    """What `spec.pretrained` means for an hf model (see the module docstring)."""
    value = spec.pretrained.strip()
    if value.lower() in FOLDER_WEIGHTS:
        return Weights("folder")
    if value.lower() in RANDOM_WEIGHTS:
        return Weights("random")
    path = Path(value).expanduser()
    if path.is_file():
        return Weights("checkpoint", path)
    if path.is_dir():
        raise WeightsUnavailable(
            _weights_help(spec, "that is a folder; an hf: model's folder goes in CLIPSEARCH_MODEL.")
        )
    if "/" in value or "\\" in value or path.suffix in (".pt", ".pth", ".bin", ".safetensors"):
        raise WeightsUnavailable(_weights_help(spec, "that checkpoint file does not exist."))
    if is_open_clip_tag(value):
        log.warning(
            "%s: %r is an open_clip pretrained tag; an hf: folder carries its own weights, "
            "which are used.",
            spec.name,
            value,
        )
        return Weights("folder")
    raise WeightsUnavailable(_weights_help(spec, "an hf: model does not know that value."))


def _weights_help(spec: ModelSpec, reason: str) -> str:
    return (
        f"Cannot load weights '{spec.pretrained}' for model {spec.name}: {reason}\n"
        "For an hf: model, set CLIPSEARCH_PRETRAINED to '' or 'folder' (the folder's own "
        "weights), to the path of a clipsearch fine-tuning checkpoint (.pt) of this model, or "
        "to 'none' for random weights."
    )


# --- the tokenizer and the image processor -----------------------------------------------------


def load_tokenizer(folder: Path, spec: ModelSpec, text_vocab_size: int) -> Any:
    """The folder's tokenizer; WeightsUnavailable naming the files it lacks."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except ImportError as exc:
        # e.g. SigLIP's SentencePiece tokenizer without the sentencepiece package; the first
        # sentence of transformers' message names the package.
        reason = " ".join(str(exc).split()).split(". ")[0][:300]
        raise ConfigError(
            "CLIPSEARCH_MODEL",
            f"the tokenizer of {folder} needs a package that is not installed ({reason}); "
            "install it, e.g. pip install sentencepiece protobuf for SigLIP's tokenizer",
        ) from None
    except Exception as exc:  # noqa: BLE001 - transformers fails in many ways; one message
        raise WeightsUnavailable(
            f"{spec.name}: cannot read the tokenizer in {folder} ({str(exc)[:300]}). Copy the "
            "model's tokenizer files (tokenizer.save_pretrained(folder) writes them) into it."
        ) from None
    # transformers builds an empty tokenizer when its vocabulary is missing, so check the
    # files: tokenizer.json alone suffices, or else every file the tokenizer's class reads.
    names = list(dict.fromkeys(type(tokenizer).vocab_files_names.values()))
    others = [name for name in names if name != "tokenizer.json"]
    missing = [name for name in others if not (folder / name).is_file()]
    specials = len(set(tokenizer.all_special_ids))
    if (not (folder / "tokenizer.json").is_file() and missing) or len(tokenizer) <= specials:
        needs = " + ".join(others) or "its vocabulary"
        raise WeightsUnavailable(
            f"{spec.name}: the tokenizer in {folder} has no vocabulary: "
            f"{type(tokenizer).__name__} reads tokenizer.json or {needs}, and "
            f"{', '.join(missing) or 'tokenizer.json'} is missing. Copy the model's tokenizer "
            "files (tokenizer.save_pretrained(folder) writes them) into the folder."
        )
    if len(tokenizer) > text_vocab_size:
        raise WeightsUnavailable(
            f"{spec.name}: the tokenizer in {folder} has {len(tokenizer)} tokens but the text "
            f"tower only {text_vocab_size}: it belongs to another model. Copy this model's own "
            "tokenizer files into the folder."
        )
    return tokenizer


def context_length(positions: int, tokenizer: Any, architecture: Architecture) -> int:
    """Tokens per text: the text tower's positions, capped by what the tokenizer (or the
    architecture's training) says."""
    limits = [positions]
    if 0 < int(tokenizer.model_max_length) < _UNSET_MAX_LENGTH:
        limits.append(int(tokenizer.model_max_length))
    if architecture.trained_context:
        limits.append(architecture.trained_context)
    return min(limits)


def load_image_processor(folder: Path, spec: ModelSpec) -> Any:
    try:
        return AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers fails in many ways; one message
        missing = "" if (folder / "preprocessor_config.json").is_file() else " (no such file)"
        raise WeightsUnavailable(
            f"{spec.name}: cannot read the image processor of {folder} from "
            f"preprocessor_config.json{missing}: {str(exc)[:200]}. Copy the model's "
            "preprocessor_config.json (processor.save_pretrained(folder) writes it) into it."
        ) from None


# --- the model ---------------------------------------------------------------------------------


def model_config(folder: Path, spec: ModelSpec, architecture: Architecture) -> Any:
    """config.json as transformers reads it (with its defaults filled in)."""
    try:
        return architecture.model_class.config_class.from_pretrained(
            str(folder), local_files_only=True
        )
    except Exception as exc:  # noqa: BLE001 - a bad value in config.json; one message
        raise WeightsUnavailable(
            f"{spec.name}: transformers cannot read {folder / 'config.json'} ({str(exc)[:300]})."
        ) from None


def load_model(
    folder: Path, spec: ModelSpec, architecture: Architecture, config: Any, weights: Weights
) -> tuple[torch.nn.Module, str]:
    """The model in fp32 on the CPU, and the digest of the weights it was given."""
    cls = architecture.model_class
    if weights.source == "folder":
        files = folder_weights(folder, spec)
        return _from_folder(folder, spec, cls, config, files), files.sha256
    if weights.source == "random":
        log.warning(
            "Model %s has RANDOM weights (pretrained=%r): embeddings carry no meaning.",
            spec.name,
            spec.pretrained,
        )
        # Seeded, so that random-init runs (benchmarks, demos, training) are reproducible.
        torch.manual_seed(spec.seed)
        return cls._from_config(config, dtype=torch.float32), f"random-init-seed{spec.seed}"
    assert weights.checkpoint is not None
    state = read_checkpoint(weights.checkpoint, spec)
    model = cls._from_config(config, dtype=torch.float32)
    problems = state_dict_differences(tensor_shapes(model.state_dict()), tensor_shapes(state))
    if problems:
        raise WeightsUnavailable(
            _weights_help(
                spec,
                f"{weights.checkpoint} holds the weights of another architecture than "
                f"{folder / 'config.json'} describes: {problems}.",
            )
        )
    model.load_state_dict(state)
    return model, sha256_file(weights.checkpoint)


def _from_folder(
    folder: Path, spec: ModelSpec, cls: Any, config: Any, files: FolderWeights
) -> torch.nn.Module:
    def another_architecture(detail: str) -> WeightsUnavailable:
        return WeightsUnavailable(
            f"{spec.name}: {files.files[0]} holds the weights of another architecture than "
            f"{folder / 'config.json'} describes: {detail}. Use the config.json saved with these "
            "weights (model.save_pretrained(folder) writes both), or point CLIPSEARCH_MODEL at "
            "the right folder."
        )

    try:
        model, info = cls.from_pretrained(
            str(folder),
            config=config,
            local_files_only=True,
            use_safetensors=files.safetensors,
            dtype=torch.float32,
            output_loading_info=True,
        )
    except RuntimeError as exc:
        # Tensors of another shape: name them, not transformers' load report.
        with torch.device("meta"):
            expected = tensor_shapes(cls._from_config(config).state_dict())
        found: dict[str, tuple[int, ...]] = {}
        for path in files.files:
            with contextlib.suppress(ValueError):
                found.update(file_tensor_shapes(path))
        raise another_architecture(
            state_dict_differences(expected, found) or str(exc)[:300]
        ) from None
    except Exception as exc:  # noqa: BLE001 - a corrupt file and the like; one message
        raise WeightsUnavailable(
            f"{spec.name}: transformers cannot load the weights in {folder} ({str(exc)[:300]})."
        ) from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        # transformers would have initialised these at random and carried on.
        raise another_architecture(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    return model


def read_checkpoint(path: Path, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """The state dict in a clipsearch fine-tuning checkpoint ({"state_dict": ..., "clipsearch":
    meta}), a bare state dict, or a .safetensors file."""
    try:
        return read_checkpoint_file(path).state_dict
    except ValueError as exc:
        raise WeightsUnavailable(_weights_help(spec, f"{exc}.")) from None


def load(spec: ModelSpec, device: str, precision: str) -> HfBackend:
    """Load an hf: model folder. WeightsUnavailable naming the folder, the file and what to do
    when anything is missing or does not fit."""
    folder = resolve_folder(spec)
    raw_config = read_config(folder, spec)
    architecture = ARCHITECTURES[raw_config["model_type"]]
    weights = choose_weights(spec)
    config = model_config(folder, spec, architecture)
    tokenizer = load_tokenizer(folder, spec, int(config.text_config.vocab_size))
    processor = load_image_processor(folder, spec)
    model, weights_sha256 = load_model(folder, spec, architecture, config, weights)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    model.to(device=device, dtype=dtype)
    model.eval()
    length = context_length(
        int(config.text_config.max_position_embeddings), tokenizer, architecture
    )
    preprocess = HfPreprocess(processor)
    pixels = preprocess(Image.new("RGB", (64, 48)))
    normalises = getattr(processor, "do_normalize", True)
    identity = ModelIdentity(
        # Neither the folder's path nor its name: a moved or renamed folder is the same model.
        # What it computes is fixed by the config, the weights and the tokenizer.
        name=f"{HF}:{raw_config['model_type']}:{config_digest(raw_config)[:12]}",
        pretrained=spec.pretrained if weights.source == "checkpoint" else weights.source,
        weights_sha256=weights_sha256,
        dim=_image_dim(model, pixels.to(device, dtype)),
        image_size=int(pixels.shape[-2]),
        mean=_per_channel(processor.image_mean if normalises else 0.0),
        std=_per_channel(processor.image_std if normalises else 1.0),
        family=HF,
        tokenizer=f"{type(tokenizer).__name__}/{length}:{tokenizer_digest(folder, tokenizer)[:12]}",
    )
    return HfBackend(model, preprocess, tokenizer, architecture, length, identity=identity)


def _image_dim(model: torch.nn.Module, pixels: torch.Tensor) -> int:
    """The embedding width, from one image (the configs name it differently per model type)."""
    tower: Any = model
    with torch.inference_mode():
        return int(pooled_features(tower.get_image_features(pixel_values=pixels[None])).shape[-1])


def _per_channel(value: Any) -> tuple[float, ...]:
    if isinstance(value, int | float):
        return (float(value),) * 3
    return tuple(float(v) for v in value)

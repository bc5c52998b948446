"""open_clip models: OpenAI and LAION CLIPs, multilingual (XLM-R, NLLB text towers), SigLIP."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.hf_model import ClsLastHiddenStatePooler, ClsPooler, HFTextEncoder, MeanPooler
from open_clip.transformer import text_global_pool

from retrieval.errors import WeightsUnavailable
from retrieval.models.backend import (
    ExportTowers,
    ModelBackend,
    ScoreRule,
    TokenBatch,
)
from retrieval.models.cache import (
    cached_repo_snapshot,
    hub_cache_dir,
    hub_endpoint,
    repo_folder_name,
)
from retrieval.models.identity import OPEN_CLIP, ModelIdentity, ModelSpec
from retrieval.models.recommended import nearest_names
from retrieval.models.towers import MethodTower
from retrieval.models.weights import (
    hf_names,
    host_resolves,
    open_clip_source,
    register_model_configs,
    resolve_weights,
    sha256_file,
    tokenizer_digest,
    weights_help,
)

log = logging.getLogger(__name__)

# open_clip's defaults, used when a model does not record its own normalisation.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class OpenClipBackend(ModelBackend):
    def __init__(self, model: torch.nn.Module, preprocess: Any, tokenizer: Any, **kw: Any):
        super().__init__(model, preprocess, **kw)
        self.tokenizer = tokenizer

    def tokenize(self, texts: Sequence[str]) -> TokenBatch:
        return TokenBatch(self.tokenizer(list(texts)))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)  # type: ignore[operator]

    def encode_text(self, tokens: TokenBatch, *, trim: bool) -> torch.Tensor:
        if trim:
            tokens = self.trimmed(tokens)
            if self._causal_tower():
                return CausalTextTower(self.model)(tokens.ids)
        return self.model.encode_text(tokens.ids)  # type: ignore[operator]

    def trimmed(self, tokens: TokenBatch) -> TokenBatch:
        if self._causal_tower():
            # The text tower's attention mask is causal and pooling reads the EOT position,
            # so padding after the longest real sequence never influences the result: running
            # only up to that length gives identical features for a fraction of the cost.
            return tokens.columns(max(1, int((tokens.ids != 0).sum(dim=1).max().item())))
        pad = self._masked_hf_tower()
        if pad is not None:
            return tokens.columns(self._real_columns(tokens.ids, pad))
        return tokens

    def export_towers(self) -> ExportTowers:
        text = (
            CausalTextTower(self.model)
            if self._causal_tower()
            else MethodTower(self.model, "encode_text")
        )
        return ExportTowers(MethodTower(self.model, "encode_image"), text, text_mask=False)

    def score_rule(self) -> ScoreRule:
        scale = getattr(self.model, "logit_scale", None)
        bias = getattr(self.model, "logit_bias", None)
        return ScoreRule(
            float(scale.exp().item()) if scale is not None else 100.0,
            float(bias.item()) if bias is not None else None,
        )

    def tower(self, parameter: str) -> str:
        if parameter.startswith("visual."):
            return "image"
        if parameter in ("logit_scale", "logit_bias"):
            return "shared"
        return "text"

    def trims_exactly(self) -> bool:
        return self._causal_tower() or self._masked_hf_tower() is not None

    def _causal_tower(self) -> bool:
        """open_clip's own causal text transformer, pooled at the EOT token, with padding 0."""
        model = self.model
        return (
            isinstance(model, open_clip.CLIP)
            and getattr(model, "attn_mask", None) is not None
            and getattr(model, "text_pool_type", "argmax") in ("argmax", "eos")
            and isinstance(self.tokenizer, open_clip.tokenizer.SimpleTokenizer)
        )

    def _masked_hf_tower(self) -> int | None:
        """The padding id of a Hugging Face text tower (XLM-R, NLLB, ...) that masks its padding
        out and pools with the mask (mean) or at position 0 ([CLS]); None for any other tower.

        SigLIP's towers are neither: they attend to their padding and pool the last position, so
        padding is part of their input and they always run the full context."""
        text = getattr(self.model, "text", None)
        if not isinstance(text, HFTextEncoder) or not isinstance(
            text.pooler, MeanPooler | ClsPooler | ClsLastHiddenStatePooler
        ):
            return None
        pad = getattr(text.config, "pad_token_id", None)
        tokenizer_pad = getattr(getattr(self.tokenizer, "tokenizer", None), "pad_token_id", None)
        return int(pad) if pad is not None and pad == tokenizer_pad else None

    def _real_columns(self, tokens: torch.Tensor, pad: int) -> int:
        # The tower's attention mask is `tokens != pad`, so a padding column is masked out of
        # every real token's attention (exactly 0 after the softmax) and out of the mean; the
        # position ids count real tokens only. Dropping the columns after the last real token
        # therefore changes nothing but the work.
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return int((positions * (tokens != pad)).max().item()) + 1


class CausalTextTower(torch.nn.Module):
    """open_clip's causal text tower (`CLIP.encode_text`) for ids of any length up to the
    context: the positional embedding and the causal mask are cut to the ids' length, so that
    trimmed ids run trimmed work, in torch and in an export alike."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        model: Any = self.model
        length = tokens.shape[1]
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


def _is_path(name: str) -> bool:
    """A local path rather than a hub repo id (`owner/name`)."""
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1


def _require_hub_files(spec: ModelSpec) -> None:
    """Fail in seconds, with instructions, when a repo the model needs is neither cached nor
    reachable: transformers would otherwise retry for half a minute and raise its own error."""
    for key, repo in dict.fromkeys(hf_names(spec.family_name)):
        if os.path.isdir(os.path.expanduser(repo)):
            continue
        if _is_path(repo):
            raise WeightsUnavailable(
                f"Model {spec.family_name}: its config's text_cfg.{key} names the folder {repo}, "
                "which does not exist. Copy the Hugging Face files there (a tokenizer's "
                "save_pretrained writes them; a text tower needs its config.json), or point "
                f"{key} in the model's JSON config at the folder that holds them."
            )
        if cached_repo_snapshot(repo, spec.cache_dir, hub_only=True) is not None:
            continue
        if host_resolves(hub_endpoint()):
            continue  # open_clip downloads it
        pretrained = spec.pretrained or "none"
        fetch = (
            source.fetch_name
            if (source := open_clip_source(spec.family_name, pretrained)) is not None
            else f"{spec.family_name} --pretrained {pretrained}"
        )
        folder = hub_cache_dir(spec.cache_dir) / f"models--{repo_folder_name(repo)}"
        raise WeightsUnavailable(
            f"Model {spec.family_name} needs the Hugging Face files of {repo} (its tokenizer "
            "or text tower), which are not in the local cache, and the hub is unreachable.\n"
            "To get them:\n"
            f"  * with internet access: clipsearch models fetch {fetch}  (it fills {folder})\n"
            "  * for a machine without it: run that where there is internet, copy the folders "
            "it prints over, and run there: clipsearch models import FOLDER"
        )


def _tokenizer_identity(name: str, tokenizer: Any) -> str:
    """What the identity records of the tokenizer: nothing when the model's name fixes it
    (open_clip's BPE, or a hub repo its config names), the digest of the files when the config
    names a local folder, whose contents may change under the same name."""
    folder = (open_clip.get_model_config(name) or {}).get("text_cfg", {}).get("hf_tokenizer_name")
    hf_tokenizer = getattr(tokenizer, "tokenizer", None)
    if not folder or not os.path.isdir(folder) or hf_tokenizer is None:
        return ""
    digest = tokenizer_digest(Path(folder), hf_tokenizer)[:12]
    return f"{type(hf_tokenizer).__name__}:{digest}"


def load(spec: ModelSpec, device: str, precision: str) -> OpenClipBackend:
    """Load an open_clip model. WeightsUnavailable with instructions when weights are missing."""
    name = spec.family_name
    register_model_configs(spec.config_dir)
    if open_clip.get_model_config(name) is None:
        nearest = nearest_names(name, open_clip.list_models())
        guess = f"Did you mean {' or '.join(nearest)}? " if nearest else ""
        raise WeightsUnavailable(
            f"Unknown model '{name}'. {guess}`clipsearch models` lists the recommended models, "
            "open_clip.list_models() all of open_clip's (add your own JSON config with "
            "CLIPSEARCH_MODEL_CONFIG_DIR)."
        )
    checkpoint, overrides = resolve_weights(spec)
    _require_hub_files(spec)
    if checkpoint is None:
        log.warning(
            "Model %s has RANDOM weights (pretrained=%r): embeddings carry no meaning.",
            name,
            spec.pretrained,
        )
        # Seeded, so that random-init runs (benchmarks, demos, training) are reproducible.
        torch.manual_seed(spec.seed)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name,
            pretrained=checkpoint,
            precision=precision,
            device=device,
            cache_dir=str(spec.cache_dir) if spec.cache_dir else None,
            # A Hugging Face text tower (XLM-R, NLLB) gets its weights from the checkpoint, and
            # random weights mean random: never the tower's base weights from the hub.
            pretrained_text=False,
            **overrides,
        )
    except (RuntimeError, KeyError, ValueError, OSError) as exc:
        raise WeightsUnavailable(
            weights_help(spec, f"open_clip could not load them ({str(exc)[:300]}).")
        ) from None
    model.eval()
    try:
        tokenizer = open_clip.get_tokenizer(
            name, cache_dir=str(spec.cache_dir) if spec.cache_dir else None
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        folder = dict(hf_names(name)).get("hf_tokenizer_name", name)
        raise WeightsUnavailable(
            f"Model {name}: cannot read its tokenizer {folder} ({str(exc)[:300]}). Copy the "
            "model's tokenizer files (tokenizer.save_pretrained(folder) writes them) there."
        ) from None
    visual: Any = model.visual
    image_size = visual.image_size
    with torch.inference_mode():
        probe = model.encode_text(tokenizer(["probe"]).to(device))
    identity = ModelIdentity(
        name=name,
        pretrained=spec.pretrained,
        weights_sha256=sha256_file(checkpoint) if checkpoint else f"random-init-seed{spec.seed}",
        dim=int(probe.shape[-1]),
        image_size=int(image_size[0] if isinstance(image_size, tuple | list) else image_size),
        mean=tuple(float(v) for v in getattr(visual, "image_mean", None) or OPENAI_MEAN),
        std=tuple(float(v) for v in getattr(visual, "image_std", None) or OPENAI_STD),
        family=OPEN_CLIP,
        tokenizer=_tokenizer_identity(name, tokenizer),
    )
    return OpenClipBackend(model, preprocess, tokenizer, identity=identity)

"""open_clip models: OpenAI and LAION CLIPs, multilingual (XLM-R, NLLB text towers), SigLIP."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import open_clip
import torch
from open_clip.transformer import text_global_pool

from retrieval.errors import WeightsUnavailable
from retrieval.models.backend import ModelBackend, ScoreRule, TokenBatch
from retrieval.models.identity import OPEN_CLIP, ModelIdentity, ModelSpec
from retrieval.models.weights import (
    host_resolves,
    register_model_configs,
    resolve_weights,
    sha256_file,
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
        if trim and self.trims_exactly():
            return self._encode_trimmed(tokens.ids)
        return self.model.encode_text(tokens.ids)  # type: ignore[operator]

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
        model = self.model
        return (
            isinstance(model, open_clip.CLIP)
            and getattr(model, "attn_mask", None) is not None
            and getattr(model, "text_pool_type", "argmax") in ("argmax", "eos")
            and isinstance(self.tokenizer, open_clip.tokenizer.SimpleTokenizer)
        )

    def _encode_trimmed(self, tokens: torch.Tensor) -> torch.Tensor:
        # The text tower's attention mask is causal and pooling reads the EOT position,
        # so padding after the longest real sequence never influences the result: running
        # only up to that length gives identical features for a fraction of the cost.
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


def _hub_repos(name: str) -> list[str]:
    """Hugging Face repos a model reads at creation: an HF tokenizer or HF text tower's config
    (SigLIP, XLM-R and NLLB models); their weights come with the checkpoint."""
    text_cfg = (open_clip.get_model_config(name) or {}).get("text_cfg", {})
    repos = [text_cfg.get("hf_tokenizer_name"), text_cfg.get("hf_model_name")]
    return list(dict.fromkeys(r for r in repos if r and not os.path.isdir(r)))


def _require_hub_files(spec: ModelSpec) -> None:
    """Fail in seconds, with instructions, when a repo the model needs is neither cached nor
    reachable: transformers would otherwise retry for half a minute and raise its own error."""
    from huggingface_hub import snapshot_download

    for repo in _hub_repos(spec.family_name):
        try:
            snapshot_download(
                repo,
                cache_dir=str(spec.cache_dir) if spec.cache_dir else None,
                local_files_only=True,
            )
            continue
        except Exception:  # noqa: BLE001 - any failure here means "not cached"
            pass
        if host_resolves("https://huggingface.co"):
            continue  # open_clip downloads it
        raise WeightsUnavailable(
            f"Model {spec.family_name} needs the Hugging Face files of {repo} (its tokenizer "
            "or text tower), which are not in the local cache, and the hub is unreachable.\n"
            "On a machine with internet access, run\n"
            f'    python -c "from huggingface_hub import snapshot_download; '
            f"snapshot_download('{repo}')\"\n"
            "then copy its cache folder (~/.cache/huggingface/hub/models--"
            f"{repo.replace('/', '--')}) into the same place here (or under $HF_HOME/hub, or "
            "CLIPSEARCH_MODEL_CACHE_DIR when that is set)."
        )


def load(spec: ModelSpec, device: str, precision: str) -> OpenClipBackend:
    """Load an open_clip model. WeightsUnavailable with instructions when weights are missing."""
    name = spec.family_name
    register_model_configs(spec.config_dir)
    if open_clip.get_model_config(name) is None:
        known = ", ".join(open_clip.list_models()[:12])
        raise WeightsUnavailable(
            f"Unknown model '{name}'. Known models include: {known}, ... "
            "(add your own JSON config with CLIPSEARCH_MODEL_CONFIG_DIR)."
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
            **overrides,
        )
    except (RuntimeError, KeyError, ValueError, OSError) as exc:
        raise WeightsUnavailable(
            weights_help(spec, f"open_clip could not load them ({str(exc)[:300]}).")
        ) from None
    model.eval()
    tokenizer = open_clip.get_tokenizer(
        name, cache_dir=str(spec.cache_dir) if spec.cache_dir else None
    )
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
    )
    return OpenClipBackend(model, preprocess, tokenizer, identity=identity)

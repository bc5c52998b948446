"""What an export records besides its graphs, read off the loaded torch model when it is made:
the preprocessing steps, the tokenizer (its files copied into the export), how texts are
trimmed, and the score rule. Imported by the exporter only: it needs torch and the family's
package."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from retrieval.models.backend import ModelBackend
from retrieval.models.exported.preprocess import INTERPOLATIONS, ImagePreprocess
from retrieval.models.weights import sha256_file

TOKENIZER_DIR = "tokenizer"


class NotPortable(ValueError):
    """A part of the model that only its torch backend can run (the export still serves it
    where torch is installed)."""


def _size(value: Any) -> list[int]:
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def image_steps(transform: Any) -> list[dict[str, Any]]:
    """The steps of a torchvision Compose as `ImagePreprocess` replays them; NotPortable for a
    transform it does not know."""
    from torchvision import transforms as T

    steps: list[dict[str, Any]] = []
    for step in getattr(transform, "transforms", None) or [transform]:
        name = type(step).__name__
        if type(step) is T.Resize:
            mode = step.interpolation.value
            if mode not in INTERPOLATIONS:
                raise NotPortable(f"resize interpolation {mode}")
            steps.append(
                {
                    "op": "resize",
                    "size": _size(step.size),
                    "interpolation": mode,
                    "max_size": step.max_size,
                }
            )
        elif type(step) is T.CenterCrop:
            steps.append({"op": "center_crop", "size": _size(step.size)})
        elif name == "MaybeConvertMode":  # open_clip's: convert(mode) of a PIL image
            steps.append({"op": "convert", "mode": str(step.mode)})
        elif type(step) is T.ToTensor or name == "MaybeToTensor":
            steps.append({"op": "to_array"})
        elif type(step) is T.Normalize:
            steps.append(
                {
                    "op": "normalize",
                    "mean": [float(v) for v in step.mean],
                    "std": [float(v) for v in step.std],
                }
            )
        elif callable(step) and getattr(step, "__name__", "") in (
            "_convert_to_rgb",
            "_convert_image_to_rgb",
        ):
            steps.append({"op": "rgb"})
        else:
            raise NotPortable(f"the image transform step {name}")
    ImagePreprocess(steps)  # every step known
    return steps


def _clean_name(function: Any) -> str:
    name = getattr(function, "__name__", "")
    cleaners = {
        "_clean_lower": "lower",
        "_clean_whitespace": "whitespace",
        "_clean_canonicalize": "canonicalize",
    }
    if name not in cleaners:
        raise NotPortable(f"the text cleaning {name or function!r}")
    return cleaners[name]


def _save_fast_tokenizer(tokenizer: Any, out: Path) -> dict[str, Any]:
    """tokenizer.json of a transformers fast tokenizer, with its padding and truncation taken
    off (the reader sets its own), and what the reader needs to pad and cut as it does."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise NotPortable(f"the slow tokenizer {type(tokenizer).__name__}")
    data = json.loads(backend.to_str())
    data["padding"] = None
    data["truncation"] = None
    (out / TOKENIZER_DIR).mkdir(exist_ok=True)
    (out / TOKENIZER_DIR / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    if tokenizer.pad_token_id is None:
        raise NotPortable(f"{type(tokenizer).__name__} has no padding token")
    return {
        "kind": "hf",
        "files": [f"{TOKENIZER_DIR}/tokenizer.json"],
        "pad_id": int(tokenizer.pad_token_id),
        "pad_token": str(tokenizer.pad_token),
        "padding_side": str(getattr(tokenizer, "padding_side", "right")),
        "truncation_side": str(getattr(tokenizer, "truncation_side", "right")),
    }


def _open_clip_text(backend: Any, out: Path) -> dict[str, Any]:
    import open_clip
    from open_clip import tokenizer as oc_tokenizer

    tokenizer = backend.tokenizer
    if isinstance(tokenizer, oc_tokenizer.SimpleTokenizer):
        if tokenizer.reduction_fn is not None:
            raise NotPortable("a tokenizer with a reduction mask")
        names = [tokenizer.decoder[i] for i in tokenizer.all_special_ids]
        (out / TOKENIZER_DIR).mkdir(exist_ok=True)
        shutil.copyfile(oc_tokenizer.default_bpe(), out / TOKENIZER_DIR / "bpe_simple_vocab.txt.gz")
        spec: dict[str, Any] = {
            "kind": "clip_bpe",
            "files": [f"{TOKENIZER_DIR}/bpe_simple_vocab.txt.gz"],
            "context_length": int(tokenizer.context_length),
            "clean": _clean_name(tokenizer.clean_fn),
            "extra_special": names[2:],
        }
    elif isinstance(tokenizer, oc_tokenizer.HFTokenizer):
        if tokenizer.tokenizer_mode:
            raise NotPortable(f"the tokenizer mode {tokenizer.tokenizer_mode}")
        spec = _save_fast_tokenizer(tokenizer.tokenizer, out)
        spec["context_length"] = int(tokenizer.context_length)
        spec["clean"] = _clean_name(tokenizer.clean_fn)
        if tokenizer.strip_sep_token:
            spec["strip_sep_id"] = int(tokenizer.tokenizer.sep_token_id)
    elif isinstance(tokenizer, oc_tokenizer.SigLipTokenizer):
        spec = _save_fast_tokenizer(tokenizer.tokenizer, out)
        spec["context_length"] = int(tokenizer.context_length)
        spec["clean"] = "canonicalize"
    else:
        raise NotPortable(f"the tokenizer {type(tokenizer).__name__}")
    if backend._causal_tower():
        spec["trim"] = {"rule": "nonzero"}
    elif (pad := backend._masked_hf_tower()) is not None:
        spec["trim"] = {"rule": "pad", "pad_id": pad}
    else:
        spec["trim"] = {"rule": "none"}
    del open_clip
    return spec


def _chinese_clip_text(backend: Any, out: Path) -> dict[str, Any]:
    from cn_clip.clip.bert_tokenizer import default_vocab

    from retrieval.models.families.chinese_clip import CONTEXT_LENGTH

    (out / TOKENIZER_DIR).mkdir(exist_ok=True)
    shutil.copyfile(default_vocab(), out / TOKENIZER_DIR / "vocab.txt")
    return {
        "kind": "bert",
        "files": [f"{TOKENIZER_DIR}/vocab.txt"],
        "context_length": CONTEXT_LENGTH,
        "trim": {"rule": "pad", "pad_id": int(backend.pad_id)},
    }


def _hf_text(backend: Any, out: Path) -> dict[str, Any]:
    spec = _save_fast_tokenizer(backend.tokenizer, out)
    spec["context_length"] = int(backend.context_length)
    spec["mask"] = bool(backend.architecture.masked)
    if not backend.trims_exactly():
        spec["trim"] = {"rule": "none"}
    else:
        trim: dict[str, Any] = {"rule": "mask"}
        if backend.architecture.pooling == "eos":
            trim["eos_id"] = int(backend.model.config.text_config.eos_token_id)
        spec["trim"] = trim
    return spec


def portable_parts(backend: ModelBackend, out: Path) -> dict[str, Any]:
    """The manifest's `portable` section: what runs the export without torch (tokenizer files
    copied into `out`), or the reason it cannot (`why`)."""
    from retrieval.models.identity import CN_CLIP, HF, OPEN_CLIP

    family = backend.identity.family
    rule = backend.score_rule()
    parts: dict[str, Any] = {
        "score": {"logit_scale": rule.logit_scale, "logit_bias": rule.logit_bias},
    }
    try:
        if family == HF:
            # transformers' image processors resize in torch (its fast processors); nothing
            # here replays that exactly.
            raise NotPortable("a transformers image processor")
        parts["preprocess"] = image_steps(backend.preprocess)
        text = {OPEN_CLIP: _open_clip_text, CN_CLIP: _chinese_clip_text, HF: _hf_text}[family]
        parts["text"] = text(backend, out)
    except NotPortable as exc:
        shutil.rmtree(out / TOKENIZER_DIR, ignore_errors=True)
        return {"why": f"{exc} runs in torch only"}
    parts["files"] = {
        f"{TOKENIZER_DIR}/{path.name}": {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        for path in sorted((out / TOKENIZER_DIR).iterdir())
    }
    return parts

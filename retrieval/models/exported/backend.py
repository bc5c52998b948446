"""A model loaded from its ONNX export alone: the backend of an encoder that runs without torch.

Everything the service asks of a backend comes from the export: the preprocessing steps
(`preprocess`), the tokenizer over its copied files and the trimming rule (`text`), the score
rule, and the identity. The towers are run by `OnnxRuntime` over the export's graphs; training
and exporting need the torch backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import ConfigError, ExportUnusable
from retrieval.models.backend import ExportTowers, ModelBackend, ScoreRule, TokenBatch
from retrieval.models.exported import text
from retrieval.models.exported.preprocess import ImagePreprocess, PreprocessUnsupported
from retrieval.models.identity import ModelIdentity
from retrieval.models.runtimes.onnx_store import REBUILD_ADVICE, ExportManifest
from retrieval.models.runtimes.packages import torch_missing
from retrieval.models.weights import sha256_file

PORTABLE = "portable"  # the manifest section of what runs the export without torch


def portable_section(manifest: ExportManifest) -> dict[str, Any] | None:
    """The export's `portable` section; None when it has none or says why it cannot have one."""
    section = manifest.extra.get(PORTABLE)
    if not isinstance(section, dict) or "why" in section:
        return None
    return section


def needs_torch(purpose: str) -> ConfigError:
    return torch_missing("CLIPSEARCH_RUNTIME", f"{purpose} (this model runs from its export)")


class ExportBackend(ModelBackend):
    """An export's preprocessing, tokenizer and score rule; its towers run in `OnnxRuntime`."""

    def __init__(self, folder: Path, manifest: ExportManifest, identity: ModelIdentity) -> None:
        section = portable_section(manifest)
        if section is None:
            raise ExportUnusable(
                str(folder), "it has no preprocessing or tokenizer", REBUILD_ADVICE
            )
        check_portable_files(folder, section)
        try:
            preprocess = ImagePreprocess(section["preprocess"])
            self.text = dict(section["text"])
            self.tokenizer = text.open_tokenizer(folder, self.text)
            score = section["score"]
            self.rule = ScoreRule(
                float(score["logit_scale"]),
                None if score.get("logit_bias") is None else float(score["logit_bias"]),
            )
        except (KeyError, TypeError, ValueError, OSError, PreprocessUnsupported) as exc:
            raise ExportUnusable(
                str(folder), f"its {PORTABLE} section cannot be used ({exc})", REBUILD_ADVICE
            ) from None
        super().__init__(None, preprocess, identity)  # type: ignore[arg-type]
        self.folder = folder
        self.manifest = manifest

    def tokenize(self, texts: Sequence[str]) -> TokenBatch:
        tokens: TokenBatch = self.tokenizer(texts)
        return tokens

    def trimmed(self, tokens: TokenBatch) -> TokenBatch:
        return text.trimmed(tokens, self.text.get("trim") or {})

    def trims_exactly(self) -> bool:
        return (self.text.get("trim") or {}).get("rule", "none") != "none"

    def stack(self, pixels: Sequence[Any]) -> np.ndarray:
        return np.stack(list(pixels)).astype(np.float32, copy=False)

    def score_rule(self) -> ScoreRule:
        return self.rule

    def encode_image(self, pixels: Any) -> Any:
        raise needs_torch("running a tower outside its ONNX Runtime session")

    def encode_text(self, tokens: TokenBatch, *, trim: bool) -> Any:
        raise needs_torch("running a tower outside its ONNX Runtime session")

    def export_towers(self) -> ExportTowers:
        raise needs_torch("exporting a model")

    def tower(self, parameter: str) -> str:
        raise needs_torch("fine-tuning")


def check_portable_files(folder: Path, section: dict[str, Any]) -> None:
    """ExportUnusable unless each tokenizer file is there with its recorded size and sha256."""
    for name, record in (section.get("files") or {}).items():
        path = folder / name
        if not path.is_file():
            raise ExportUnusable(str(folder), f"{name} is missing", REBUILD_ADVICE)
        if path.stat().st_size != record.get("bytes") or sha256_file(path) != record.get("sha256"):
            raise ExportUnusable(
                str(folder), f"{name}: size or sha256 differs from its manifest", REBUILD_ADVICE
            )

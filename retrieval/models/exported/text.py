"""A model's tokenizer and text trimming as data (an export's `text` section), run without torch.

Tokenizers (`kind`), each reading files copied into the export:
- `clip_bpe`: open_clip's CLIP tokenizer (`clip_bpe.ClipBpeTokenizer`) over its merges file;
- `hf`: a Hugging Face fast tokenizer's `tokenizer.json`, run by the `tokenizers` library with
  the truncation and padding transformers sets on it (open_clip's HF wrapper first cleans the
  text, and may blank out the separator);
- `bert`: Chinese-CLIP's BERT word pieces over its `vocab.txt`: [CLS], the pieces cut to the
  context less two, [SEP], padded with 0.

Trimming (`trim`), the fewest leading columns that give the same features as the full context:
`nonzero` (open_clip's causal tower: the longest row's real tokens), `pad` (every column after
the last that is not padding in some row), `mask` (after the last real position of the mask,
keeping the pooled EOS position), or `none` (a tower that reads its padding, SigLIP's).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.models.backend import TokenBatch
from retrieval.models.exported.clip_bpe import ClipBpeTokenizer, clean

TOKENIZER_KINDS = ("clip_bpe", "hf", "bert")
TRIMS = ("nonzero", "pad", "mask", "none")


class HfTokenizer:
    """A `tokenizers` Tokenizer from tokenizer.json, padded and cut to the context as the
    transformers tokenizer that saved it pads and cuts (`padding="max_length"`)."""

    def __init__(self, path: Path, spec: dict[str, Any]) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(path))
        self.context_length = int(spec["context_length"])
        self.tokenizer.enable_truncation(
            self.context_length,
            strategy=spec.get("truncation_strategy", "longest_first"),
            direction=spec.get("truncation_side", "right"),
        )
        self.tokenizer.enable_padding(
            direction=spec.get("padding_side", "right"),
            pad_id=int(spec["pad_id"]),
            pad_token=str(spec["pad_token"]),
            length=self.context_length,
        )
        self.clean = spec.get("clean")  # open_clip's wrapper cleans first; transformers doesn't
        self.strip_sep = spec.get("strip_sep_id")
        self.mask = bool(spec.get("mask"))
        # A Rust tokenizer is not to be called from two threads at once ("Already borrowed").
        self._lock = threading.Lock()

    def __call__(self, texts: Sequence[str]) -> TokenBatch:
        if self.clean:
            texts = [clean(text, self.clean) for text in texts]
        with self._lock:
            encodings = self.tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64).reshape(len(texts), -1)
        if self.strip_sep is not None:
            ids = np.where(ids == int(self.strip_sep), 0, ids)
        mask = None
        if self.mask:
            mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
            mask = mask.reshape(len(texts), -1)
        return TokenBatch(ids, mask)


class BertTokenizer:
    """Chinese-CLIP's tokenizer: BERT's basic split (lower case, accents stripped, each CJK
    character alone, punctuation apart) and word pieces of at most 200 characters."""

    def __init__(self, vocab: Path, spec: dict[str, Any]) -> None:
        from tokenizers import Tokenizer, normalizers, pre_tokenizers
        from tokenizers.models import WordPiece

        self.context_length = int(spec["context_length"])
        # One token a line, as BERT's reader takes them: `readline` (only "\n" ends a line, not
        # the other breaks `splitlines` knows), stripped; a repeated token keeps its last line.
        lines = vocab.read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        vocabulary = {line.strip(): n for n, line in enumerate(lines)}
        self.cls, self.sep = vocabulary["[CLS]"], vocabulary["[SEP]"]
        tokenizer = Tokenizer(
            WordPiece(vocabulary, unk_token="[UNK]", max_input_chars_per_word=200)
        )
        tokenizer.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=True, lowercase=True
        )
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        self.tokenizer = tokenizer
        self._lock = threading.Lock()

    def __call__(self, texts: Sequence[str]) -> TokenBatch:
        with self._lock:
            encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        rows = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for n, encoding in enumerate(encodings):
            ids = [self.cls, *encoding.ids[: self.context_length - 2], self.sep]
            rows[n, : len(ids)] = ids
        return TokenBatch(rows)


class ClipTokenizer:
    def __init__(self, merges: Path, spec: dict[str, Any]) -> None:
        self.bpe = ClipBpeTokenizer(
            merges,
            int(spec["context_length"]),
            clean=str(spec.get("clean", "lower")),
            extra_special=tuple(spec.get("extra_special", ())),
        )

    def __call__(self, texts: Sequence[str]) -> TokenBatch:
        return TokenBatch(self.bpe(texts))


def open_tokenizer(folder: Path, spec: dict[str, Any]) -> Any:
    """The tokenizer an export's `text` section describes, over the files it copied."""
    kind = spec.get("kind")
    files = spec.get("files") or []
    if kind not in TOKENIZER_KINDS or not files:
        raise ValueError(f"unknown tokenizer {kind!r}")
    path = folder / files[0]
    if kind == "clip_bpe":
        return ClipTokenizer(path, spec)
    if kind == "bert":
        return BertTokenizer(path, spec)
    return HfTokenizer(path, spec)


def trimmed(tokens: TokenBatch, trim: dict[str, Any]) -> TokenBatch:
    """The fewest leading columns of `tokens` that give the features of all of them."""
    rule = trim.get("rule", "none")
    ids = tokens.ids
    if rule == "nonzero":
        return tokens.columns(max(1, int((ids != 0).sum(axis=1).max(initial=0))))
    if rule == "pad":
        real = np.flatnonzero((ids != int(trim["pad_id"])).any(axis=0))
        return tokens.columns(int(real.max()) + 1 if len(real) else 1)
    if rule == "mask" and tokens.mask is not None:
        positions = np.arange(ids.shape[1])
        last = int((positions * (tokens.mask != 0)).max(initial=0))
        eos = trim.get("eos_id")
        if eos is not None:
            if int(eos) == 2:  # CLIPTextModel's rule for old configs: the highest id
                pooled = ids.argmax(axis=-1)
            else:
                pooled = (ids == int(eos)).astype(np.int32).argmax(axis=-1)
            last = max(last, int(pooled.max(initial=0)))
        return tokens.columns(last + 1)
    return tokens

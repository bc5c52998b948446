"""open_clip's CLIP tokenizer over its BPE merges file, without torch.

The text is cleaned as open_clip cleans it (ftfy, HTML entities twice, whitespace, and by
default lower case), split by the same pattern, each piece's UTF-8 bytes mapped to printable
characters and merged pair by pair in the order of the merges file. Ids are a start token, the
pieces' ids, an end token, cut to the context (the last kept id then becomes the end token) and
padded with 0.
"""

from __future__ import annotations

import gzip
import html
import string
import threading
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import ftfy
import numpy as np
import regex

START, END = "<start_of_text>", "<end_of_text>"
MERGES = 49152 - 256 - 2  # how many merges of the file open_clip's vocabulary takes
CLEANERS = ("lower", "whitespace", "canonicalize")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


@lru_cache(maxsize=1)
def byte_characters() -> dict[int, str]:
    """Each byte as one printable character: printable Latin-1 bytes as themselves, the rest as
    the characters from U+0100 on, in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def clean(text: str, how: str) -> str:
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    if how == "canonicalize":
        text = text.replace("_", " ").translate(_PUNCTUATION).lower()
    text = " ".join(text.split()).strip()
    return text.lower() if how == "lower" else text


class ClipBpeTokenizer:
    """Token ids of texts as open_clip's `SimpleTokenizer` gives them (thread-safe)."""

    def __init__(
        self,
        merges_file: Path,
        context_length: int,
        clean: str = "lower",
        extra_special: Sequence[str] = (),
    ) -> None:
        if clean not in CLEANERS:
            raise ValueError(f"unknown text cleaning {clean!r}")
        lines = gzip.open(merges_file).read().decode("utf-8").split("\n")[1 : MERGES + 1]
        merges = [tuple(line.split()) for line in lines]
        characters = list(byte_characters().values())
        vocabulary = characters + [c + "</w>" for c in characters]
        vocabulary += ["".join(pair) for pair in merges]
        specials = [START, END, *extra_special]
        vocabulary += specials
        self.ids = {token: n for n, token in enumerate(vocabulary)}
        self.ranks = {pair: n for n, pair in enumerate(merges)}
        self.start, self.end = self.ids[START], self.ids[END]
        self.context_length = context_length
        self.clean = clean
        self.specials = set(specials)
        self.pattern = regex.compile(
            "|".join(regex.escape(token) for token in specials)
            + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )
        self._pieces: dict[str, list[int]] = {}
        self._lock = threading.Lock()

    def _merge(self, piece: str) -> list[str]:
        """The BPE symbols of one piece (already mapped to byte characters)."""
        symbols = [*piece[:-1], piece[-1] + "</w>"]
        while len(symbols) > 1:
            best, best_rank = None, None
            for pair in zip(symbols, symbols[1:], strict=False):
                rank = self.ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best, best_rank = pair, rank
            if best is None:
                break
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def _piece_ids(self, piece: str) -> list[int]:
        with self._lock:
            known = self._pieces.get(piece)
        if known is not None:
            return known
        if piece in self.specials:
            ids = [self.ids[piece]]
        else:
            table = byte_characters()
            mapped = "".join(table[b] for b in piece.encode("utf-8"))
            ids = [self.ids[symbol] for symbol in self._merge(mapped)]
        with self._lock:
            if len(self._pieces) < 100_000:
                self._pieces[piece] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """The ids of a text's pieces, without start and end tokens."""
        ids: list[int] = []
        for piece in self.pattern.findall(clean(text, self.clean)):
            ids += self._piece_ids(piece)
        return ids

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        rows = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for n, text in enumerate(texts):
            ids = [self.start, *self.encode(text), self.end]
            if len(ids) > self.context_length:
                ids = ids[: self.context_length]
                ids[-1] = self.end
            rows[n, : len(ids)] = ids
        return rows

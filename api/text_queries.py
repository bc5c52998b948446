"""Query text -> embedding: the LRU cache first, then the micro-batcher or a direct encode."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from starlette.concurrency import run_in_threadpool

from api.batching import MicroBatcher
from api.query_cache import EmbeddingCache
from retrieval.models.encoder import Encoder


class TextQueryEncoder:
    def __init__(
        self, encoder: Encoder, cache: EmbeddingCache, batcher: MicroBatcher | None
    ) -> None:
        self.encoder = encoder
        self.cache = cache
        self.batcher = batcher

    def encode_batch(self, texts: Sequence[str]) -> np.ndarray:
        return self.encoder.encode_texts(list(texts))

    async def embed(self, text: str) -> tuple[np.ndarray, bool]:
        """The embedding of `text` (already validated), and whether it came from the cache."""
        cached = self.cache.get(text)
        if cached is not None:
            return cached, True
        if self.batcher is not None:
            vector = await self.batcher.encode(text)
        else:
            vector = (await run_in_threadpool(self.encode_batch, [text]))[0]
        self.cache.put(text, vector)
        return vector, False

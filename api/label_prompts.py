"""Class embeddings for POST /classify: bounded in cost, encoded through the micro-batcher and
cached prompt by prompt, so repeated and overlapping label lists cost nothing twice."""

from __future__ import annotations

import numpy as np
from starlette.concurrency import run_in_threadpool

from api.batching import MicroBatcher
from api.query_cache import EmbeddingCache
from retrieval.labels.definitions import LabelSet
from retrieval.labels.scoring import ClassEmbeddings
from retrieval.labels.store import LabelStore, StoredLabelSet
from retrieval.models.encoder import Encoder
from retrieval.models.prompts import group_means

MAX_PROMPTS_SETTING = "CLIPSEARCH_CLASSIFY_MAX_PROMPTS"


class PromptEmbedder:
    """Prompts -> class embeddings for one encoder: at most `max_prompts` encoded per request.

    The cache is keyed by the model's identity and the prompt's text. Prompts go through the
    micro-batcher behind any waiting search query (or straight to the model when batching is
    off), never in a thread of their own beside it.
    """

    def __init__(
        self,
        encoder: Encoder,
        cache: EmbeddingCache,
        batcher: MicroBatcher | None,
        max_prompts: int,
    ) -> None:
        self.encoder = encoder
        self.cache = cache
        self.batcher = batcher
        self.max_prompts = max_prompts

    def _key(self, prompt: str) -> str:
        return f"{self.encoder.identity.key}\n{prompt}"

    async def inline(self, label_set: LabelSet) -> ClassEmbeddings:
        """Class embeddings of a definition sent with the request (never stored)."""
        label_set.require_prompts_within(self.max_prompts, MAX_PROMPTS_SETTING)
        return await self._embed(label_set)

    async def stored(self, store: LabelStore, stored: StoredLabelSet) -> ClassEmbeddings:
        """A stored set's class embeddings: from the catalog, or encoded once and saved there.

        A set too large to encode within one request's limit must have been encoded by
        `clipsearch label` (which saves them) before /classify can use it.
        """
        key = self.encoder.identity.key
        found = await run_in_threadpool(store.cached_embeddings, stored.version_id, key)
        if found is not None:
            return found
        stored.definition.require_prompts_within(
            self.max_prompts,
            MAX_PROMPTS_SETTING,
            "; its class embeddings for this model are not stored yet: run `clipsearch label` "
            "once to encode and store them",
        )
        found = await self._embed(stored.definition)
        await run_in_threadpool(store.save_embeddings, stored.version_id, key, found)
        return found

    async def _embed(self, label_set: LabelSet) -> ClassEmbeddings:
        groups = label_set.prompt_groups()
        vectors: dict[str, np.ndarray] = {}
        missing: list[str] = []
        for prompt in dict.fromkeys(p for group in groups for p in group):
            cached = self.cache.get(self._key(prompt))
            if cached is None:
                missing.append(prompt)
            else:
                vectors[prompt] = cached
        if missing:
            if self.batcher is not None:
                encoded = await self.batcher.encode_many(missing)
            else:
                encoded = await run_in_threadpool(self.encoder.encode_texts_batched, missing)
            for prompt, vector in zip(missing, encoded, strict=True):
                vectors[prompt] = vector
                self.cache.put(self._key(prompt), vector)
        rows = np.stack([vectors[prompt] for group in groups for prompt in group])
        rule = self.encoder.score_rule
        return ClassEmbeddings(
            group_means(rows, [len(group) for group in groups]),
            float(rule.logit_scale),
            rule.logit_bias,
        )

"""The heavy objects one API process holds, built once in the lifespan and kept on app.state."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from starlette.concurrency import run_in_threadpool

from api.admission import Gate
from api.label_prompts import PromptEmbedder
from api.metrics import Metrics
from api.security import KeyRing
from api.text_queries import TextQueryEncoder
from retrieval.catalog.database import Catalog
from retrieval.config import Settings
from retrieval.errors import (
    CatalogMismatch,
    CatalogSchemaMismatch,
    CatalogUnreadable,
    NoCatalog,
)
from retrieval.models.encoder import Encoder
from retrieval.search import Searcher

log = logging.getLogger(__name__)

# What makes the API unready instead of serving: the catalog was removed, replaced or reset under
# it (or belongs to another index dir), there is none yet, it needs `clipsearch db upgrade`, or
# the database answers with an error. Each says why in /ready, and the poller recovers from it.
CATALOG_PROBLEMS = (CatalogMismatch, NoCatalog, CatalogSchemaMismatch, CatalogUnreadable)


def unready_code(exc: Exception) -> str:
    """What a request is told while the catalog is in this state."""
    return "no_catalog" if isinstance(exc, NoCatalog) else "not_ready"


@dataclass
class Services:
    settings: Settings
    catalog: Catalog
    encoder: Encoder
    searcher: Searcher
    text_encoder: TextQueryEncoder
    metrics: Metrics
    keys: KeyRing
    prompts: PromptEmbedder  # /classify's class embeddings (bounded, batched, cached)
    decode_slots: Gate  # uploads and thumbnails decoded (and encoded) at once
    ready: bool = False
    last_reload_error: str | None = None
    # Why nothing may be served although the process is up (one of CATALOG_PROBLEMS). Cleared
    # when there is a readable catalog again, and it and the index dir agree.
    unready_reason: str | None = None
    # The code a request gets while unready: `no_catalog` before the first index (the page
    # then says "No index yet"), else `not_ready`.
    unready_code: str = "not_ready"
    _reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def allowed_roots(self) -> list[str]:
        """Configured roots plus every root an index job has recorded."""
        roots = {str(r) for r in self.settings.roots}
        for job in self.catalog.jobs(limit=1000):
            roots.update(str(r) for r in (job.roots or []))
        return sorted(roots)

    @property
    def serving(self) -> bool:
        """Started, not stopping, and reading a catalog that still belongs to the index dir."""
        return self.ready and self.unready_reason is None

    async def reload(self, force: bool = False) -> bool:
        """Swap in the catalog's newest generation (off the event loop). True if swapped."""
        async with self._reload_lock:
            started = time.perf_counter()
            try:
                swapped = await run_in_threadpool(self.searcher.refresh, force)
            except CATALOG_PROBLEMS as exc:
                if self.unready_reason != str(exc):
                    log.error("not ready, serving nothing: %s", exc)
                self.unready_reason = str(exc)
                self.unready_code = unready_code(exc)
                raise
            if self.unready_reason is not None:
                log.warning(
                    "ready again: the catalog and the index dir hold the same index "
                    "(generation %d)",
                    self.searcher.snapshot().generation,
                )
                self.unready_reason = None
            if swapped:
                self.metrics.inc("clipsearch_reloads_total", "Index generations swapped in.")
                self.metrics.observe(
                    "clipsearch_reload_duration_seconds",
                    "Time to open a new generation's shards.",
                    time.perf_counter() - started,
                )
                log.info("serving index generation %d", self.searcher.snapshot().generation)
            return swapped

    async def poll_generations(self, interval: float) -> None:
        """Background task: follow the catalog's generation until cancelled."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reload()
                self.last_reload_error = None
            except asyncio.CancelledError:
                raise
            except CATALOG_PROBLEMS:
                pass  # unready; `reload` logged the reason once, and logs the recovery
            except Exception as exc:  # keep serving the current generation
                self.last_reload_error = str(exc)
                log.warning("index reload failed; still serving the previous generation: %s", exc)

"""Engines: what turns the index job's list of files to encode into blocks of vectors."""

# The driver (`indexer.pipeline.IndexJob`) keeps the lock, the scan and diff, id assignment, the
# shard writes and every catalog commit. An engine only decodes and encodes: `local` (DataLoader
# workers and one model in this process) or `ray` (Ray Data decode tasks and an actor pool of
# models, on a cluster). So the commit point, and what a crash can cost, are the same on one
# machine and on many.

from __future__ import annotations

from typing import TYPE_CHECKING

from indexer.engines.base import EncodedBatch, Engine

if TYPE_CHECKING:
    from retrieval.config import Settings

__all__ = ["EncodedBatch", "Engine", "engine_for"]


def engine_for(settings: Settings) -> Engine:
    """The engine the settings name (CLIPSEARCH_ENGINE)."""
    if settings.engine == "ray":
        from indexer.engines.ray import RayEngine

        return RayEngine(settings)
    from indexer.engines.local import LocalEngine

    return LocalEngine(settings)

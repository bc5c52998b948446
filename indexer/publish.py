"""Shard files on the writer's side: a new shard and the record that commits it, and the removal
of shard directories no commit points to (orphans) or that compaction retired long enough ago."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any

import numpy as np

from indexer.binding import claim_index
from retrieval.catalog.database import Catalog
from retrieval.catalog.records import ShardRecord
from retrieval.catalog.tables import utcnow
from retrieval.index.integrity import manifest_digest
from retrieval.index.kinds import IndexParams, choose_params
from retrieval.index.shard import (
    list_shard_dirs,
    new_shard_id,
    remove_shard_dir,
    shard_path,
    write_shard,
)

log = logging.getLogger(__name__)


def write_shard_record(
    index_dir: Path,
    ids: np.ndarray,
    vectors: np.ndarray,
    *,
    kind: str,
    model: dict[str, Any],
    model_key: str,
    use_gpu: bool | None,
    params: IndexParams | None = None,
) -> ShardRecord:
    """Write (and fsync) a new shard of `vectors`, and return the record that commits it.

    The shard is not live until a catalog commit carries the record; a writer killed before
    that leaves an orphan directory, which `cleanup_index_dir` removes. `params` (a repair
    keeps the old shard's) overrides the choice that `kind` makes.
    """
    if params is None:
        params = choose_params(kind, len(ids), vectors.shape[1])
    shard_id = new_shard_id()
    manifest = write_shard(
        index_dir,
        shard_id,
        ids=ids,
        embeddings=vectors,
        params=params,
        model=model,
        use_gpu=use_gpu,
    )
    return ShardRecord(
        id=shard_id,
        kind=manifest.kind,
        count=manifest.count,
        dim=manifest.dim,
        params=manifest.params,
        model_key=model_key,
        bytes=sum(int(f.get("bytes", 0)) for f in manifest.files.values()),
        manifest_sha256=manifest_digest(shard_path(index_dir, shard_id)),
    )


def cleanup_index_dir(catalog: Catalog, index_dir: Path, grace_seconds: float) -> list[str]:
    """Delete orphan shard dirs (no catalog row) and retired shards past the grace period.

    Must run under the IndexLock: an uncommitted shard of a live job also has no row. Raises
    CatalogMismatch, deleting nothing, unless this catalog owns index_dir: to a lost or
    another index's catalog every shard looks like an orphan.
    """
    claim_index(catalog, index_dir)
    removed: list[str] = []
    known = catalog.known_shard_ids()
    for shard_id in list_shard_dirs(index_dir):
        if shard_id not in known:
            remove_shard_dir(index_dir, shard_id)
            removed.append(shard_id)
            log.info("removed orphan shard %s (written by a job that did not commit)", shard_id)
    cutoff = utcnow() - dt.timedelta(seconds=grace_seconds)
    expired = catalog.retired_before(cutoff)
    for shard_id in expired:
        remove_shard_dir(index_dir, shard_id)
        removed.append(shard_id)
    if expired:
        catalog.forget_shards(expired)
    return removed

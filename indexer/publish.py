"""Shard files on the writer's side: a new shard and the record that commits it, and the removal
of shard directories no commit points to (orphans) or that compaction retired long enough ago,
of trained templates no active shard names, and of a killed compaction's scratch files."""

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
from retrieval.index.kinds import LARGE_KIND, IndexParams, choose_params
from retrieval.index.shard import (
    ShardManifest,
    list_shard_dirs,
    new_shard_id,
    remove_shard_dir,
    shard_path,
    write_shard,
)
from retrieval.index.trained import list_templates, remove_template

# Scratch files of `compact --kind ivfpq-large` (vectors being folded in), in the index dir.
STAGING_PREFIX = ".compact-staging-"

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
    return shard_record(index_dir, manifest, model_key)


def shard_record(index_dir: Path, manifest: ShardManifest, model_key: str) -> ShardRecord:
    """The catalog record that commits a written shard."""
    shard_id = manifest.shard_id
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
    _cleanup_large(catalog, index_dir)
    return removed


def _cleanup_large(catalog: Catalog, index_dir: Path) -> None:
    """Remove trained templates that no active shard names (a retrain replaced them, or a job
    that trained one did not commit; retired shards hold their own copy of the quantizer), and
    the scratch files of a compaction that was killed."""
    for stale in Path(index_dir).glob(STAGING_PREFIX + "*"):
        stale.unlink(missing_ok=True)
    templates = list_templates(index_dir)
    if not templates:
        return
    named = {
        str(row.params.get("trained_id"))
        for row in catalog.shards()
        if row.kind == LARGE_KIND and row.params
    }
    for trained_id in templates:
        if trained_id not in named:
            remove_template(index_dir, trained_id)
            log.info("removed trained template %s (no active shard names it)", trained_id)

"""`clipsearch compact`: merge small shards and drop tombstoned vectors, from stored embeddings."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from indexer.lock import IndexLock
from indexer.publish import cleanup_index_dir, write_shard_record
from retrieval.catalog.database import Catalog
from retrieval.catalog.records import GenerationCommit
from retrieval.catalog.tables import ShardRow
from retrieval.index.shard import Shard
from retrieval.labels.store import LabelStore
from retrieval.models.identity import ModelIdentity


@dataclass
class CompactReport:
    shards_before: int = 0
    shards_after: int = 0
    merged: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    dropped_vectors: int = 0
    live_vectors: int = 0
    generation: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "seconds": round(self.seconds, 3)}


def compact_index(
    catalog: Catalog,
    index_dir: Path,
    *,
    kind: str = "auto",
    shard_size: int = 100_000,
    merge_all: bool = False,
    grace_seconds: float = 600.0,
    progress: bool | None = None,
    use_gpu: bool | None = None,
) -> CompactReport:
    """Merge small shards and drop tombstoned vectors, from stored embeddings only.

    Candidates: every shard holding tombstones, every shard smaller than half of
    shard_size when there are two or more such, every shard whose kind differs from an
    explicitly requested one, or all with merge_all. Nothing is re-encoded.
    """
    started = time.monotonic()
    report = CompactReport()
    with IndexLock(index_dir):
        catalog.upgrade()
        job_id = catalog.start_job("compact", [])
        try:
            cleanup_index_dir(catalog, index_dir, grace_seconds)
            state = catalog.state()
            shards = catalog.shards()
            report.shards_before = len(shards)
            by_shard = catalog.tombstones_by_shard()
            candidates = _candidates(shards, set(by_shard), kind, shard_size, merge_all)
            if not candidates or state.model is None:
                report.shards_after = len(shards)
                report.generation = state.generation
                catalog.finish_job(job_id, "succeeded", report.to_dict(), state.generation)
                return report
            identity = ModelIdentity.from_dict(state.model)
            ids, vecs, report.dropped_vectors = _live_vectors(
                index_dir, candidates, by_shard, identity.dim, progress
            )
            report.live_vectors = len(ids)
            commit = GenerationCommit(model=state.model)
            for start in range(0, len(ids), shard_size):
                chunk_ids = ids[start : start + shard_size]
                record = write_shard_record(
                    index_dir,
                    chunk_ids,
                    vecs[start : start + shard_size].astype(np.float32),
                    kind=kind,
                    model=state.model,
                    model_key=identity.key,
                    use_gpu=use_gpu,
                )
                commit.new_shards.append(record)
                commit.reassign.extend((int(i), record.id) for i in chunk_ids)
                report.written.append(record.id)
            merged = {row.id for row in candidates}
            commit.purge_ids = [int(i) for shard_id in merged for i in by_shard.get(shard_id, [])]
            commit.retire_shards = sorted(merged)
            report.merged = sorted(merged)
            report.generation = catalog.commit(commit)
            # The merged shards' labels stay valid for the shards written from them. Not in
            # the commit's transaction: if this is lost, the next labelling pass recomputes
            # the same labels for those shards.
            LabelStore(catalog).carry_labelled_shards(report.merged, report.written)
            report.shards_after = len(shards) - len(merged) + len(report.written)
            report.seconds = time.monotonic() - started
            catalog.finish_job(job_id, "succeeded", report.to_dict(), report.generation)
            cleanup_index_dir(catalog, index_dir, grace_seconds)
        except BaseException as exc:
            catalog.finish_job(job_id, "failed", report.to_dict(), None, str(exc))
            raise
    return report


def _candidates(
    shards: list[ShardRow], with_tombstones: set[str], kind: str, shard_size: int, merge_all: bool
) -> list[ShardRow]:
    """The shards a compaction rewrites (see `compact_index`)."""
    small = {row.id for row in shards if row.count < shard_size // 2}
    return [
        row
        for row in shards
        if merge_all
        or row.id in with_tombstones
        or (len(small) >= 2 and row.id in small)
        or (kind != "auto" and row.kind != kind)
    ]


def _live_vectors(
    index_dir: Path,
    rows: list[ShardRow],
    tombstones: dict[str, np.ndarray],
    dim: int,
    progress: bool | None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """The live ids (ascending) and float16 vectors of these shards, and how many vectors of
    theirs were tombstoned (dropped)."""
    live_ids: list[np.ndarray] = []
    live_vecs: list[np.ndarray] = []
    dropped = 0
    for row in tqdm(rows, desc="read shards", unit=" shard", disable=progress is False):
        shard = Shard.open(index_dir, row.id)
        keep = ~np.isin(shard.ids, tombstones.get(row.id, np.zeros(0, dtype=np.int64)))
        dropped += int((~keep).sum())
        live_ids.append(np.asarray(shard.ids[keep], dtype=np.int64))
        live_vecs.append(np.asarray(shard.embeddings[keep], dtype=np.float16))
    ids = np.concatenate(live_ids) if live_ids else np.zeros(0, dtype=np.int64)
    vecs = np.concatenate(live_vecs) if live_vecs else np.zeros((0, dim), np.float16)
    order = np.argsort(ids, kind="stable")
    return ids[order], vecs[order], dropped

"""`clipsearch compact`: merge small shards and drop tombstoned vectors, from stored embeddings."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from indexer.compact_large import LargeOptions, LargeReport, fold_into_large
from indexer.crash import crash_point
from indexer.lock import IndexLock
from indexer.publish import cleanup_index_dir, write_shard_record
from retrieval.catalog.database import Catalog
from retrieval.catalog.records import GenerationCommit
from retrieval.catalog.schema import require_catalog
from retrieval.catalog.tables import ShardRow
from retrieval.index.integrity import ShardExpectation, check_shard
from retrieval.index.kinds import LARGE_KIND
from retrieval.labels.store import LabelStore
from retrieval.models.identity import ModelIdentity

log = logging.getLogger(__name__)


@dataclass
class CompactReport:
    shards_before: int = 0
    shards_after: int = 0
    merged: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    dropped_vectors: int = 0
    live_vectors: int = 0
    # Shards that failed verification: left as they are (never rewritten), with the reason.
    corrupt: dict[str, str] = field(default_factory=dict)
    generation: int = 0
    seconds: float = 0.0
    # kind ivfpq-large: the template, what the fold added and cost, and whether to retrain.
    large: LargeReport | None = None

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
    large: LargeOptions | None = None,
) -> CompactReport:
    """Merge small shards and drop tombstoned vectors, from stored embeddings only.

    With kind `ivfpq-large`, every other shard is folded into large IVF-PQ shards (see
    indexer.compact_large): trained once, then only added to; `large` sets their size and the
    shape of a template trained now (and `retrain` trains a new one, rewriting every shard).

    Candidates: every shard holding tombstones, every shard smaller than half of
    shard_size when there are two or more such, every shard whose kind differs from an
    explicitly requested one, or all with merge_all. Nothing is re-encoded.

    Every candidate is verified first (every file's sha256, and its vectors' contents) no
    matter what any verified mark says: a shard that fails is left out and reported in
    `corrupt`, so corrupt vectors are never rewritten into a new shard with fresh checksums.
    """
    started = time.monotonic()
    report = CompactReport()
    require_catalog(catalog, index_dir)  # never created nor migrated here
    with IndexLock(index_dir):
        job_id = catalog.start_job("compact", [])
        try:
            cleanup_index_dir(catalog, index_dir, grace_seconds)
            state = catalog.state()
            shards = catalog.shards()
            report.shards_before = len(shards)
            by_shard = catalog.tombstones_by_shard()
            if kind == LARGE_KIND and state.model is not None:
                report.large = LargeReport()
                plan = fold_into_large(
                    index_dir,
                    state.model,
                    shards,
                    by_shard,
                    report.large,
                    report.corrupt,
                    options=large or LargeOptions(),
                    use_gpu=use_gpu,
                    progress=progress,
                )
                report.generation = state.generation
                report.shards_after = len(shards)
                if plan is not None:
                    report.dropped_vectors, report.live_vectors = plan.dropped, plan.live
                    report.merged, report.written = sorted(plan.merged), plan.written
                    crash_point("compact_before_commit")
                    report.generation = catalog.commit(plan.commit)
                    crash_point("compact_after_commit")
                    LabelStore(catalog).carry_labelled_shards(report.merged, report.written)
                    report.shards_after = len(shards) - len(plan.merged) + len(plan.written)
                report.seconds = time.monotonic() - started
                catalog.finish_job(job_id, "succeeded", report.to_dict(), report.generation)
                if plan is not None:
                    cleanup_index_dir(catalog, index_dir, grace_seconds)
                return report
            candidates = _candidates(shards, set(by_shard), kind, shard_size, merge_all)
            if not candidates or state.model is None:
                report.shards_after = len(shards)
                report.generation = state.generation
                catalog.finish_job(job_id, "succeeded", report.to_dict(), state.generation)
                return report
            identity = ModelIdentity.from_dict(state.model)
            ids, vecs, report.dropped_vectors, verified = _live_vectors(
                index_dir, candidates, by_shard, identity.dim, progress, report.corrupt
            )
            report.live_vectors = len(ids)
            candidates = [row for row in candidates if row.id in verified]
            if not candidates:
                report.shards_after = len(shards)
                report.generation = state.generation
                catalog.finish_job(job_id, "succeeded", report.to_dict(), state.generation)
                return report
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
            crash_point("compact_before_commit")
            report.generation = catalog.commit(commit)
            crash_point("compact_after_commit")
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
    corrupt: dict[str, str],
) -> tuple[np.ndarray, np.ndarray, int, set[str]]:
    """The live ids (ascending) and float16 vectors of those of these shards that verify, how
    many vectors of theirs were tombstoned (dropped), and the ids of the shards that verified.

    Each shard is read once: hashed and checked in the same pass that loads its vectors. A
    shard that fails goes into `corrupt` (id -> what is wrong) and contributes nothing.
    """
    live_ids: list[np.ndarray] = []
    live_vecs: list[np.ndarray] = []
    dropped = 0
    verified: set[str] = set()
    bar = tqdm(
        total=sum(int(row.bytes or 0) for row in rows),
        desc="verify and read shards",
        unit="B",
        unit_scale=True,
        disable=progress is False,
    )
    with bar:
        for row in rows:
            check = check_shard(
                index_dir,
                row.id,
                ShardExpectation.of(row),
                content=True,
                keep_embeddings=True,
                on_bytes=bar.update,
            )
            if not check.ok or check.ids is None or check.embeddings is None:
                corrupt[row.id] = check.describe()
                log.error("compaction leaves corrupt shard %s alone: %s", row.id, check.describe())
                continue
            verified.add(row.id)
            keep = ~np.isin(check.ids, tombstones.get(row.id, np.zeros(0, dtype=np.int64)))
            dropped += int((~keep).sum())
            live_ids.append(check.ids[keep])
            live_vecs.append(check.embeddings[keep])
    ids = np.concatenate(live_ids) if live_ids else np.zeros(0, dtype=np.int64)
    vecs = np.concatenate(live_vecs) if live_vecs else np.zeros((0, dim), np.float16)
    order = np.argsort(ids, kind="stable")
    return ids[order], vecs[order], dropped, verified

"""Writer-side housekeeping: the single-writer lock, orphan/retired cleanup, and compaction."""

from __future__ import annotations

import datetime as dt
import fcntl
import logging
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from tqdm import tqdm

from retrieval.catalog import Catalog, GenerationCommit, ShardRecord, utcnow
from retrieval.encoder import ModelIdentity
from retrieval.errors import IndexLocked
from retrieval.label_store import LabelStore
from retrieval.shards import Shard, choose_params, list_shard_dirs, remove_shard_dir, write_shard

log = logging.getLogger(__name__)


CRASH_ENV = "CLIPSEARCH_CRASH_AT"


def crash_point(name: str) -> None:
    """Fault injection for the crash-safety tests: SIGKILL ourselves at a named point.

    Set CLIPSEARCH_CRASH_AT=<name> (before_shard_write, after_shard_write, before_commit,
    after_commit, during_encode; during_labels, before_label_publish). Unset in normal use;
    costs one dict lookup.
    """
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


class IndexLock:
    """An exclusive flock on index_dir/indexer.lock. The kernel drops it when we die."""

    def __init__(self, index_dir: Path) -> None:
        self.path = Path(index_dir) / "indexer.lock"
        self._handle: Any = None

    def __enter__(self) -> IndexLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown process"
            handle.close()
            raise IndexLocked(str(self.path), holder) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {os.uname().nodename} since {utcnow().isoformat()}")
        handle.flush()
        self._handle = handle
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._handle is not None:
            self._handle.seek(0)
            self._handle.truncate()
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


def cleanup_index_dir(catalog: Catalog, index_dir: Path, grace_seconds: float) -> list[str]:
    """Delete orphan shard dirs (no catalog row) and retired shards past the grace period.

    Must run under the IndexLock: an uncommitted shard of a live job also has no row.
    """
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
    from indexer.pipeline import new_shard_id

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
            with_tombstones = set(by_shard)
            small = [row.id for row in shards if row.count < shard_size // 2]
            candidates = [
                row
                for row in shards
                if merge_all
                or row.id in with_tombstones
                or (len(small) >= 2 and row.id in small)
                or (kind != "auto" and row.kind != kind)
            ]
            if not candidates or state.model is None:
                report.shards_after = len(shards)
                report.generation = state.generation
                catalog.finish_job(job_id, "succeeded", report.to_dict(), state.generation)
                return report
            identity = ModelIdentity.from_dict(state.model)
            live_ids: list[np.ndarray] = []
            live_vecs: list[np.ndarray] = []
            bar = tqdm(candidates, desc="read shards", unit=" shard", disable=progress is False)
            for row in bar:
                shard = Shard.open(index_dir, row.id)
                dead = by_shard.get(row.id, np.zeros(0, dtype=np.int64))
                keep = ~np.isin(shard.ids, dead)
                report.dropped_vectors += int((~keep).sum())
                live_ids.append(np.asarray(shard.ids[keep], dtype=np.int64))
                live_vecs.append(np.asarray(shard.embeddings[keep], dtype=np.float16))
            ids = np.concatenate(live_ids) if live_ids else np.zeros(0, dtype=np.int64)
            vecs = (
                np.concatenate(live_vecs) if live_vecs else np.zeros((0, identity.dim), np.float16)
            )
            order = np.argsort(ids, kind="stable")
            ids, vecs = ids[order], vecs[order]
            report.live_vectors = len(ids)
            commit = GenerationCommit(model=state.model)
            for start in range(0, len(ids), shard_size):
                chunk_ids = ids[start : start + shard_size]
                chunk_vecs = vecs[start : start + shard_size].astype(np.float32)
                params = choose_params(kind, len(chunk_ids), identity.dim)
                shard_id = new_shard_id()
                manifest = write_shard(
                    index_dir,
                    shard_id,
                    ids=chunk_ids,
                    embeddings=chunk_vecs,
                    params=params,
                    model=state.model,
                    use_gpu=use_gpu,
                )
                commit.new_shards.append(
                    ShardRecord(
                        id=shard_id,
                        kind=manifest.kind,
                        count=manifest.count,
                        dim=manifest.dim,
                        params=manifest.params,
                        model_key=identity.key,
                        bytes=sum(int(f.get("bytes", 0)) for f in manifest.files.values()),
                    )
                )
                commit.reassign.extend((int(i), shard_id) for i in chunk_ids)
                report.written.append(shard_id)
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

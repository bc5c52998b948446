"""The set of shards of one index generation, searched together: fan-out, filters, tombstones.

Search fans out to every shard in a thread pool and merges the top-k. Filters arrive as an id set
and tombstones are excluded the same way, through a FAISS IDSelector or, where a selector would
make an approximate index miss, by exact search over the stored embeddings (see `ShardSet`).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from retrieval.errors import CorruptShard, EmptyIndex, ModelMismatch
from retrieval.index.faiss_gpu import DevicePlacement
from retrieval.index.integrity import (
    COSINE_BOUND,
    ShardExpectation,
    open_checked,
    unit_norm_misses,
)
from retrieval.index.kinds import IVF_KINDS, LARGE_KIND, PQ_KINDS
from retrieval.index.marks import VerifiedMarks
from retrieval.index.shard import F32Array, IdArray, Shard, sorted_unique_ids

log = logging.getLogger("clipsearch.shards")

# A large shard ranks millions of vectors by their PQ codes alone, too coarsely to tell a
# query's near neighbours apart: more of its candidates are re-scored exactly. Measured by
# bench/index_scale.py (1M clustered vectors, one ivfpq-large shard, PQ 64 bytes, nprobe 8):
# recall@10 0.56 re-scoring 4k candidates, 0.92 re-scoring 16k; p50 0.94 -> 1.42 ms.
LARGE_REFINE_FACTOR = 16

# Bitmap selectors are 30x faster to build than IDSelectorBatch's hash set (1M ids: 6 ms vs
# 206 ms) and as fast to query; use one whenever it is no larger than the id array itself.
_BITMAP_MIN_BYTES = 1 << 20


def _id_selector(ids: IdArray) -> faiss.IDSelector:
    """A selector accepting exactly `ids` (sorted, unique, non-empty)."""
    top = int(ids[-1])
    nbytes = (top >> 3) + 1
    if int(ids[0]) >= 0 and nbytes <= max(_BITMAP_MIN_BYTES, 8 * ids.size):
        mask = np.zeros(top + 1, dtype=bool)
        mask[ids] = True
        bitmap = np.packbits(mask, bitorder="little")
        # The one-argument form makes the Python object keep `bitmap` alive; FAISS holds only a
        # pointer to it.
        return faiss.IDSelectorBitmap(bitmap)  # type: ignore[call-arg, arg-type]  # stub lacks it
    return faiss.IDSelectorBatch(ids)  # copies the ids into a hash set


@dataclass
class _ShardState:
    """A shard plus what the set's tombstones mean for it, computed once per set."""

    shard: Shard
    deleted_rows: npt.NDArray[np.intp]
    deleted_ids: IdArray  # the ids of deleted_rows, ascending
    # Accepts every id but the deleted ones; None when nothing is deleted. Shared by concurrent
    # searches, which is safe: is_member is const.
    live_selector: faiss.IDSelector | None
    # Python references that the FAISS selector above only points to.
    keepalive: tuple[Any, ...]
    # The shard's index copied to a GPU (searched without selectors), or None.
    device_index: faiss.Index | None = None

    @property
    def live_count(self) -> int:
        return self.shard.count - int(self.deleted_rows.size)

    def live_rows(self) -> npt.NDArray[np.intp]:
        live = np.ones(self.shard.count, dtype=bool)
        live[self.deleted_rows] = False
        return np.flatnonzero(live)

    def allowed_rows(self, allowed: IdArray) -> npt.NDArray[np.intp]:
        """Sorted rows of the allowed (sorted, unique) ids that this shard holds and are live."""
        found, rows = self.shard.positions(allowed)
        rows = rows[found]
        if self.deleted_rows.size:
            at = np.searchsorted(self.deleted_rows, rows)
            hit = at < self.deleted_rows.size
            hit[hit] = self.deleted_rows[at[hit]] == rows[hit]
            rows = rows[~hit]
        return rows


@dataclass(frozen=True)
class UnservedShard:
    """A shard of the generation that is not served because it is corrupt."""

    shard_id: str
    reason: str
    count: int  # its vectors (tombstoned ones included)


@dataclass(frozen=True)
class _Query:
    vectors: F32Array
    k: int
    allowed: IdArray | None
    ef_search: int
    nprobe: int
    refine_factor: int


class ShardSet:
    """The shards of one index generation, searched together.

    Tombstoned ids are never returned. With `allowed_ids`, only those ids are returned, and each
    shard's contribution is the exact top-k among them when its allowed live set is small (under
    `exact_fraction` of the shard, or under `exact_below` vectors): then the scores come from a
    brute-force product with the stored embeddings, because HNSW or IVF with a very selective
    IDSelector can miss neighbours or return fewer than k. Larger allowed sets go through FAISS
    with an IDSelector; flat shards are exact either way. In every case a shard that returns
    fewer results than it has allowed live vectors is completed by brute force, so a search never
    returns fewer than min(k, allowed live ids) results.

    With a `gpu` placement, flat and IVF shards are copied to the GPU once, and unfiltered
    searches run there: a GPU index ignores selectors, so it is asked for k plus the shard's
    tombstone count and the tombstoned ids are dropped afterwards (see retrieval/faiss_gpu.py).
    Filtered searches, and searches that would need more than the GPU's 2048 results, use the CPU.

    A cheap sanity check runs on every FAISS result: a shard that returns an id it does not hold,
    or a score that is no cosine (outside [-1.0001, 1.0001] once divided by the norms of the query
    and of the stored vector), or a stored vector that is not of unit length, is corrupt. It is
    marked so (`corrupt_shards`), `on_corrupt` is told, and the set stops serving it at once: the
    query in hand is answered from the other shards.
    """

    def __init__(
        self,
        shards: list[Shard],
        *,
        deleted_ids: np.ndarray | None = None,
        threads: int | None = None,
        exact_below: int = 20_000,
        exact_fraction: float = 0.05,
        gpu: DevicePlacement | None = None,
        on_corrupt: Callable[[str, str], None] | None = None,
        left_out: dict[str, tuple[str, int]] | None = None,
    ) -> None:
        self._shards = list(shards)
        # Shards of the generation that were never opened: id -> (why, vectors).
        self._left_out = dict(left_out or {})
        self._corrupt: dict[str, str] = {}
        self._corrupt_lock = threading.Lock()
        self._on_corrupt = on_corrupt
        dims = {s.dim for s in self._shards}
        if len(dims) > 1:
            raise ValueError(f"shards of different dimensions in one set: {sorted(dims)}")
        # The model key identifies the weights; the same model loaded from another path
        # (a moved checkpoint) writes a different "pretrained" but the same key.
        models = {
            str(s.manifest.model.get("key"))
            if s.manifest.model.get("key")
            else json.dumps(s.manifest.model, sort_keys=True)
            for s in self._shards
        }
        if len(models) > 1:
            first, *others = sorted(models)
            raise ModelMismatch(first, others[0])
        all_ids = np.concatenate([s.ids for s in self._shards]) if self._shards else np.empty(0)
        if all_ids.size and np.unique(all_ids).size != all_ids.size:
            # Merging would return an image twice; the catalog keeps each id in one live shard.
            raise ValueError("an id appears in more than one shard of the set")

        self._deleted = sorted_unique_ids(deleted_ids)
        self._gpu = gpu
        self._states = [self._state_for(shard) for shard in self._shards]
        self.exact_below = exact_below
        self.exact_fraction = exact_fraction
        workers = threads if threads is not None else min(len(self._shards), os.cpu_count() or 1)
        # FAISS releases the GIL while it searches, and so does numpy's matmul: threads give real
        # parallelism across shards. One shard, or one thread, searches inline.
        self._pool = (
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shard-search")
            if workers > 1 and len(self._shards) > 1
            else None
        )
        self._closed = False

    def _state_for(self, shard: Shard) -> _ShardState:
        held, rows = shard.positions(self._deleted)
        deleted_rows = np.sort(rows[held])
        deleted_ids = shard.ids[deleted_rows]
        device_index = None
        if self._gpu is not None and shard.count > deleted_rows.size:
            device_index = self._gpu.place(shard.shard_id, shard.kind, shard.index)
        if not deleted_rows.size:
            return _ShardState(shard, deleted_rows, deleted_ids, None, (), device_index)
        inner = _id_selector(deleted_ids)
        return _ShardState(
            shard, deleted_rows, deleted_ids, faiss.IDSelectorNot(inner), (inner,), device_index
        )

    @property
    def device_shards(self) -> list[str]:
        """Ids of the shards whose unfiltered searches run on the GPU."""
        return [s.shard.shard_id for s in self._states if s.device_index is not None]

    @classmethod
    def open(
        cls,
        index_dir: Path,
        shard_ids: list[str],
        *,
        deleted_ids: np.ndarray | None = None,
        verify: bool = False,
        threads: int | None = None,
        gpu: DevicePlacement | None = None,
    ) -> ShardSet:
        shards = [Shard.open(index_dir, shard_id, verify=verify) for shard_id in shard_ids]
        return cls(shards, deleted_ids=deleted_ids, threads=threads, gpu=gpu)

    @classmethod
    def open_checked(
        cls,
        index_dir: Path,
        expected: list[ShardExpectation],
        *,
        marks: VerifiedMarks | None = None,
        deleted_ids: np.ndarray | None = None,
        threads: int | None = None,
        gpu: DevicePlacement | None = None,
        on_corrupt: Callable[[str, str], None] | None = None,
    ) -> ShardSet:
        """The set of the catalog's shards that verify (see `integrity.open_checked`).

        A corrupt shard does not stop the others from being served: it is left out, and listed
        in `corrupt_shards` with the reason, its vectors counted in `unserved_count`.
        """

        def attempt(row: ShardExpectation) -> Shard | CorruptShard:
            try:
                return open_checked(index_dir, row, marks)
            except CorruptShard as exc:
                return exc

        # hashlib releases the GIL: shards that need hashing are hashed side by side.
        workers = min(len(expected), os.cpu_count() or 1, 8)
        if workers > 1:
            with ThreadPoolExecutor(workers, thread_name_prefix="shard-check") as pool:
                outcomes = list(pool.map(attempt, expected))
        else:
            outcomes = [attempt(row) for row in expected]
        shards: list[Shard] = []
        left_out: dict[str, tuple[str, int]] = {}
        for row, outcome in zip(expected, outcomes, strict=True):
            if isinstance(outcome, CorruptShard):
                log.error("not serving shard %s: %s", row.shard_id, outcome)
                left_out[row.shard_id] = (outcome.problem or str(outcome), row.count)
            else:
                shards.append(outcome)
        return cls(
            shards,
            deleted_ids=deleted_ids,
            threads=threads,
            gpu=gpu,
            on_corrupt=on_corrupt,
            left_out=left_out,
        )

    @property
    def shards(self) -> list[Shard]:
        return list(self._shards)

    @property
    def count(self) -> int:
        """Vectors in all shards, tombstoned ones included."""
        return sum(s.count for s in self._shards)

    @property
    def live_count(self) -> int:
        """Live vectors being served (not those of shards found corrupt while serving)."""
        return sum(s.live_count for s in self._states if s.shard.shard_id not in self._corrupt)

    @property
    def corrupt_shards(self) -> dict[str, str]:
        """Shards of this generation that are not served, with the reason: those left out when
        the set was opened, and those it stopped serving (see the class docstring)."""
        found = {shard_id: why for shard_id, (why, _) in self._left_out.items()}
        found.update(self._corrupt)
        return found

    @property
    def served_shards(self) -> list[Shard]:
        """The shards being searched: all but those found corrupt while serving."""
        return [s for s in self._shards if s.shard_id not in self._corrupt]

    @property
    def unserved(self) -> list[UnservedShard]:
        """The corrupt shards of this generation, with the reason and their vector counts."""
        found = [UnservedShard(i, why, count) for i, (why, count) in self._left_out.items()]
        found += [
            UnservedShard(s.shard_id, self._corrupt[s.shard_id], s.count)
            for s in self._shards
            if s.shard_id in self._corrupt
        ]
        return sorted(found, key=lambda shard: shard.shard_id)

    @property
    def unserved_count(self) -> int:
        """Vectors of the generation that corrupt shards keep out of results."""
        return sum(shard.count for shard in self.unserved)

    def mark_corrupt(self, shard_id: str, reason: str) -> None:
        """Stop serving a shard; the first report of each shard reaches `on_corrupt`."""
        with self._corrupt_lock:
            if shard_id in self._corrupt:
                return
            self._corrupt[shard_id] = reason
        log.error("shard %s is corrupt and no longer served: %s", shard_id, reason)
        if self._on_corrupt is not None:
            try:
                self._on_corrupt(shard_id, reason)
            except Exception:  # the shard is out of service whatever the listener does
                log.exception("recording corrupt shard %s failed", shard_id)

    @property
    def dim(self) -> int:
        """The vector dimension; EmptyIndex for a set with no shards (it has none)."""
        if not self._shards:
            raise EmptyIndex("the index has no shards yet")
        return self._shards[0].dim

    def close(self) -> None:
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> ShardSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        allowed_ids: np.ndarray | None = None,
        ef_search: int = 128,
        nprobe: int = 32,
        refine_factor: int = 4,
    ) -> tuple[F32Array, IdArray]:
        """Top-k scores (float32) and ids (int64), shape (q, k), best first.

        Rows with fewer than k results are padded with -inf and -1; an empty set, or a filter
        that matches nothing, gives all padding rather than EmptyIndex, so a caller shows "no
        results" without a special case. IVF-PQ candidates (refine_factor * k per shard) are
        re-scored exactly from the stored embeddings, so every kind returns exact scores.
        """
        if self._closed:
            raise RuntimeError("search on a closed ShardSet")
        if k < 1:
            raise ValueError("k must be >= 1")
        if ef_search < 1 or nprobe < 1 or refine_factor < 1:
            raise ValueError("ef_search, nprobe and refine_factor must be >= 1")
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2:
            raise ValueError(f"queries must be (q, d); got shape {q.shape}")
        if self._shards and q.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {q.shape[1]}, the index {self.dim}")
        allowed = None if allowed_ids is None else sorted_unique_ids(allowed_ids)
        query = _Query(q, k, allowed, ef_search, nprobe, refine_factor)

        states = [
            s for s in self._states if s.live_count > 0 and s.shard.shard_id not in self._corrupt
        ]
        if self._pool is None or len(states) <= 1:
            parts = [self._search_shard(state, query) for state in states]
        else:
            parts = list(self._pool.map(lambda state: self._search_shard(state, query), states))
        if not parts:
            return _padding(q.shape[0], k)
        scores = np.concatenate([p[0] for p in parts], axis=1)
        labels = np.concatenate([p[1] for p in parts], axis=1)
        return _top_k(scores, labels, k)

    def _search_shard(self, state: _ShardState, query: _Query) -> tuple[F32Array, IdArray]:
        shard = state.shard
        nq, k = query.vectors.shape[0], query.k
        rows: npt.NDArray[np.intp] | None = None  # the candidate rows, None meaning all live
        if query.allowed is None:
            candidates = state.live_count
        else:
            rows = state.allowed_rows(query.allowed)
            candidates = int(rows.size)
        if candidates == 0:
            return _padding(nq, k)

        small = candidates < self.exact_fraction * shard.count or (
            query.allowed is not None and candidates < self.exact_below
        )
        if small:
            return _exact_top_k(shard, query.vectors, self._rows_or_live(state, rows), k)

        on_device = None
        if query.allowed is None and state.device_index is not None and self._gpu is not None:
            on_device = _device_search(state, query, self._gpu)
        if on_device is not None:
            scores, labels = on_device
        else:
            if query.allowed is not None:
                assert rows is not None
                selector: faiss.IDSelector | None = _id_selector(shard.ids[rows])
            else:
                selector = state.live_selector
            try:
                scores, labels = _faiss_search(shard, query, selector)
            except RuntimeError as exc:  # FAISS reports what a damaged index makes it read
                self.mark_corrupt(shard.shard_id, f"FAISS failed searching index.faiss: {exc}")
                return _padding(nq, k)
        impossible = impossible_result(shard, query.vectors, scores, labels)
        if impossible is not None:
            self.mark_corrupt(shard.shard_id, impossible)
            return _padding(nq, k)

        # Never fewer results than exist: HNSW with a filter, or IVF whose probed lists hold
        # fewer than k allowed vectors, can come back short. Those rows are redone exactly.
        short = np.count_nonzero(labels >= 0, axis=1) < min(k, candidates)
        if short.any():
            exact_scores, exact_labels = _exact_top_k(
                shard, query.vectors[short], self._rows_or_live(state, rows), k
            )
            scores[short], labels[short] = exact_scores, exact_labels
        return scores, labels

    @staticmethod
    def _rows_or_live(state: _ShardState, rows: npt.NDArray[np.intp] | None) -> np.ndarray | None:
        if rows is not None:
            return rows
        return state.live_rows() if state.deleted_rows.size else None

    def vectors(self, ids: np.ndarray) -> tuple[IdArray, F32Array]:
        """Stored vectors (float32) of the requested live ids, in request order; others omitted."""
        wanted = np.asarray(ids, dtype=np.int64).ravel()
        dim = self._shards[0].dim if self._shards else 0
        out = np.zeros((wanted.size, dim), dtype=np.float32)
        done = np.zeros(wanted.size, dtype=bool)
        if self._deleted.size:
            at = np.searchsorted(self._deleted, wanted).clip(max=self._deleted.size - 1)
            done = self._deleted[at] == wanted  # tombstoned: treated as absent
        tombstoned = done.copy()
        for shard in self._shards:
            if shard.shard_id in self._corrupt:
                continue
            found, rows = shard.positions(wanted)
            found &= ~done
            if found.any():
                x = shard.rows_f32(rows[found])
                problem = _not_unit(x, wanted[found])
                if problem is not None:
                    self.mark_corrupt(shard.shard_id, problem)
                    continue
                out[found] = x
                done |= found
        hit = done & ~tombstoned
        return wanted[hit], out[hit]


def impossible_result(shard: Shard, q: F32Array, scores: F32Array, labels: IdArray) -> str | None:
    """Why a FAISS result cannot come from a sound shard, or None when it can."""
    valid = labels >= 0
    if not valid.any() or not bool(np.isfinite(q).all()):
        return None  # a non-finite query is the caller's problem, not the shard's
    hit_ids = labels[valid]
    found, rows = shard.positions(hit_ids)
    if not found.all():
        return f"index.faiss returned id {int(hit_ids[~found][0])}, which the shard does not hold"
    query_rows = np.broadcast_to(np.arange(q.shape[0])[:, None], labels.shape)[valid]
    query_norms = np.linalg.norm(q, axis=1)[query_rows]
    score = scores[valid].astype(np.float64)
    # Sound stored vectors have norms within 1% of 1 (checked below on the rows read), so a score
    # below 0.98 of the query's norm is a sound cosine whatever the row: only the others, near
    # duplicates and damage, cost a read of their stored vector.
    suspect = ~np.isfinite(score) | (np.abs(score) > 0.98 * query_norms)
    if not suspect.any():
        return None
    x = shard.rows_f32(rows[suspect])
    # Serving checks hashes only: a shard written with vectors off the unit sphere (files that
    # agree with each other) shows it here, where its scores would otherwise pass as cosines.
    not_unit = _not_unit(x, hit_ids[suspect])
    if not_unit is not None:
        return not_unit
    scale = query_norms[suspect] * np.linalg.norm(x, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        cosine = np.where(
            scale > 0, score[suspect] / scale, np.where(score[suspect] == 0, 0.0, np.inf)
        )
    bad = ~np.isfinite(cosine) | (np.abs(cosine) > COSINE_BOUND)
    if not bad.any():
        return None
    first = int(np.flatnonzero(bad)[0])
    return (
        f"index.faiss scored id {int(hit_ids[suspect][first])} with a cosine of "
        f"{float(cosine[first]):.6g}, outside [-{COSINE_BOUND}, {COSINE_BOUND}]"
    )


def _not_unit(x: F32Array, ids: IdArray) -> str | None:
    """Why stored vectors cannot be sound (not finite, or not of unit length), or None."""
    norms, bad = unit_norm_misses(x)
    if not bad.any():
        return None
    first = int(np.flatnonzero(bad)[0])
    return (
        f"embeddings.npy holds a vector of norm {float(norms[first]):.6g} for id {int(ids[first])}"
    )


def _padding(nq: int, k: int) -> tuple[F32Array, IdArray]:
    return np.full((nq, k), -np.inf, dtype=np.float32), np.full((nq, k), -1, dtype=np.int64)


def _top_k(scores: np.ndarray, labels: np.ndarray, k: int) -> tuple[F32Array, IdArray]:
    """Best k per row (descending score), padded with -inf / -1 to exactly k columns."""
    nq, width = scores.shape
    if width > k:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        scores = np.take_along_axis(scores, part, axis=1)
        labels = np.take_along_axis(labels, part, axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")
    scores = np.take_along_axis(scores, order, axis=1).astype(np.float32, copy=False)
    labels = np.take_along_axis(labels, order, axis=1).astype(np.int64, copy=False)
    if scores.shape[1] < k:
        pad_s, pad_l = _padding(nq, k - scores.shape[1])
        scores = np.concatenate([scores, pad_s], axis=1)
        labels = np.concatenate([labels, pad_l], axis=1)
    return scores, labels


# Rows per brute-force block: bounds the float32 copy of the embeddings at about 32 MiB.
_EXACT_BLOCK_BYTES = 32 * 2**20


def _exact_top_k(
    shard: Shard, q: F32Array, rows: np.ndarray | None, k: int
) -> tuple[F32Array, IdArray]:
    """Exact top-k of `q` against the stored embeddings of `rows` (None: all rows)."""
    total = shard.count if rows is None else int(rows.size)
    block = max(1024, _EXACT_BLOCK_BYTES // (4 * shard.dim))
    best_s, best_l = _padding(q.shape[0], 0)
    for start in range(0, total, block):
        if rows is None:
            chunk_rows: np.ndarray = np.arange(start, min(start + block, total))
        else:
            chunk_rows = rows[start : start + block]
        x = shard.rows_f32(chunk_rows)
        scores = q @ x.T
        labels = np.broadcast_to(shard.ids[chunk_rows], scores.shape)
        best_s, best_l = _top_k(
            np.concatenate([best_s, scores], axis=1), np.concatenate([best_l, labels], axis=1), k
        )
    return _top_k(best_s, best_l, k)


def _candidates_k(shard: Shard, query: _Query) -> int:
    """How many results to ask FAISS for: k, or refine_factor * k IVF-PQ candidates (at least
    LARGE_REFINE_FACTOR * k from a large shard)."""
    if shard.kind in PQ_KINDS:
        factor = query.refine_factor
        if shard.kind == LARGE_KIND:
            factor = max(factor, LARGE_REFINE_FACTOR)
        return min(shard.count, query.k * factor)
    return query.k


def _search_params(shard: Shard, query: _Query, k: int, *, max_nprobe: int | None = None) -> Any:
    """A fresh faiss.SearchParameters for one search (the stub lacks SearchParametersHNSW)."""
    params: Any
    if shard.kind == "hnsw":
        params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
        # HNSW cannot return more than efSearch results.
        params.efSearch = max(query.ef_search, k)
    elif shard.kind in IVF_KINDS:
        params = faiss.SearchParametersIVF()
        nlist = int(shard.manifest.params.get("nlist") or 1)
        params.nprobe = min(query.nprobe, nlist, max_nprobe or nlist)
    else:
        params = faiss.SearchParameters()
    return params


def _device_search(
    state: _ShardState, query: _Query, gpu: DevicePlacement
) -> tuple[F32Array, IdArray] | None:
    """An unfiltered search of the shard's GPU copy, tombstones removed; None: use the CPU."""
    shard = state.shard
    deleted = state.deleted_ids
    k = _candidates_k(shard, query)
    # The device ignores selectors: over-fetch by the tombstone count, so that after dropping
    # them at least k live results remain wherever the CPU search would have found k.
    wanted = min(shard.count, k + int(deleted.size))
    if wanted > gpu.max_k:
        return None
    params = _search_params(shard, query, wanted, max_nprobe=gpu.max_k)
    assert state.device_index is not None
    try:
        with gpu.lock:
            scores, labels = state.device_index.search(query.vectors, wanted, params=params)
    except RuntimeError as exc:
        log.warning("GPU search of shard %s failed, using the CPU: %s", shard.shard_id, exc)
        return None
    dropped = labels < 0
    if deleted.size:
        dropped |= np.isin(labels, deleted)
    scores = np.where(dropped, -np.inf, scores).astype(np.float32)
    labels = np.where(dropped, -1, labels).astype(np.int64)
    if shard.kind in PQ_KINDS:
        return _refine(shard, query.vectors, labels, query.k)
    return _top_k(scores, labels, query.k)


def _faiss_search(
    shard: Shard, query: _Query, selector: faiss.IDSelector | None
) -> tuple[F32Array, IdArray]:
    kind = shard.kind
    k = _candidates_k(shard, query)
    params = _search_params(shard, query, k)
    # A fresh SearchParameters per call: IndexIDMap (flat, hnsw) temporarily swaps params.sel for
    # an IDSelectorTranslated (via const_cast), so one params object must never be shared by
    # concurrent searches. Through that translation the selector sees catalog ids, as it does in
    # IVF lists, which store the ids themselves.
    if selector is not None:
        params.sel = selector
    scores, labels = shard.index.search(query.vectors, k, params=params)
    # FAISS pads missing results with -FLT_MAX for inner product; we pad with -inf.
    scores[labels < 0] = -np.inf
    if kind in PQ_KINDS:
        return _refine(shard, query.vectors, labels, query.k)
    return scores, labels


def _refine(shard: Shard, q: F32Array, labels: IdArray, k: int) -> tuple[F32Array, IdArray]:
    """Re-score PQ candidates exactly from embeddings.npy and keep the best k."""
    valid = labels >= 0
    held, rows = shard.positions(np.where(valid, labels, shard.ids[0]))
    rows = np.minimum(rows, shard.count - 1)
    x = shard.rows_f32(rows.ravel()).reshape(*labels.shape, shard.dim)
    scores = np.einsum("qd,qcd->qc", q, x).astype(np.float32)
    # An id the shard does not hold can only come from a corrupt index: scored +inf, it comes
    # first, and the sanity check in _search_shard sees it.
    scores[valid & ~held] = np.inf
    scores[~valid] = -np.inf
    return _top_k(scores, np.where(valid, labels, -1), k)

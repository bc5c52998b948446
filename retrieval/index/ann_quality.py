"""ANN quality of an index: recall@k of each index kind against exact search, with latency.

Each kind is built and searched through the product's own shard code, from the live index's
stored embeddings, so the figures are those serving would see (`clipsearch eval --ann`).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.catalog.database import Catalog
from retrieval.errors import CorruptShard, EmptyIndex
from retrieval.index.integrity import ShardExpectation
from retrieval.index.kinds import INDEX_KINDS, IndexParams
from retrieval.index.marks import VerifiedMarks
from retrieval.index.shard import iter_live_vectors, write_shard
from retrieval.index.shard_set import ShardSet


@dataclass(frozen=True)
class AnnKindResult:
    kind: str  # as asked
    built: str  # what choose_params made of it for this many vectors (tiny sets give flat)
    params: dict[str, Any]
    recall: float
    build_seconds: float
    latency_ms_p50: float
    latency_ms_p95: float

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("recall", "build_seconds", "latency_ms_p50", "latency_ms_p95"):
            data[key] = round(data[key], 4)
        return data


@dataclass(frozen=True)
class AnnReport:
    vectors: int
    queries: int
    k: int
    ef_search: int
    nprobe: int
    kinds: list[AnnKindResult]

    def to_dict(self) -> dict[str, Any]:
        return {
            "vectors": self.vectors,
            "queries": self.queries,
            "k": self.k,
            "ef_search": self.ef_search,
            "nprobe": self.nprobe,
            "kinds": [kind.to_dict() for kind in self.kinds],
        }


def live_embeddings(catalog: Catalog, index_dir: Path) -> np.ndarray:
    """The stored (float16 -> float32) vectors of the current generation, tombstones excluded.

    Every shard is checked as it would be before serving; CorruptShard if one fails, since
    figures measured on part of the index (or on damaged vectors) would mislead.
    """
    expected = [ShardExpectation.of(row) for row in catalog.shards()]
    deleted = catalog.tombstoned_ids()
    marks = VerifiedMarks(index_dir)
    with ShardSet.open_checked(index_dir, expected, marks=marks, deleted_ids=deleted) as shards:
        marks.save()
        for shard_id, problem in shards.corrupt_shards.items():
            raise CorruptShard(
                f"shard {shard_id} is corrupt ({problem}); repair the index before measuring it",
                shard_id=shard_id,
                problem=problem,
            )
        parts = [
            np.asarray(vectors, dtype=np.float32)
            for _, vectors in iter_live_vectors(shards.shards, deleted)
        ]
    if not parts or not sum(len(p) for p in parts):
        raise EmptyIndex("the index has no live vectors to evaluate")
    return np.concatenate(parts)


def ann_quality(
    vectors: np.ndarray,
    *,
    kinds: Sequence[str] = INDEX_KINDS,
    k: int = 10,
    queries: int = 200,
    ef_search: int = 128,
    nprobe: int = 32,
    seed: int = 0,
) -> AnnReport:
    """Recall@k of each index kind against exact search, and single-query latency.

    `queries` rows are held out as queries and the rest indexed, so no query finds itself.
    Each kind is written and searched through the product's own shard code (IVF-PQ results
    are re-scored from the stored embeddings, as in serving).
    """
    data = np.ascontiguousarray(vectors, dtype=np.float32)
    if data.ndim != 2 or len(data) < 2:
        raise EmptyIndex("ANN evaluation needs at least two vectors")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data))
    n_queries = max(1, min(queries, len(data) // 2))
    q, base = data[order[:n_queries]], data[order[n_queries:]]
    k = min(k, len(base))
    ids = np.arange(len(base), dtype=np.int64)
    # Ground truth from the float16 values a shard stores, as serving scores them.
    stored = base.astype(np.float16).astype(np.float32)
    truth = np.argsort(-(q @ stored.T), axis=1, kind="stable")[:, :k]
    results = []
    with tempfile.TemporaryDirectory(prefix="clipsearch-ann-") as tmp:
        for kind in kinds:
            started = time.perf_counter()
            manifest = write_shard(
                Path(tmp),
                f"eval-{kind}",
                ids=ids,
                embeddings=base,
                params=IndexParams(kind=kind),
                model={"evaluation": True},
            )
            build = time.perf_counter() - started
            with ShardSet.open(Path(tmp), [manifest.shard_id], threads=1) as shard_set:
                found = np.empty((n_queries, k), dtype=np.int64)
                latencies = []
                shard_set.search(q[:1], k, ef_search=ef_search, nprobe=nprobe)  # warm-up
                for row in range(n_queries):
                    started = time.perf_counter()
                    _, labels = shard_set.search(
                        q[row : row + 1], k, ef_search=ef_search, nprobe=nprobe
                    )
                    latencies.append((time.perf_counter() - started) * 1000)
                    found[row] = labels[0]
            hits = sum(len(np.intersect1d(found[r], truth[r])) for r in range(n_queries))
            results.append(
                AnnKindResult(
                    kind=kind,
                    built=manifest.kind,
                    params=manifest.params,
                    recall=hits / (n_queries * k),
                    build_seconds=build,
                    latency_ms_p50=float(np.percentile(latencies, 50)),
                    latency_ms_p95=float(np.percentile(latencies, 95)),
                )
            )
    return AnnReport(
        vectors=len(base),
        queries=n_queries,
        k=k,
        ef_search=ef_search,
        nprobe=nprobe,
        kinds=results,
    )

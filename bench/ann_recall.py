"""Recall and latency of each index kind against flat, through the product's own shard code.

Prints one JSON line. For each kind: seconds to write the shard (build, files, fsync), recall@10
against flat, p50/p99 single-query latency through `ShardSet.search`, and latency relative to
flat. The data are unit vectors drawn around Gaussian cluster centres, so that neighbours have
structure, as CLIP embeddings do; queries are fresh draws from the same clusters.

    python bench/ann_recall.py [--n 100000] [--dim 512] [--queries 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.index.kinds import INDEX_KINDS, choose_params
from retrieval.index.shard import write_shard
from retrieval.index.shard_set import ShardSet

K = 10


def clustered_unit_vectors(
    n: int, dim: int, *, clusters: int, spread: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """`n` unit vectors around `clusters` random centres, and the centres themselves."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    which = rng.integers(0, clusters, size=n)
    x = centres[which] + spread * rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, centres


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000, help="for recall (batched)")
    parser.add_argument("--latency-queries", type=int, default=300, help="one at a time")
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--spread", type=float, default=1.0, help="noise stddev / centre stddev")
    parser.add_argument("--ef-search", type=int, default=128)
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--kinds", default=",".join(INDEX_KINDS))
    parser.add_argument("--hnsw-ef-construction", type=int, default=None, help="default: product's")
    args = parser.parse_args()

    data, _ = clustered_unit_vectors(
        args.n + args.queries, args.dim, clusters=args.clusters, spread=args.spread, seed=0
    )
    vectors, queries = data[: args.n], data[args.n :]
    ids = np.arange(args.n, dtype=np.int64) * 3 + 1  # not positions, so id mapping is exercised
    kinds = [k for k in INDEX_KINDS if k in args.kinds.split(",")]
    if "flat" not in kinds:
        kinds.insert(0, "flat")

    results: dict[str, dict[str, object]] = {}
    p50: dict[str, float] = {}
    p99: dict[str, float] = {}
    truth: np.ndarray | None = None
    with tempfile.TemporaryDirectory(prefix="ann-recall-") as tmp:
        index_dir = Path(tmp)
        for kind in kinds:
            params = choose_params(kind, args.n, args.dim)
            if kind == "hnsw" and args.hnsw_ef_construction is not None:
                params = replace(params, hnsw_ef_construction=args.hnsw_ef_construction)
            start = time.perf_counter()
            manifest = write_shard(
                index_dir,
                kind,
                ids=ids,
                embeddings=vectors,
                params=params,
                model={"bench": "ann_recall"},
            )
            build_s = time.perf_counter() - start
            with ShardSet.open(index_dir, [kind]) as shards:
                search_opts = {"ef_search": args.ef_search, "nprobe": args.nprobe}
                _, found = shards.search(queries, K, **search_opts)
                if truth is None:
                    truth = found
                recall = float(
                    np.mean([len(set(found[i]) & set(truth[i])) / K for i in range(len(found))])
                )
                shards.search(queries[:5], K, **search_opts)  # warm-up
                latencies = []
                for row in queries[: args.latency_queries]:
                    t0 = time.perf_counter()
                    shards.search(row[None, :], K, **search_opts)
                    latencies.append((time.perf_counter() - t0) * 1e3)
            results[kind] = {
                "params": manifest.params,
                "build_s": round(build_s, 2),
                "recall_at_10": round(recall, 4),
                "p50_ms": round(p50.setdefault(kind, float(np.percentile(latencies, 50))), 3),
                "p99_ms": round(p99.setdefault(kind, float(np.percentile(latencies, 99))), 3),
            }
    for kind, row in results.items():
        row["p50_vs_flat"] = round(p50[kind] / p50["flat"], 3)
        row["p99_vs_flat"] = round(p99[kind] / p99["flat"], 3)

    print(
        json.dumps(
            {
                "bench": "ann_recall",
                "n": args.n,
                "dim": args.dim,
                "clusters": args.clusters,
                "spread": args.spread,
                "queries": args.queries,
                "latency_queries": args.latency_queries,
                "ef_search": args.ef_search,
                "nprobe": args.nprobe,
                "faiss": faiss.__version__,
                "cpus": os.cpu_count(),
                "machine": platform.machine(),
                "kinds": results,
            }
        )
    )


if __name__ == "__main__":
    main()

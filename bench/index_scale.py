"""Index memory, build time, and latency / recall against shard count and nprobe, at 1M vectors.

For the scale-out plan: synthetic clustered, L2-normalised 512-d vectors (bench/large_index.py's
corpus, generated in chunks) are indexed as
- `ivfpq-large` with PQ codes of m = 16, 32 and 64 bytes per vector, in one shard of N vectors;
- the same m = 64 template filled as N/100k shards of 100k (the fan-out of many shards);
- flat, N/100k shards of 100k (exact: today's layout below 50k per shard, scanned whole);
- HNSW32, one shard of --hnsw-n vectors (its build is the slowest; memory and latency are then
  extrapolated per million and per shard, as the JSON says).
Every layout is searched through the product's ShardSet (memory-mapped, PQ candidates re-scored
from the stored embeddings, refine factor 4) one query at a time: p50 latency and recall@10
against exact search (ground truth over the stored float16 vectors). Bytes are the files on disk:
index.faiss is what a server maps (pages it touches stay resident), embeddings.npy is read only
for re-scoring and filters. Prints one JSON line.

    OMP_WAIT_POLICY=PASSIVE python -m bench.index_scale --n 1000000

(Passive waiting keeps FAISS's OpenMP threads from spinning on cores shared with other jobs;
it made training 4x faster on a loaded machine and costs nothing on a quiet one.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from bench.large_index import K, clustered_chunk, identity, recall_at_k
from retrieval.index.kinds import IndexParams, build_index
from retrieval.index.shard import INDEX_FILE, shard_path, write_shard_files
from retrieval.index.shard_set import ShardSet
from retrieval.index.trained import (
    encode_with_template,
    load_template,
    train_template,
    training_sample_size,
)

SHARD = 100_000
CHUNK = 100_000


def progress(name: str, value: Any) -> None:
    """Each section as it completes, on stderr: a run cut short keeps what it measured."""
    print(json.dumps({name: value}), file=sys.stderr, flush=True)


def timed_queries(shards: ShardSet, q: np.ndarray, truth: np.ndarray, **opts: Any) -> dict:
    _, found = shards.search(q, K, **opts)
    shards.search(q[:5], K, **opts)  # warm-up
    times = []
    for row in q:
        t0 = time.perf_counter()
        shards.search(row[None, :], K, **opts)
        times.append((time.perf_counter() - t0) * 1e3)
    return {
        "recall_at_10": round(recall_at_k(found, truth), 4),
        "p50_ms": round(float(np.percentile(times, 50)), 2),
    }


def _serve_rss(index_dir: Path, q: np.ndarray, *, mmap: bool) -> Any:
    """Resident memory of a fresh process that opens the shard and runs the queries: through
    ShardSet (index.faiss memory-mapped), or with index.faiss read into RAM by plain FAISS."""
    import subprocess

    np.save(index_dir / "q.npy", q)
    code = f"""
import json, faiss, numpy as np
from pathlib import Path
from bench.large_index import _rss_mib
from retrieval.index.shard_set import ShardSet
d = Path({str(index_dir)!r}); q = np.load(d / "q.npy"); start = _rss_mib()
if {mmap!r}:
    s = ShardSet.open(d, ["one"], threads=1); opened = _rss_mib()
    for row in q: s.search(row[None, :], 10, nprobe=32)
else:
    i = faiss.read_index(str(d / "shards/one/index.faiss")); opened = _rss_mib(); i.nprobe = 32
    for row in q: i.search(row[None, :], 40)
print(json.dumps({{"start": start, "opened": opened, "after_queries": _rss_mib()}}))
"""
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _offset_rows(x: np.ndarray, lo: int) -> Any:
    return lambda a, b: x[lo + a : lo + b]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=2000)
    parser.add_argument("--spread", type=float, default=1.0)
    parser.add_argument("--nlist", type=int, default=1024)
    parser.add_argument("--pq-m", default="16,32,64")
    parser.add_argument("--nprobe", default="8,32,128")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--hnsw-n", type=int, default=100_000)
    parser.add_argument("--skip", default="", help="comma-separated: hnsw, flat, shards")
    args = parser.parse_args()
    pq_ms = [int(v) for v in args.pq_m.split(",")]
    nprobes = [int(v) for v in args.nprobe.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    ident = identity(args.dim)
    model = ident.to_dict()
    n, dim = args.n, args.dim

    started = time.perf_counter()
    x16 = np.empty((n, dim), dtype=np.float16)  # the stored vectors: 1 GiB per million at 512-d
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        x16[start:stop] = clustered_chunk(
            start, stop - start, dim, clusters=args.clusters, spread=args.spread
        )
    ids = np.arange(1, n + 1, dtype=np.int64)
    q = clustered_chunk(10**9, args.queries, dim, clusters=args.clusters, spread=args.spread)
    scores = np.concatenate(
        [q @ x16[s : s + CHUNK].astype(np.float32).T for s in range(0, n, CHUNK)], axis=1
    )
    truth = ids[np.argsort(-scores, axis=1)[:, :K]]
    del scores
    result: dict[str, Any] = {
        "bench": "index_scale",
        "n": n,
        "dim": dim,
        "clusters": args.clusters,
        "spread": args.spread,
        "nlist": args.nlist,
        "queries": args.queries,
        "faiss": faiss.__version__,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "load_avg_start": os.getloadavg()[0],
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "generate_and_truth_s": round(time.perf_counter() - started, 1),
    }
    rows = lambda a, b: x16[a:b]  # noqa: E731

    def write(index_dir: Path, shard_id: str, index: Any, lo: int, hi: int, p: IndexParams):
        write_shard_files(
            index_dir,
            shard_id,
            index=index,
            ids=ids[lo:hi],
            blocks=(x16[s : min(s + CHUNK, hi)] for s in range(lo, hi, CHUNK)),
            params=p,
            model=model,
        )

    work = Path(tempfile.mkdtemp(prefix="index-scale-"))
    try:
        kinds: dict[str, Any] = {}
        template64 = info64 = None
        for m in pq_ms:
            t0 = time.perf_counter()
            size = training_sample_size(n, args.nlist)
            pick = np.sort(np.random.default_rng(1).choice(n, size=size, replace=False))
            trained = train_template(
                work / f"m{m}",
                x16[pick].astype(np.float32),
                nlist=args.nlist,
                pq_m=m,
                model=model,
                corpus_count=n,
            )
            train_s = time.perf_counter() - t0
            template, info = load_template(
                work / f"m{m}", trained.trained_id, model_key=ident.key, dim=dim
            )
            t0 = time.perf_counter()
            index = encode_with_template(template, ids, rows)
            add_s = time.perf_counter() - t0
            write(work / f"m{m}", "one", index, 0, n, info.params())
            del index
            size_b = (shard_path(work / f"m{m}", "one") / INDEX_FILE).stat().st_size
            with ShardSet.open(work / f"m{m}", ["one"], threads=1) as shards:
                by = {str(p): timed_queries(shards, q, truth, nprobe=p) for p in nprobes}
                by16 = {
                    str(p): timed_queries(shards, q, truth, nprobe=p, refine_factor=16)
                    for p in nprobes
                }
            kinds[f"ivfpq_m{m}"] = {
                "train_s": round(train_s, 1),
                "trained_on": size,
                "add_s": round(add_s, 1),
                "index_bytes_per_million": round(size_b * 1e6 / n),
                "one_shard_by_nprobe": by,
                "one_shard_by_nprobe_refine_16": by16,
            }
            progress(f"ivfpq_m{m}", kinds[f"ivfpq_m{m}"])
            if m == max(pq_ms):
                template64, info64 = template, info
        result["ivfpq_large"] = kinds
        big = work / f"m{max(pq_ms)}"
        result["serving_rss_mib"] = {
            "mmap": _serve_rss(big, q, mmap=True),
            "in_ram": _serve_rss(big, q, mmap=False),
        }
        progress("serving_rss_mib", result["serving_rss_mib"])

        if "shards" not in skip and template64 is not None and info64 is not None:
            many = work / "many"
            shard_ids = []
            for lo in range(0, n, SHARD):
                hi = min(lo + SHARD, n)
                part = encode_with_template(template64, ids[lo:hi], _offset_rows(x16, lo))
                write(many, f"s{lo // SHARD:04d}", part, lo, hi, info64.params())
                shard_ids.append(f"s{lo // SHARD:04d}")
            with ShardSet.open(many, shard_ids) as shards:
                by = {str(p): timed_queries(shards, q, truth, nprobe=p) for p in nprobes}
            result[f"ivfpq_large_m{max(pq_ms)}_as_{len(shard_ids)}_shards"] = by
            progress("shards", by)
            shutil.rmtree(many)

        if "flat" not in skip:
            flat = work / "flat"
            shard_ids = []
            t0 = time.perf_counter()
            for lo in range(0, n, SHARD):
                hi = min(lo + SHARD, n)
                index = build_index(x16[lo:hi].astype(np.float32), ids[lo:hi], IndexParams("flat"))
                write(flat, f"f{lo // SHARD:04d}", index, lo, hi, IndexParams("flat"))
                shard_ids.append(f"f{lo // SHARD:04d}")
            build_s = time.perf_counter() - t0
            size_b = sum((shard_path(flat, s) / INDEX_FILE).stat().st_size for s in shard_ids)
            with ShardSet.open(flat, shard_ids) as shards:
                by_flat = timed_queries(shards, q, truth)
            result[f"flat_as_{len(shard_ids)}_shards"] = {
                "build_s": round(build_s, 1),
                "index_bytes_per_million": round(size_b * 1e6 / n),
                **by_flat,
            }
            progress("flat", result[f"flat_as_{len(shard_ids)}_shards"])
            shutil.rmtree(flat)

        if "hnsw" not in skip:
            h = min(args.hnsw_n, n)
            t0 = time.perf_counter()
            index = build_index(x16[:h].astype(np.float32), ids[:h], IndexParams("hnsw"))
            build_s = time.perf_counter() - t0
            write(work / "hnsw", "h", index, 0, h, IndexParams("hnsw"))
            del index
            size_b = (shard_path(work / "hnsw", "h") / INDEX_FILE).stat().st_size
            sub_truth = ids[:h][np.argsort(-(q @ x16[:h].astype(np.float32).T), axis=1)[:, :K]]
            with ShardSet.open(work / "hnsw", ["h"]) as shards:
                by_h = timed_queries(shards, q, sub_truth, ef_search=128)
            result["hnsw32"] = {
                "n": h,
                "build_s": round(build_s, 1),
                "build_s_per_million_extrapolated": round(build_s * 1e6 / h),
                "index_bytes_per_million": round(size_b * 1e6 / h),
                **by_h,
            }
        result["load_avg_end"] = os.getloadavg()[0]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

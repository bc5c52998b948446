"""Bytes per vector and build time of each index kind, through the product's own `write_shard`,
and what they come to at 100M vectors.

N (default 20,000) random 512-d unit vectors become one shard of each kind: flat, HNSW32 and
IVF-PQ with 16, 32 and 64 one-byte codes per vector (nlist as the indexer chooses it). For each:
seconds to write the shard (train, add, files, fsync) and the CPU seconds that took, and the
bytes per vector of index.faiss (what a server maps and touches) and of the stored float16
embeddings (disk only, read by compact, relabel and repair). Sizes grow linearly with N past
the fixed parts (the coarse centroids, the PQ codebooks), which are reported apart. Recall
and latency per kind are bench/ann_recall.py's; the large-corpus kind's bench/large_index.py's.

Prints ONE JSON line. Usage: python bench/index_memory.py [N]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.index.kinds import choose_params  # noqa: E402
from retrieval.index.shard import shard_path, write_shard  # noqa: E402

DIM = 512
AT = 100_000_000


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    load_start = os.getloadavg()
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(1, n + 1, dtype=np.int64)
    ivfpq = choose_params("ivfpq", n, DIM)
    kinds = {
        "flat": choose_params("flat", n, DIM),
        "hnsw32": choose_params("hnsw", n, DIM),
        **{f"ivfpq_m{m}": replace(ivfpq, pq_m=m) for m in (16, 32, 64)},
    }
    result: dict[str, object] = {"bench": "index_memory", "vectors": n, "dim": DIM}
    out: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, params in kinds.items():
            started, cpu = time.perf_counter(), time.process_time()
            manifest = write_shard(
                Path(tmp), name, ids=ids, embeddings=vectors, params=params, model={"key": "b"}
            )
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
            folder = shard_path(Path(tmp), name)
            index_bytes = (folder / "index.faiss").stat().st_size
            stored = (folder / "embeddings.npy").stat().st_size
            # Fixed part: the coarse centroids (nlist x d float32) and the PQ codebooks
            # (m x 256 x d/m float32), which do not grow with N.
            nlist = manifest.params.get("nlist") or 0
            fixed = 4 * DIM * (int(nlist) + (256 if name.startswith("ivfpq") else 0))
            per_vector = (index_bytes - fixed) / n
            out[name] = {
                "params": {k: v for k, v in manifest.params.items() if v is not None},
                "build_s": round(seconds, 2),
                "build_cpu_s": round(cpu, 2),  # all threads: the work, whatever the load
                "index_bytes_per_vector": round(per_vector, 1),
                "index_fixed_mib": round(fixed / 2**20, 2),
                "embeddings_bytes_per_vector": round(stored / n, 1),
                "index_gib_at_100m": round(per_vector * AT / 2**30, 1),
                "embeddings_gib_at_100m": round(stored / n * AT / 2**30, 1),
            }
    result["kinds"] = out
    result["loadavg_start"] = [round(x, 2) for x in load_start]
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result))


if __name__ == "__main__":
    main()

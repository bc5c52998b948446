"""The large-corpus index kind at millions of vectors: build, serve memory-mapped, grow by 1%.

Synthetic clustered, L2-normalised vectors (generated in chunks, as bench/ann_recall.py makes
them) are written as the index job writes them: 100k-vector flat shards committed to a SQLite
catalog. `compact --kind ivfpq-large` then trains the template on a sample and folds them into
large shards (the build). Recall@10 against exact search (ground truth computed chunkwise over
the stored vectors) and the p50 latency of one query at a time are measured at several nprobe
values, through the product's ShardSet (index memory-mapped, PQ candidates re-scored from the
stored embeddings). Then 1% new vectors arrive as one more small shard, `compact` adds them to
the existing lists without training, and recall is measured again.

Each phase runs in its own process, so its peak RSS (VmHWM) is its own; the serving phase also
reads a large shard's index into RAM in a fresh process, to compare. Prints one JSON line.

    python -m bench.large_index --n 2000000 --nlist 1024 --pq-m 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

K = 10
SMALL_SHARD = 100_000
MODEL_NAME = "bench-synthetic"


def clustered_chunk(
    start: int, count: int, dim: int, *, clusters: int, spread: float
) -> np.ndarray:
    """Rows [start, start+count) of an endless clustered corpus (the same rows in every run):
    unit vectors around `clusters` fixed random centres, as bench/ann_recall.py draws them."""
    centres = np.random.default_rng(0).standard_normal((clusters, dim), dtype=np.float32)
    rng = np.random.default_rng(1_000_003 + start)
    which = rng.integers(0, clusters, size=count)
    x = centres[which] + spread * rng.standard_normal((count, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def identity(dim: int) -> Any:
    from retrieval.models.identity import ModelIdentity

    return ModelIdentity(
        name=MODEL_NAME,
        pretrained="none",
        weights_sha256="00" * 32,
        dim=dim,
        image_size=224,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    )


def catalog_of(work: Path) -> Any:
    from retrieval.catalog.database import Catalog

    return Catalog(f"sqlite:///{work / 'catalog.db'}")


def write_small_shards(work: Path, first_id: int, start: int, count: int, args: Any) -> None:
    """Rows [start, start+count) of the corpus as 100k flat shards, each committed.

    With --image-rows each shard's images get catalog rows too, as the index job writes them
    (compact then moves them with one UPDATE per shard); without, the catalog holds the shards
    only, which is all `compact` reads, and the run measures the index alone.
    """
    from indexer.publish import write_shard_record
    from retrieval.catalog.records import GenerationCommit, ImageRecord
    from retrieval.catalog.tables import ACTIVE

    ident = identity(args.dim)
    catalog = catalog_of(work)
    for offset in range(0, count, SMALL_SHARD):
        n = min(SMALL_SHARD, count - offset)
        x = clustered_chunk(start + offset, n, args.dim, clusters=args.clusters, spread=args.spread)
        ids = np.arange(first_id + offset, first_id + offset + n, dtype=np.int64)
        record = write_shard_record(
            work / "index",
            ids,
            x,
            kind="flat",
            model=ident.to_dict(),
            model_key=ident.key,
            use_gpu=None,
        )
        images = [
            ImageRecord(
                id=int(i),
                path=f"/bench/{i}.jpg",
                sha256=None,
                size=1,
                mtime_ns=1,
                status=ACTIVE,
                width=640,
                height=480,
                format="JPEG",
                shard_id=record.id,
            )
            for i in ids
            if args.image_rows
        ]
        catalog.commit(GenerationCommit(model=ident.to_dict(), new_shards=[record], upserts=images))
    catalog.dispose()


def phase_write(work: Path, args: Any) -> dict[str, Any]:
    catalog = catalog_of(work)
    catalog.upgrade()
    catalog.dispose()
    started = time.perf_counter()
    write_small_shards(work, 1, 0, args.n, args)
    return {"seconds": round(time.perf_counter() - started, 1), "peak_rss_mib": peak_rss_mib()}


def phase_compact(work: Path, args: Any) -> dict[str, Any]:
    from indexer.compact import compact_index
    from indexer.compact_large import LargeOptions
    from retrieval.index.kinds import LARGE_KIND

    catalog = catalog_of(work)
    started = time.perf_counter()
    report = compact_index(
        catalog,
        work / "index",
        kind=LARGE_KIND,
        grace_seconds=0,
        progress=False,
        use_gpu=None,
        large=LargeOptions(shard_size=args.large_shard_size, nlist=args.nlist, pq_m=args.pq_m),
    )
    seconds = time.perf_counter() - started
    shards = catalog.shards()
    catalog.dispose()
    assert report.large is not None
    return {
        "seconds": round(seconds, 1),
        "peak_rss_mib": peak_rss_mib(),
        "large": report.large.to_dict(),
        "shards": [{"id": s.id, "count": s.count, "bytes": s.bytes} for s in shards],
    }


def phase_add(work: Path, args: Any) -> dict[str, Any]:
    """1% new vectors, as the index job would write them: one more small shard."""
    extra = max(1, int(args.n * args.add_fraction))
    started = time.perf_counter()
    write_small_shards(work, args.n + 1, args.n, extra, args)
    return {"vectors": extra, "seconds": round(time.perf_counter() - started, 1)}


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / K for a, b in zip(found, truth, strict=True)]))


def _queries(args: Any) -> np.ndarray:
    # Drawn from the same distribution, beyond every stored row (never a stored vector itself).
    return clustered_chunk(
        10**9, args.queries, args.dim, clusters=args.clusters, spread=args.spread
    )


def phase_truth(work: Path, args: Any) -> dict[str, Any]:
    """Exact top-10 of every query over every active shard's stored vectors, chunkwise."""
    from retrieval.index.shard import iter_embedding_blocks

    q = _queries(args)
    best_s = np.full((len(q), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(q), 0), dtype=np.int64)
    catalog = catalog_of(work)
    shard_ids = [s.id for s in catalog.shards()]
    catalog.dispose()
    started = time.perf_counter()
    for shard_id in shard_ids:
        for ids, block in iter_embedding_blocks(work / "index", shard_id, 262_144):
            scores = q @ block.astype(np.float32).T
            s = np.concatenate([best_s, scores], axis=1)
            i = np.concatenate([best_i, np.broadcast_to(ids, scores.shape)], axis=1)
            top = np.argsort(-s, axis=1)[:, :K]
            best_s, best_i = np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1)
    np.save(work / "truth.npy", best_i)
    return {"seconds": round(time.perf_counter() - started, 1)}


def phase_serve(work: Path, args: Any) -> dict[str, Any]:
    """Open the active shards as `clipsearch serve` does (memory-mapped) and time queries."""
    from retrieval.index.shard_set import ShardSet

    rss_start = _rss_mib()
    catalog = catalog_of(work)
    shard_ids = [s.id for s in catalog.shards()]
    catalog.dispose()
    q = _queries(args)
    truth = np.load(work / "truth.npy")
    out: dict[str, Any] = {}
    with ShardSet.open(work / "index", shard_ids, threads=1) as shards:
        rss_open = _rss_mib()
        for nprobe in args.nprobe:
            _, found = shards.search(q, K, nprobe=nprobe)
            recall = recall_at_k(found, truth)
            shards.search(q[:5], K, nprobe=nprobe)  # warm-up
            times = []
            for row in q:
                t0 = time.perf_counter()
                shards.search(row[None, :], K, nprobe=nprobe)
                times.append((time.perf_counter() - t0) * 1e3)
            out[str(nprobe)] = {
                "recall_at_10": round(recall, 4),
                "p50_ms": round(float(np.percentile(times, 50)), 2),
                "p99_ms": round(float(np.percentile(times, 99)), 2),
            }
        # Candidates re-scored per result (the product's default is 4): PQ alone is refine 1.
        nprobe = max(args.nprobe)
        by_refine = {}
        for refine in (1, 4, 16):
            _, found = shards.search(q, K, nprobe=nprobe, refine_factor=refine)
            by_refine[str(refine)] = round(recall_at_k(found, truth), 4)
        rss_after = _rss_mib()
    return {
        "by_nprobe": out,
        f"recall_by_refine_factor_at_nprobe_{nprobe}": by_refine,
        "rss_mib": {"start": rss_start, "opened": rss_open, "after_queries": rss_after},
        "peak_rss_mib": peak_rss_mib(),
    }


def phase_in_ram(work: Path, args: Any) -> dict[str, Any]:
    """The same large shards' indexes read wholly into memory, as a non-mmap server would."""
    from retrieval.index.shard import INDEX_FILE, shard_path

    catalog = catalog_of(work)
    shard_ids = [s.id for s in catalog.shards()]
    catalog.dispose()
    before = _rss_mib()
    held = [faiss.read_index(str(shard_path(work / "index", i) / INDEX_FILE)) for i in shard_ids]
    return {"rss_mib": {"before": before, "after": _rss_mib()}, "indexes": len(held)}


def _rss_mib() -> dict[str, float]:
    """Resident memory: anonymous (the process's own) and file-backed (mapped file pages it has
    touched: clean page cache, which the kernel drops under memory pressure)."""
    found = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssFile"):
                found[name] = round(int(value.split()[0]) / 1024, 1)
    return found


PHASES = {
    "write": phase_write,
    "compact": phase_compact,
    "add": phase_add,
    "truth": phase_truth,
    "serve": phase_serve,
    "in_ram": phase_in_ram,
}


def run_phase(name: str, work: Path, argv: list[str]) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "bench.large_index",
        *argv,
        "--phase",
        name,
        "--work",
        str(work),
    ]
    # FAISS's OpenMP threads busy-wait between parallel loops by default; on cores shared with
    # other processes that made training 4x slower here. Passive waiting costs nothing alone.
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}
    done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def disk_bytes(path: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in path.glob(pattern) if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=2000)
    parser.add_argument("--spread", type=float, default=1.0)
    parser.add_argument("--nlist", type=int, default=1024)
    parser.add_argument("--pq-m", type=int, default=64)
    parser.add_argument("--large-shard-size", type=int, default=20_000_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument(
        "--nprobe", type=lambda s: [int(v) for v in s.split(",")], default=[4, 8, 16, 32, 64]
    )
    parser.add_argument("--add-fraction", type=float, default=0.01)
    parser.add_argument("--image-rows", action="store_true", help="catalog rows per image too")
    parser.add_argument("--work", type=Path, default=None, help="scratch dir (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch dir")
    parser.add_argument("--phase", choices=sorted(PHASES), default=None)
    args = parser.parse_args()
    if args.phase is not None:
        print(json.dumps(PHASES[args.phase](args.work, args)))
        return

    argv = [a for a in sys.argv[1:] if a != "--keep"]
    work = args.work or Path(tempfile.mkdtemp(prefix="large-index-", dir=args.work))
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "bench": "large_index",
        "n": args.n,
        "dim": args.dim,
        "clusters": args.clusters,
        "spread": args.spread,
        "nlist": args.nlist,
        "pq_m": args.pq_m,
        "queries": args.queries,
        "faiss": faiss.__version__,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "load_avg_start": os.getloadavg()[0],
    }
    try:
        result["write_small_shards"] = run_phase("write", work, argv)
        built = run_phase("compact", work, argv)
        result["build"] = built
        result["on_disk_bytes"] = {
            "index_faiss": disk_bytes(work / "index", "shards/*/index.faiss"),
            "embeddings_npy": disk_bytes(work / "index", "shards/*/embeddings.npy"),
            "ids_npy": disk_bytes(work / "index", "shards/*/ids.npy"),
            "template": disk_bytes(work / "index", "trained/*/trained.faiss"),
        }
        result["truth_seconds"] = run_phase("truth", work, argv)["seconds"]
        result["serve"] = run_phase("serve", work, argv)
        result["in_ram"] = run_phase("in_ram", work, argv)
        result["add"] = run_phase("add", work, argv)
        grown = run_phase("compact", work, argv)
        result["grow"] = grown
        trained_before = built["large"]["trained_id"]
        result["retrained"] = grown["large"]["trained_now"] or (
            grown["large"]["trained_id"] != trained_before
        )
        run_phase("truth", work, argv)
        result["serve_after_add"] = run_phase("serve", work, argv)
        result["load_avg_end"] = os.getloadavg()[0]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

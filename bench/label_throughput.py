"""Zero-shot labelling of stored embeddings: time and peak memory of `clipsearch label`.

Builds a corpus of random unit vectors (default 1,000,000 x 512, float16 shards of 100,000, the
catalog on SQLite) and a label set of 1,000 classes whose class embeddings are cached (random
unit vectors, logit scale 100), so no model is loaded. Then runs the product's labelling job in
a fresh process and reports its wall time and peak resident memory; the same again on a corpus
a tenth the size shows that memory follows the block size, not the corpus. Prints one JSON line.

    python bench/label_throughput.py                      # 1,000,000 vectors, 1,000 classes
    python bench/label_throughput.py --n 200000 --compare-n 0
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.catalog.database import Catalog
from retrieval.catalog.records import GenerationCommit, ImageRecord, ShardRecord
from retrieval.catalog.tables import ACTIVE
from retrieval.config import load_settings  # noqa: E402
from retrieval.index.kinds import IndexParams
from retrieval.index.shard import write_shard
from retrieval.labels.definitions import LabelSet
from retrieval.labels.scoring import ClassEmbeddings
from retrieval.labels.store import LabelStore
from retrieval.models.identity import ModelIdentity

MODEL = ModelIdentity(
    name="bench-random",
    pretrained="none",
    weights_sha256="0" * 64,
    dim=512,
    image_size=224,
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
)


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    rows = rng.standard_normal((n, dim), dtype=np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows


def build_corpus(work: Path, n: int, dim: int, classes: int, shard_size: int, top_k: int) -> None:
    """Shards and image rows as `clipsearch index` would leave them, plus a cached label set."""
    model = {**MODEL.to_dict(), "dim": dim}
    identity = ModelIdentity.from_dict(model)
    settings = load_settings(data_dir=work)
    catalog = Catalog(settings.resolved_database_url)
    catalog.upgrade()
    rng = np.random.default_rng(0)
    for number, start in enumerate(range(0, n, shard_size)):
        ids = np.arange(start + 1, min(start + shard_size, n) + 1, dtype=np.int64)
        shard_id = f"bench-{number:04d}"
        manifest = write_shard(
            settings.resolved_index_dir,
            shard_id,
            ids=ids,
            embeddings=unit_rows(rng, len(ids), dim),
            params=IndexParams("flat"),
            model={**model, "key": identity.key},
        )
        catalog.commit(
            GenerationCommit(
                model={**model, "key": identity.key},
                new_shards=[
                    ShardRecord(
                        shard_id, "flat", manifest.count, dim, manifest.params, identity.key
                    )
                ],
                upserts=[
                    ImageRecord(
                        id=int(i),
                        path=f"/bench/{i:08d}.jpg",
                        sha256=None,
                        size=1,
                        mtime_ns=1,
                        status=ACTIVE,
                        shard_id=shard_id,
                    )
                    for i in ids
                ],
            )
        )
        print(f"  corpus: {ids[-1]:,} of {n:,} vectors", file=sys.stderr, flush=True)
    store = LabelStore(catalog)
    label_set = LabelSet.from_dict(
        {
            "name": "bench",
            "labels": [f"class {i}" for i in range(classes)],
            "templates": "photo",
            "top_k": top_k,
        }
    )
    stored, _ = store.put(label_set)
    store.save_embeddings(
        stored.version_id, identity.key, ClassEmbeddings(unit_rows(rng, classes, dim), 100.0)
    )
    catalog.dispose()


def _status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def run_labelling(work: Path, block_size: int | None) -> dict[str, Any]:
    """Inside the child process: label, and report time and memory."""
    from indexer.labelling import LabelJob

    def no_model() -> Any:
        raise RuntimeError("the benchmark caches class embeddings; no model should load")

    settings = load_settings(data_dir=work, label_block_size=block_size)
    catalog = Catalog(settings.resolved_database_url)
    # The peak-RSS mark survives fork and exec, so it would still hold the parent's peak:
    # reset it (Linux >= 4.0) and count from what the imports left.
    Path("/proc/self/clear_refs").write_text("5")
    baseline = _status_mb("VmRSS")
    started = time.perf_counter()
    report = LabelJob(settings, catalog, no_model, progress=False).run()
    seconds = time.perf_counter() - started
    entry = report.sets[0]
    return {
        "seconds": seconds,
        "images": entry.images,
        "rows": entry.rows,
        "published": entry.published,
        "block_size": settings.label_block_size,
        "baseline_rss_mb": baseline,
        "peak_rss_mb": _status_mb("VmHWM"),
    }


def measure(work: Path, block_size: int | None) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", str(work)]
    if block_size:
        command += ["--block-size", str(block_size)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"labelling failed:\n{done.stderr}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="stored vectors")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--shard-size", type=int, default=100_000)
    parser.add_argument("--block-size", type=int, default=None, help="default: the setting's")
    parser.add_argument(
        "--compare-n", type=int, default=100_000, help="a smaller corpus for memory (0: none)"
    )
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_labelling(args.child, args.block_size)))
        return

    results: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sorted({args.n, args.compare_n} - {0}):
            work = Path(tmp) / f"n{n}"
            started = time.perf_counter()
            build_corpus(work, n, args.dim, args.classes, args.shard_size, args.top_k)
            print(f"  built {n:,} in {time.perf_counter() - started:.0f}s", file=sys.stderr)
            results[n] = measure(work, args.block_size)
            db = work / "catalog.db"
            results[n]["db_mb"] = (
                sum(p.stat().st_size for p in db.parent.glob("catalog.db*")) / 2**20
            )
            print(f"  labelled {n:,}: {results[n]}", file=sys.stderr)
    main_run = results[args.n]
    line: dict[str, Any] = {
        "bench": "label_throughput",
        "vectors": args.n,
        "dim": args.dim,
        "classes": args.classes,
        "top_k": args.top_k,
        "block_size": main_run["block_size"],
        "seconds": round(main_run["seconds"], 2),
        "vectors_per_second": round(args.n / main_run["seconds"]),
        "label_rows": main_run["rows"],
        "peak_rss_mb": round(main_run["peak_rss_mb"], 1),
        "baseline_rss_mb": round(main_run["baseline_rss_mb"], 1),
        "embeddings_mb": round(args.n * args.dim * 2 / 2**20, 1),
        "catalog_mb": round(main_run["db_mb"], 1),
    }
    if args.compare_n and args.compare_n != args.n:
        small = results[args.compare_n]
        line["compare_vectors"] = args.compare_n
        line["compare_seconds"] = round(small["seconds"], 2)
        line["compare_peak_rss_mb"] = round(small["peak_rss_mb"], 1)
    print(json.dumps(line))


if __name__ == "__main__":
    main()

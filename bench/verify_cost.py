"""What integrity checking costs: a first serve (every file hashed), a restart (verified marks),
and `clipsearch verify` (hashes plus every vector's norm), against opening without any check;
and the runtime bound's share of a search (k=10 and k=1000, on and off).

Writes `--shards` flat shards of `--vectors` random 512-d vectors each (by default 8 x 20,000:
about 490 MB of shard files), then times each way of opening all of them. The files were just
written, so they are read from the page cache: the figures are the CPU's cost of the checks,
not the disk's. Prints one JSON line.

    python bench/verify_cost.py --shards 8 --vectors 20000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.index.integrity import (  # noqa: E402
    ShardExpectation,
    check_shard,
    manifest_digest,
    open_checked,
)
from retrieval.index.kinds import IndexParams  # noqa: E402
from retrieval.index.marks import VerifiedMarks  # noqa: E402
from retrieval.index.shard import Shard, ShardManifest, shard_path, write_shard  # noqa: E402
from retrieval.index.shard_set import impossible_result  # noqa: E402

DIM = 512
MODEL = {"name": "bench", "key": "b" * 16}


def write_shards(index_dir: Path, shards: int, vectors: int) -> list[ShardExpectation]:
    rng = np.random.default_rng(0)
    expected = []
    for number in range(shards):
        x = rng.standard_normal((vectors, DIM), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        ids = np.arange(number * vectors, (number + 1) * vectors, dtype=np.int64)
        shard_id = f"s{number:03d}"
        manifest = write_shard(
            index_dir, shard_id, ids=ids, embeddings=x, params=IndexParams("flat"), model=MODEL
        )
        expected.append(_expectation(index_dir, manifest))
    return expected


def _expectation(index_dir: Path, manifest: ShardManifest) -> ShardExpectation:
    return ShardExpectation(
        shard_id=manifest.shard_id,
        kind=manifest.kind,
        count=manifest.count,
        dim=manifest.dim,
        params=manifest.params,
        model_key=MODEL["key"],
        bytes=sum(int(entry["bytes"]) for entry in manifest.files.values()),
        manifest_sha256=manifest_digest(shard_path(index_dir, manifest.shard_id)),
    )


def timed(action: object) -> float:
    started = time.perf_counter()
    action()  # type: ignore[operator]
    return time.perf_counter() - started


def search_cost(index_dir: Path, shard_id: str, queries: int = 64) -> dict[str, float]:
    """Mean ms per query of one shard's FAISS search, and of the runtime bound on its result.

    Half the queries are stored vectors (near-1 scores, whose rows the bound reads), half random.
    """
    rng = np.random.default_rng(1)
    shard = Shard.open(index_dir, shard_id)
    stored = shard.rows_f32(np.arange(queries // 2))
    q = np.concatenate([stored, rng.standard_normal((queries - queries // 2, DIM))])
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    found: dict[str, float] = {}
    for k in (10, 1000):
        results = []
        started = time.perf_counter()
        for row in q:
            results.append(shard.index.search(row[None, :], k))
        found[f"k{k}_search"] = round(1000 * (time.perf_counter() - started) / queries, 4)
        started = time.perf_counter()
        for row, (scores, labels) in zip(q, results, strict=True):
            assert impossible_result(shard, row[None, :], scores, labels) is None
        found[f"k{k}_bound"] = round(1000 * (time.perf_counter() - started) / queries, 4)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--vectors", type=int, default=20_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        index_dir = Path(tmp)
        expected = write_shards(index_dir, args.shards, args.vectors)
        total = sum(row.bytes for row in expected)

        def plain() -> None:
            for row in expected:
                Shard.open(index_dir, row.shard_id)

        def first_serve() -> None:  # no marks yet: every file hashed
            marks = VerifiedMarks(index_dir)
            for row in expected:
                open_checked(index_dir, row, marks)
            marks.save()

        def restart() -> None:  # a new process reads the marks the first serve wrote
            marks = VerifiedMarks(index_dir)
            for row in expected:
                open_checked(index_dir, row, marks)

        def verify() -> None:
            for row in expected:
                assert check_shard(index_dir, row.shard_id, row, content=True).ok

        plain()  # warm the page cache once
        seconds = {
            "open_unchecked": timed(plain),
            "first_serve_hashed": timed(first_serve),
            "restart_with_marks": timed(restart),
            "verify_full": timed(verify),
        }
        search_ms = search_cost(index_dir, expected[0].shard_id)
    gigabytes = total / 1e9
    print(
        json.dumps(
            {
                "bench": "verify_cost",
                "shards": args.shards,
                "vectors_per_shard": args.vectors,
                "dim": DIM,
                "shard_bytes": total,
                "seconds": {key: round(value, 4) for key, value in seconds.items()},
                "ms_per_shard": {
                    key: round(1000 * value / args.shards, 2) for key, value in seconds.items()
                },
                "ms_per_gb": {
                    key: round(1000 * value / gigabytes, 1) for key, value in seconds.items()
                },
                "page_cache": "warm",
                "search_ms_per_query": search_ms,
            }
        )
    )


if __name__ == "__main__":
    main()

"""Byte flips in every shard file type, at random offsets: what verify, search, compact and
repair make of each. Prints one JSON line.

Indexes a small generated corpus with the tiny model once (3 shards, SQLite), then for each case
copies the data dir, flips `--bytes` consecutive bytes at a random offset of one file of one
shard, and counts:

- detected: `verify` reports that shard (a flip that changes no meaning, say inside a JSON
  string, still changes a checksum);
- served: queries (text, and more-like-this of every image) that returned one of the damaged
  shard's images, or a score above 1.01, before the repair: must be 0;
- laundered: images whose stored vector in a shard that verifies differs from the clean
  index's after `compact --all`: must be 0;
- repaired: cases after which `verify` passes and every image's stored vector equals the clean
  index's (bit for bit when recovered from the shard's files, within float16 rounding when
  encoded again) and the text queries rank as on the clean index.

    python bench/byte_flips.py --cases 10
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexer.compact import compact_index  # noqa: E402
from indexer.pipeline import IndexJob  # noqa: E402
from indexer.repair import REENCODED, RepairJob  # noqa: E402
from indexer.verify import verify_index  # noqa: E402
from retrieval.catalog.database import Catalog  # noqa: E402
from retrieval.catalog.tables import ACTIVE  # noqa: E402
from retrieval.config import Settings, load_settings  # noqa: E402
from retrieval.errors import ClipsearchError  # noqa: E402
from retrieval.models.encoder import Encoder, load_encoder  # noqa: E402
from retrieval.models.identity import ModelSpec  # noqa: E402
from retrieval.search import Searcher  # noqa: E402
from retrieval.training.shapes import generate_shapes  # noqa: E402

QUERIES = ["a red circle", "a blue square", "a green triangle", "a shape"]
CORPUS = 24
SHARD_SIZE = 8
# (file, region): where in a shard a flip lands.
TARGETS = [
    ("index.faiss", "any"),
    ("embeddings.npy", "header"),
    ("embeddings.npy", "data"),
    ("ids.npy", "header"),
    ("ids.npy", "data"),
    ("shard.json", "any"),
    ("embeddings.npy+index.faiss", "data"),  # both copies of the vectors: encoded again
]


def settings_for(data_dir: Path) -> Settings:
    return load_settings(
        data_dir=data_dir,
        model="clipsearch-tiny",
        pretrained="none",
        device="cpu",
        workers=0,
        batch_size=16,
        retire_grace_seconds=0,
        shard_size=SHARD_SIZE,
    )


def stored_vectors(settings: Settings, catalog: Catalog, encoder: Encoder) -> dict[int, bytes]:
    """Every active image's stored vector (float16 bytes) from the shards being served."""
    searcher = Searcher.from_settings(catalog, settings, encoder)
    try:
        ids = np.array(sorted(catalog.records(range(1, CORPUS + 1))), dtype=np.int64)
        found, vectors = searcher.snapshot().shards.vectors(ids)
        return {int(i): v.astype(np.float16).tobytes() for i, v in zip(found, vectors, strict=True)}
    finally:
        searcher.close()


def rankings(settings: Settings, catalog: Catalog, encoder: Encoder) -> dict[str, list[int]]:
    searcher = Searcher.from_settings(catalog, settings, encoder)
    try:
        return {q: [h.id for h in searcher.search_text(q, CORPUS).hits] for q in QUERIES}
    finally:
        searcher.close()


def served_from(settings: Settings, catalog: Catalog, encoder: Encoder, bad: set[int]) -> int:
    """Queries that returned an image of the damaged shard, or an impossible score."""
    searcher = Searcher.from_settings(catalog, settings, encoder)
    leaks = 0
    try:
        results = [searcher.search_text(q, CORPUS) for q in QUERIES]
        for image_id in range(1, CORPUS + 1):
            try:
                results.append(searcher.similar(image_id, CORPUS))
            except ClipsearchError:
                pass  # NotFound or CorruptShard: nothing served
        for result in results:
            if bad & {h.id for h in result.hits} or any(h.score > 1.01 for h in result.hits):
                leaks += 1
    finally:
        searcher.close()
    return leaks


def flip(path: Path, region: str, count: int, rng: random.Random) -> int:
    raw = bytearray(path.read_bytes())
    if path.suffix == ".npy" and region != "any":
        header = 10 + int.from_bytes(raw[8:10], "little")
        low, high = (0, header) if region == "header" else (header, len(raw))
    else:
        low, high = 0, len(raw)
    offset = rng.randrange(low, max(low + 1, high - count))
    for i in range(offset, min(offset + count, len(raw))):
        raw[i] ^= rng.randrange(1, 256)
    path.write_bytes(bytes(raw))
    return offset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10, help="flips per target")
    parser.add_argument("--bytes", type=int, default=1, help="consecutive bytes per flip")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    encoder = load_encoder(ModelSpec("clipsearch-tiny", "none", device="cpu", seed=3))
    counts: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    failures: list[str] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        generate_shapes(work / "photos", CORPUS, seed=11)
        (work / "photos" / "captions.csv").unlink()
        clean = settings_for(work / "clean")
        catalog = Catalog(clean.resolved_database_url)
        report = IndexJob(clean, catalog, lambda: encoder, progress=False).run([work / "photos"])
        shards = report.shards_written
        baseline_vectors = stored_vectors(clean, catalog, encoder)
        baseline_rankings = rankings(clean, catalog, encoder)
        catalog.dispose()
        for target_file, region in TARGETS:
            for number in range(args.cases):
                case = work / f"case-{number}-{target_file.replace('+', '-')}-{region}"
                shutil.copytree(work / "clean", case)
                settings = settings_for(case)
                catalog = Catalog(settings.resolved_database_url)
                name = f"{target_file}/{region}#{number}"
                try:
                    bad_shard = rng.choice(shards)
                    bad = {r.id for r in catalog.shard_members(bad_shard) if r.status == ACTIVE}
                    shard_dir = settings.resolved_index_dir / "shards" / bad_shard
                    for file_name in target_file.split("+"):
                        flip(shard_dir / file_name, region, args.bytes, rng)
                    counts["cases"] += 1
                    found = verify_index(catalog, settings.resolved_index_dir)
                    if list(found.corrupt) == [bad_shard]:
                        counts["detected"] += 1
                    else:
                        failures.append(f"{name}: verify found {list(found.corrupt)}")
                    counts["served"] += served_from(settings, catalog, encoder, bad)
                    compact_index(
                        catalog, settings.resolved_index_dir, merge_all=True, grace_seconds=0
                    )
                    after = stored_vectors(settings, catalog, encoder)
                    counts["laundered"] += sum(
                        1 for i, v in after.items() if v != baseline_vectors.get(i)
                    )
                    repaired = RepairJob(settings, catalog, lambda: encoder, progress=False).run()
                    for shard in repaired.repaired:
                        sources.update(shard.recovered)
                        counts["lost"] += len(shard.lost)
                    reencoded = any(REENCODED in s.recovered for s in repaired.repaired)
                    vectors = stored_vectors(settings, catalog, encoder)
                    same = set(vectors) == set(baseline_vectors) and all(
                        vectors[i] == baseline_vectors[i]
                        or (
                            reencoded
                            and np.allclose(
                                np.frombuffer(vectors[i], np.float16),
                                np.frombuffer(baseline_vectors[i], np.float16),
                                atol=2e-3,
                            )
                        )
                        for i in vectors
                    )
                    if (
                        verify_index(catalog, settings.resolved_index_dir).ok
                        and same
                        and rankings(settings, catalog, encoder) == baseline_rankings
                    ):
                        counts["repaired"] += 1
                    else:
                        failures.append(f"{name}: not restored")
                except Exception as exc:  # a case that crashes is a finding, not the end
                    failures.append(f"{name}: {type(exc).__name__}: {exc}")
                finally:
                    catalog.dispose()
                    shutil.rmtree(case, ignore_errors=True)
    print(
        json.dumps(
            {
                "bench": "byte_flips",
                "targets": [f"{f}/{r}" for f, r in TARGETS],
                "bytes_per_flip": args.bytes,
                **{key: counts[key] for key in ("cases", "detected", "served", "laundered")},
                "repaired_identical": counts["repaired"],
                "unrecoverable_images": counts["lost"],
                "recovered_from": dict(sources),
                "failures": failures[:20],
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
    )


if __name__ == "__main__":
    main()

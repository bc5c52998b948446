"""A served index without pictures: synthetic unit vectors in one shard plus catalog rows, as
`clipsearch serve` reads them, for the benchmarks that time the API (query_latency, overload,
runtimes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from retrieval.catalog.database import Catalog
from retrieval.catalog.records import GenerationCommit, ImageRecord, ShardRecord
from retrieval.catalog.tables import ACTIVE
from retrieval.index.integrity import manifest_digest
from retrieval.index.kinds import choose_params
from retrieval.index.shard import shard_path, write_shard
from retrieval.models.encoder import load_encoder
from retrieval.models.identity import ModelSpec

WORDS = "red blue green dog cat beach car tree house mountain river city night snow".split()


def query_text(i: int) -> str:
    """The i-th benchmark query: "a photo of" and 2-6 words, the same in every run."""
    rng = np.random.default_rng(i)
    return "a photo of " + " ".join(rng.choice(WORDS, size=int(rng.integers(2, 7))))


def build_served_corpus(
    tmp: Path, model_name: str, count: int, kind: str = "auto", database_url: str | None = None
) -> tuple[dict[str, str], str]:
    """`count` random unit vectors of `model_name`'s dimension (random weights) indexed as the
    indexer would (`kind`), with their catalog rows, under `tmp` (the catalog in `database_url`,
    an empty database, if given). Returns the environment that points `clipsearch serve` at it,
    and the index kind written."""
    identity = load_encoder(ModelSpec(model_name, "none", device="cpu")).identity
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((count, identity.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(1, count + 1, dtype=np.int64)
    model = identity.to_dict()
    manifest = write_shard(
        tmp / "index",
        "s0",
        ids=ids,
        embeddings=vectors,
        params=choose_params(kind, count, identity.dim),
        model=model,
    )
    url = database_url or f"sqlite:///{tmp / 'catalog.db'}"
    catalog = Catalog(url)
    catalog.upgrade()
    shard = ShardRecord(
        id="s0",
        kind=manifest.kind,
        count=count,
        dim=identity.dim,
        params=manifest.params,
        model_key=identity.key,
        # As the indexer records them: a row that disagrees with shard.json is not served.
        bytes=sum(int(f.get("bytes", 0)) for f in manifest.files.values()),
        manifest_sha256=manifest_digest(shard_path(tmp / "index", "s0")),
    )
    images = [
        ImageRecord(
            id=int(i),
            path=f"/bench/img_{i}.jpg",
            sha256=None,
            size=1,
            mtime_ns=1,
            status=ACTIVE,
            width=640,
            height=480,
            format="JPEG",
            shard_id="s0",
        )
        for i in ids
    ]
    catalog.commit(GenerationCommit(model=model, new_shards=[shard], upserts=images))
    catalog.dispose()
    env = {
        "CLIPSEARCH_DATABASE_URL": url,
        "CLIPSEARCH_INDEX_DIR": str(tmp / "index"),
        "CLIPSEARCH_DATA_DIR": str(tmp),
        "CLIPSEARCH_MODEL": model_name,
        "CLIPSEARCH_PRETRAINED": "none",
        "CLIPSEARCH_DEVICE": "cpu",
    }
    return env, manifest.kind

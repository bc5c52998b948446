"""`clipsearch db migrate-to` throughput: a synthetic SQLite catalog copied into Postgres.

Builds a catalog of N image rows (default 100,000) in 10 shards, with 5% tombstones, through
the catalog's own commit; copies it into a fresh schema of the Postgres at --target (default
CLIPSEARCH_TEST_DATABASE_URL), then drops that schema. No shard files are written: the
copy never reads them. Prints one JSON line.

    python bench/migrate_to.py --n 100000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.catalog.copy import copy_catalog
from retrieval.catalog.database import Catalog
from retrieval.catalog.records import GenerationCommit, ImageRecord, ShardRecord
from retrieval.catalog.tables import ACTIVE

SHARDS = 10


def populate(catalog: Catalog, n: int) -> None:
    model = {"name": "bench", "key": "bench"}
    per_shard = n // SHARDS
    next_id = 1
    for shard_number in range(SHARDS):
        shard_id = f"bench-{shard_number:02d}"
        commit = GenerationCommit(model=model)
        commit.new_shards.append(ShardRecord(shard_id, "flat", per_shard, 512, {}, "bench"))
        for _ in range(per_shard):
            commit.upserts.append(
                ImageRecord(
                    id=next_id,
                    path=f"/photos/{shard_number:02d}/{next_id:08d}.jpg",
                    sha256=f"{next_id:064x}",
                    size=100_000 + next_id,
                    mtime_ns=1_700_000_000_000_000_000 + next_id,
                    status=ACTIVE,
                    width=1024,
                    height=768,
                    format="JPEG",
                    shard_id=shard_id,
                )
            )
            next_id += 1
        catalog.commit(commit)
    catalog.commit(GenerationCommit(model=model, tombstones=list(range(1, next_id, 20))))
    for _ in range(30):
        catalog.finish_job(catalog.start_job("index", ["/photos"]), "succeeded", {}, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=5000)
    parser.add_argument("--target", default=os.environ.get("CLIPSEARCH_TEST_DATABASE_URL"))
    args = parser.parse_args()
    if not args.target:
        parser.error("give --target postgresql+psycopg://... or set CLIPSEARCH_TEST_DATABASE_URL")
    schema = "bench_" + uuid.uuid4().hex[:8]
    admin = create_engine(args.target)
    with admin.connect() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
        conn.commit()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            source = Catalog(f"sqlite:///{Path(tmp) / 'catalog.db'}")
            source.upgrade()
            started = time.perf_counter()
            populate(source, args.n)
            populate_seconds = time.perf_counter() - started
            sep = "&" if "?" in args.target else "?"
            target = Catalog(f"{args.target}{sep}options=-csearch_path%3D{schema}")
            report = copy_catalog(source, target, batch_size=args.batch_size)
            source.dispose()
            target.dispose()
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
            conn.commit()
        admin.dispose()
    print(
        json.dumps(
            {
                "bench": "migrate_to",
                "images": args.n,
                "rows": report.rows,
                "tables": report.to_dict()["tables"],
                "populate_seconds": round(populate_seconds, 2),
                "copy_seconds": round(report.seconds, 2),
                "rows_per_second": round(report.rows / report.seconds),
                "sequences_reset": report.sequences_reset,
            }
        )
    )


if __name__ == "__main__":
    main()

"""Where the Postgres catalog becomes the limit: what a nightly index job and the API ask of a
catalog of N synthetic images (default 1,000,000).

A fresh database (created and dropped through BENCH_PG_ADMIN_URL, default the local server's
`test` database) is migrated by the product, then filled: N image rows in shards of 100,000
(photo-library paths in 100 top folders of 100 sub-folders, a sha256 each, capture times over
ten years, 8 camera models, 0.1% tombstones) by COPY, and the zero-shot labels of one published
20-label set (top 3 per image) likewise; the counts are then read back through the Catalog API.
Timed through the product's own code, each a median of BENCH_REPEATS (3) unless it writes:

- scan_diff_read: Catalog.records_under of the whole root (what every `clipsearch index` run
  diffs the scan against), and of one top folder (1%), with the Python memory it holds;
- shard_commit_100k: one Catalog.commit of a new 100,000-image shard (the nightly write);
- poll: what every API replica runs each CLIPSEARCH_RELOAD_INTERVAL_SECONDS (schema check and
  generation), and on a new generation, the shard list and the tombstones;
- filter id sets: retrieval.filters.ids_passing for a path prefix (1%, 10%), a label, a capture
  date range (one year) and a camera, with the number of ids and their bytes;
- status: state, shards and counts (`clipsearch status` without its file hashing);
- rows_of_10_hits: Catalog.records of 10 random ids (per search);
- table and index sizes from Postgres.

Prints ONE JSON line. Usage: python bench/catalog_scale.py [N]
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.scratch_postgres import scratch_database  # noqa: E402
from retrieval.catalog.database import Catalog  # noqa: E402
from retrieval.catalog.records import (  # noqa: E402
    GenerationCommit,
    ImageRecord,
    PhotoFields,
    ShardRecord,
)
from retrieval.catalog.schema import require_catalog  # noqa: E402
from retrieval.catalog.tables import ACTIVE, DELETED  # noqa: E402
from retrieval.filters import SearchFilters, ids_passing  # noqa: E402
from retrieval.labels.definitions import LabelSet, LabelSpec  # noqa: E402
from retrieval.labels.store import LabelStore  # noqa: E402

DB_NAME = "clipsearch_bench_catalog"
REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))
SHARD = 100_000
LABELS = [f"label{n:02d}" for n in range(20)]
CAMERAS = [("Canon", f"EOS {n}D") for n in range(4)] + [
    ("Apple", f"iPhone {n}") for n in (12, 13, 14, 15)
]
EPOCH = dt.datetime(2015, 1, 1, tzinfo=dt.UTC)
MODEL = {"key": "bench-synthetic", "name": "synthetic", "pretrained": "none"}


def _path(i: int) -> str:
    return f"/photos/d{i % 100:02d}/s{(i // 100) % 100:02d}/img_{i:09d}.jpg"


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _image_lines(start: int, stop: int, shard: str, rng: np.random.Generator) -> str:
    """COPY text rows of images start..stop-1 (ids from 1)."""
    n = stop - start
    shas = rng.integers(0, 2**63, size=(n, 4), dtype=np.int64)
    taken = rng.integers(0, 10 * 365 * 86400, size=n)
    sizes = rng.integers(200_000, 6_000_000, size=n)
    out = io.StringIO()
    for k, i in enumerate(range(start, stop)):
        sha = "".join(f"{int(x):016x}" for x in shas[k])
        deleted = i % 997 == 0  # 0.1% tombstones: deleted, their vectors still in a shard
        status = DELETED if deleted else ACTIVE
        gone = "2025-01-01 00:00:00+00" if deleted else "\\N"
        make, model = CAMERAS[i % len(CAMERAS)]
        when = (EPOCH + dt.timedelta(seconds=int(taken[k]))).isoformat()
        out.write(
            f"{i}\t{_path(i)}\t{sha}\t{sizes[k]}\t{1_600_000_000_000_000_000 + i}\t4032\t3024\t"
            f"JPEG\t{status}\t\\N\t\\N\t{shard}\t2025-01-01 00:00:00+00\t{gone}\t{when}\texif\t"
            f"{make}\t{model}\t\\N\t\\N\n"
        )
    return out.getvalue()


IMAGE_COLUMNS = (
    "id, path, sha256, size, mtime_ns, width, height, format, status, error_reason, "
    "error_detail, shard_id, indexed_at, deleted_at, taken_at, taken_at_source, camera_make, "
    "camera_model, latitude, longitude"
)


def _fill(catalog: Catalog, url: str, rows: int) -> dict[str, Any]:
    """Shard rows through Catalog.commit; image and label rows by COPY; counts read back."""
    import psycopg

    shards = [f"s{n:04d}" for n in range((rows + SHARD - 1) // SHARD)]
    started = time.perf_counter()
    catalog.commit(
        GenerationCommit(
            model=MODEL,
            new_shards=[
                ShardRecord(s, "ivfpq", min(SHARD, rows - n * SHARD), 512, {}, "bench-synthetic")
                for n, s in enumerate(shards)
            ],
        )
    )
    store = LabelStore(catalog)
    stored, _ = store.put(LabelSet("scenes", tuple(LabelSpec(name) for name in LABELS)))
    version_id = stored.version_id
    rng = np.random.default_rng(0)
    plain = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain) as conn, conn.cursor() as cur:
        with cur.copy(f"COPY images ({IMAGE_COLUMNS}) FROM STDIN") as copy:
            for n, shard in enumerate(shards):
                copy.write(_image_lines(n * SHARD + 1, min(rows, (n + 1) * SHARD) + 1, shard, rng))
        images_s = time.perf_counter() - started
        with cur.copy(
            "COPY image_labels (version_id, image_id, rank, label, score) FROM STDIN"
        ) as copy:
            for start in range(1, rows + 1, SHARD):
                stop = min(rows + 1, start + SHARD)
                first = rng.integers(0, len(LABELS), size=stop - start)
                buf = io.StringIO()
                for k, i in enumerate(range(start, stop)):
                    for rank in range(3):
                        label = (int(first[k]) + rank * 7) % len(LABELS)
                        buf.write(f"{version_id}\t{i}\t{rank}\t{label}\t{0.6 / (rank + 1):.3f}\n")
                copy.write(buf.getvalue())
        cur.execute(
            "INSERT INTO labelled_shards (version_id, shard_id, labelled_at) "
            "SELECT %s, id, now() FROM shards",
            (version_id,),
        )
        conn.commit()
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
    store.publish(stored.id, stored.version)
    counts = catalog.counts()
    assert counts.get(ACTIVE, 0) + counts.get(DELETED, 0) == rows, counts
    return {
        "fill_s": round(time.perf_counter() - started, 1),
        "images_copy_s": round(images_s, 1),
        "counts": counts,
    }


def _timed(action: Callable[[], Any], repeats: int = REPEATS) -> tuple[dict[str, float], Any]:
    """Median wall milliseconds and this process's CPU milliseconds (the Python side: the
    database server's work shows in the wall time only), and the last result."""
    walls, cpus, result = [], [], None
    for _ in range(repeats):
        t, cpu = time.perf_counter(), time.process_time()
        result = action()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - cpu)
    ms = {"ms": float(np.median(walls)) * 1000, "cpu_ms": float(np.median(cpus)) * 1000}
    return {k: round(v, 1) for k, v in ms.items()}, result


def _sizes(url: str) -> dict[str, Any]:
    import psycopg

    plain = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain) as conn:
        rows = conn.execute(
            "SELECT c.relname, pg_relation_size(c.oid), c.relkind FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public' "
            "AND c.relkind IN ('r', 'i') AND pg_relation_size(c.oid) > 1048576 ORDER BY 2 DESC"
        ).fetchall()
        total = conn.execute("SELECT pg_database_size(current_database())").fetchone()
    assert total is not None
    return {
        "relations_mib": {name: round(size / 2**20, 1) for name, size, _ in rows},
        "database_mib": round(total[0] / 2**20, 1),
    }


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    load_start = os.getloadavg()
    started = time.perf_counter()
    result: dict[str, Any] = {"bench": "catalog_scale", "images": rows, "repeats": REPEATS}
    with scratch_database(DB_NAME) as url:
        catalog = Catalog(url)
        catalog.upgrade()
        result["fill"] = _fill(catalog, url, rows)
        result["sizes"] = _sizes(url)
        result["bytes_per_image"] = round(result["sizes"]["database_mib"] * 2**20 / rows)

        # The scan-diff read: every index run loads the live rows under its roots.
        before = _rss_mib()
        ms, found = _timed(lambda: catalog.records_under(["/photos"]), 1)
        held = _rss_mib() - before
        result["scan_diff_read"] = {
            "all": {**ms, "rows": len(found), "python_mib_held": round(held, 1)}
        }
        del found
        ms, found = _timed(lambda: catalog.records_under(["/photos/d07"]))
        result["scan_diff_read"]["one_percent"] = {**ms, "rows": len(found)}

        # The nightly write: one commit of a new 100,000-image shard.
        first = rows + 1
        records = [
            ImageRecord(
                id=i,
                path=f"/photos/new/img_{i:09d}.jpg",
                sha256=f"{i:064x}",
                size=1_000_000,
                mtime_ns=i,
                status=ACTIVE,
                width=4032,
                height=3024,
                format="JPEG",
                shard_id="new-shard",
                photo=PhotoFields(EPOCH, "exif", "Canon", "EOS 1D"),
            )
            for i in range(first, first + SHARD)
        ]
        commit = GenerationCommit(
            model=MODEL,
            new_shards=[ShardRecord("new-shard", "ivfpq", SHARD, 512, {}, "bench-synthetic")],
            upserts=records,
        )
        result["shard_commit_100k"] = _timed(lambda: catalog.commit(commit), 1)[0]

        # What each API replica reads: the poll, and on a new generation the shards and tombstones.
        index_dir = Path("/nonexistent-index-dir")
        result["poll"] = _timed(lambda: (require_catalog(catalog, index_dir), catalog.state()), 20)[
            0
        ]
        ms, tombstones = _timed(lambda: (catalog.shards(), catalog.tombstoned_ids()))
        result["new_generation_reads"] = {**ms, "tombstones": int(len(tombstones[1]))}

        labels = LabelStore(catalog)
        filters = {
            "path_prefix_1pct": SearchFilters(path_prefix="/photos/d07/"),
            "path_prefix_10pct": SearchFilters(path_prefix="/photos/d1"),
            "label": SearchFilters(labels=("label03",)),
            "taken_one_year": SearchFilters(
                taken_after=dt.datetime(2019, 1, 1, tzinfo=dt.UTC),
                taken_before=dt.datetime(2020, 1, 1, tzinfo=dt.UTC),
            ),
            "camera": SearchFilters(camera="iPhone 15"),
        }
        result["filter_id_sets"] = {}
        for name, wanted in filters.items():
            ms, ids = _timed(partial(ids_passing, catalog, wanted, labels))
            assert ids is not None and len(ids) > 0, name
            result["filter_id_sets"][name] = {
                **ms,
                "ids": int(len(ids)),
                "mib": round(ids.nbytes / 2**20, 2),
            }
        result["status"] = _timed(lambda: (catalog.state(), catalog.shards(), catalog.counts()))[0]
        rng = np.random.default_rng(3)
        result["rows_of_10_hits"] = _timed(
            lambda: catalog.records(int(i) for i in rng.integers(1, rows, 10)), 20
        )[0]
        catalog.dispose()
    result["max_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    result["loadavg_start"] = [round(x, 2) for x in load_start]
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

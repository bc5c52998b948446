"""Fault injection, the long run: random SIGKILLs of `clipsearch index`, `compact`, `label` and
`repair` with a reader searching throughout, byte flips in every shard file type before repairs,
and deleted catalogs, on SQLite and on Postgres. Prints ONE JSON line.

The machinery, and what each count means, is in tests/chaos.py (tests/indexer/test_chaos.py runs
a few kills of it in the suite). Every count but `kills`, `completed_runs` and `queries` must be
0, and `final_identical` true: after the last kill the index shows the same images, ranks every
query alike and gives the same labels as a clean twin that indexed the same files unkilled.

    python bench/chaos.py --kills 200 --database both
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)  # the fork server imports tests.chaos from here

DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=200, help="kills per database")
    parser.add_argument("--database", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("CLIPSEARCH_TEST_DATABASE_URL", DEFAULT_PG),
        help="a Postgres database to create private schemas in",
    )
    parser.add_argument(
        "--catalog-every", type=int, default=50, help="delete the catalog every N kills"
    )
    parser.add_argument(
        "--fresh-processes",
        action="store_true",
        help="start every command as a new `python -m indexer` instead of forking it from a "
        "server that imported torch once (slow: about ten seconds of imports per command)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder (and logs)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    # The reader logs every corrupt shard it leaves out; the counts say what matters.
    logging.basicConfig(level=logging.CRITICAL)
    # tests.conftest reads the Postgres URL when imported.
    os.environ["CLIPSEARCH_TEST_DATABASE_URL"] = args.postgres_url
    import open_clip
    import torch

    from retrieval.models.encoder import load_encoder
    from retrieval.models.identity import ModelSpec
    from retrieval.models.weights import register_model_configs
    from tests.chaos import MODEL, Chaos, ChaosConfig, Commands, Databases
    from tests.conftest import fresh_database

    torch.set_num_threads(1)  # the cores belong to the commands under test
    work = Path(tempfile.mkdtemp(prefix="clipsearch-chaos-"))
    register_model_configs()
    torch.manual_seed(1234)
    checkpoint = work / "tiny.pt"
    torch.save({"state_dict": open_clip.create_model(MODEL).state_dict()}, checkpoint)
    encoder = load_encoder(ModelSpec(MODEL, str(checkpoint), device="cpu"))
    commands = Commands(work / "logs", fresh_processes=args.fresh_processes)
    database_of = contextlib.contextmanager(fresh_database)

    kinds = ["sqlite", "postgres"] if args.database == "both" else [args.database]
    results: dict[str, Any] = {}
    started = time.monotonic()
    for kind in kinds:
        base = work / kind
        (base / "twin").mkdir(parents=True)
        with database_of(kind, base) as chaos_url, database_of(kind, base / "twin") as twin_url:
            blank = _blanks(database_of, base) if kind == "postgres" else None
            databases = Databases(kind, chaos_url, twin_url, blank)
            config = ChaosConfig(
                base=base,
                checkpoint=checkpoint,
                databases=databases,
                kills=args.kills,
                seed=args.seed,
                catalog_every=args.catalog_every,
            )
            report = Chaos(config, encoder, commands).run()
        results[kind] = report.to_dict()
    totals = _totals(results)
    print(
        json.dumps(
            {
                "bench": "chaos",
                "kills_per_database": args.kills,
                "seed": args.seed,
                "processes": "fresh" if args.fresh_processes else "forked",
                **totals,
                "seconds": round(time.monotonic() - started, 1),
                "databases": results,
                **({"work": str(work)} if args.keep else {}),
            }
        )
    )
    if not args.keep:
        _remove(work)


def _blanks(
    database_of: Callable[[str, Path], AbstractContextManager[str]], base: Path
) -> Callable[[], AbstractContextManager[str]]:
    """New empty Postgres schemas, one per call: the "deleted" catalog of a Postgres run."""
    made = itertools.count()
    return lambda: database_of("postgres", base / f"blank-{next(made)}")


def _totals(results: dict[str, Any]) -> dict[str, Any]:
    summed = ("kills", "failed_queries", "lost", "duplicated", "orphaned", "laundered")
    totals: dict[str, Any] = {key: sum(r[key] for r in results.values()) for key in summed}
    totals["final_identical"] = all(r["final_identical"] for r in results.values())
    return totals


def _remove(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()

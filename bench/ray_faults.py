"""Faults on the Ray engine: a Ray worker process, and separately the driver, SIGKILLed at a
random moment of `clipsearch index --engine ray`; then the job is run again and its index
compared with a clean run's. Prints ONE JSON line.

The cluster is a Ray cluster on this machine (`ray start --head`, as a team's would be already
running); the folder holds small generated pictures and two broken files, indexed in shards of
`--shard-size` so that a kill can fall between commits. Each run starts from an empty data dir
and catalog:

- worker runs: after a random delay within a clean run's time, one of the job's Ray worker
  processes (a decode task or an encode actor: `ray::` processes other than idle workers and
  Ray's agents) is killed. The job should survive it (Ray retries the task, restarts the actor)
  or fail with a clear error (exit 12); then the same command is run again;
- driver runs: the `clipsearch index` process itself is killed after a random delay, then the
  command is run again.

After the re-run the index must equal the clean run's (a clean `--engine ray` run of the same
folder): the same ids, paths, statuses and error reasons, vectors within 1e-5, the same search
results; and hold no lost image (a clean run's image missing or in another state), no
duplicate (a path active twice, an id in two shards) and no orphan (a shard dir without a
catalog row, or an active row whose shard does not hold its vector). Commands are forked from a
server that imported torch once (tests/chaos.py's `Commands`), and compared with its helpers.

    python bench/ray_faults.py --runs 20
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)  # the fork server imports tests.chaos from here

from bench.raycluster import LocalRayCluster, auth_env, worker_processes  # noqa: E402

CLUSTER_EXIT = 12  # ClusterError: the cluster could not run the job; nothing committed
SAME_VECTOR = 1e-5
QUERIES = 4
K = 10


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="runs of each kind")
    parser.add_argument("--images", type=int, default=80)
    parser.add_argument("--shard-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kills", choices=["both", "worker", "driver"], default="both")
    parser.add_argument(
        "--max-minutes", type=float, default=1e9, help="start no run after this many minutes"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder (and logs)")
    return parser.parse_args()


@dataclass
class Counts:
    """What the runs of one kind came to."""

    runs: int = 0
    killed: int = 0
    no_target: int = 0  # the job ended before a kill could land
    killed_titles: Counter[str] = field(default_factory=Counter)
    job_survived: int = 0  # exit 0 after a worker kill: Ray retried
    job_failed_clearly: int = 0  # exit 12 after a worker kill
    lock_held: int = 0  # exit 3 on the re-run
    rerun_failed: int = 0
    identical_after_rerun: int = 0
    lost: int = 0
    duplicated: int = 0
    orphaned: int = 0
    unexpected_exits: int = 0
    tracebacks: int = 0
    max_vector_diff: float = 0.0
    kill_seconds: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def note(self, problem: str) -> None:
        if len(self.problems) < 10:
            self.problems.append(problem[:1500])

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k not in ("kill_seconds", "problems")}
        data["killed_titles"] = dict(sorted(self.killed_titles.items()))
        data["max_vector_diff"] = float(f"{self.max_vector_diff:.3g}")
        if self.kill_seconds:
            data["kill_at_seconds"] = [
                round(min(self.kill_seconds), 2),
                round(float(np.median(self.kill_seconds)), 2),
                round(max(self.kill_seconds), 2),
            ]
        data["problems"] = self.problems
        return data


@dataclass
class Observed:
    """An index as a user sees it, by path."""

    rows: dict[str, tuple[int, str | None, str, str | None]]  # path -> id, sha, status, reason
    vectors: dict[str, np.ndarray]  # path -> stored vector (active rows)
    results: list[list[tuple[str, float]]]  # per query: (path, score) best first
    duplicated: list[str]
    orphaned: list[str]


def observe(data_dir: Path, root: Path, queries: np.ndarray) -> Observed:
    from retrieval.catalog.database import Catalog
    from retrieval.index.shard import Shard
    from retrieval.search import Searcher
    from tests.chaos import active_rows, orphan_shard_dirs

    index_dir = data_dir / "index"
    catalog = Catalog(f"sqlite:///{data_dir / 'catalog.db'}")
    try:
        records = catalog.records_under([str(root)])
        rows = {p: (r.id, r.sha256, r.status, r.error_reason) for p, r in records.items()}
        active = active_rows(catalog)
        duplicated = [p for p, n in Counter(p for _, p, _, _ in active).items() if n > 1]
        known = catalog.known_shard_ids()
        orphaned = orphan_shard_dirs(index_dir, known)
        holder: dict[int, str] = {}
        vectors: dict[str, np.ndarray] = {}
        by_shard: dict[str, list[tuple[int, str]]] = {}
        for image_id, path, _, shard_id in active:
            if shard_id is None or shard_id not in known:
                orphaned.append(f"row {image_id} names shard {shard_id}")
                continue
            by_shard.setdefault(shard_id, []).append((image_id, path))
        for shard_id in {row.id for row in catalog.shards()}:
            shard = Shard.open(index_dir, shard_id)
            for image_id in shard.ids.tolist():
                if image_id in holder:
                    duplicated.append(f"id {image_id} in {holder[image_id]} and {shard_id}")
                holder[image_id] = shard_id
            members = by_shard.get(shard_id, [])
            wanted = np.array(sorted(i for i, _ in members), dtype=np.int64)
            found_ids, found = shard.vectors(wanted)
            lookup = {int(i): found[n] for n, i in enumerate(found_ids)}
            for image_id, path in members:
                if image_id in lookup:
                    vectors[path] = lookup[image_id]
                else:
                    orphaned.append(f"row {image_id} has no vector in shard {shard_id}")
        paths = {r.id: p for p, r in records.items()}
        searcher = Searcher(catalog, index_dir, None)
        try:
            results = [
                [(paths[h.id], h.score) for h in searcher.search_vector(q, K).hits] for q in queries
            ]
        finally:
            searcher.close()
    finally:
        catalog.dispose()
    return Observed(rows, vectors, results, duplicated, orphaned)


def differences(mine: Observed, clean: Observed) -> tuple[list[str], set[str], float]:
    """What differs from the clean index, the clean images lost, and the largest vector gap."""
    found = []
    lost = {
        path
        for path, (_, _, status, _) in clean.rows.items()
        if path not in mine.rows or mine.rows[path][2] != status
    }
    if mine.rows != clean.rows:
        odd = sorted(set(mine.rows.items()) ^ set(clean.rows.items()))[:4]
        found.append(f"rows differ: {odd}")
    gap = 0.0
    for path, vector in clean.vectors.items():
        if path in mine.vectors:
            gap = max(gap, float(np.max(np.abs(mine.vectors[path] - vector))))
    if set(mine.vectors) != set(clean.vectors):
        found.append("other images have vectors")
    if gap > SAME_VECTOR:
        found.append(f"vectors differ by up to {gap:.3g}")
    for n, (ours, theirs) in enumerate(zip(mine.results, clean.results, strict=True)):
        if [p for p, _ in ours] != [p for p, _ in theirs] or any(
            abs(a - b) > 1e-4 for (_, a), (_, b) in zip(ours, theirs, strict=True)
        ):
            found.append(f"query {n}: other results")
    return found, lost, gap


def main() -> None:
    args = parse_args()
    import open_clip
    import torch

    from retrieval.models.weights import register_model_configs
    from tests.chaos import KILLED, MODEL, Commands, Corpus, Outcome

    torch.set_num_threads(1)  # the cores belong to the jobs under test
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="clipsearch-ray-faults-"))
    register_model_configs()
    torch.manual_seed(1234)
    checkpoint = work / "tiny.pt"
    torch.save({"state_dict": open_clip.create_model(MODEL).state_dict()}, checkpoint)
    root = work / "photos"
    Corpus(root, rng, lambda path: "").grow(args.images)
    (root / "broken").mkdir()
    (root / "broken" / "garbage.jpg").write_bytes(b"not a picture at all" * 10)
    whole = (root / "e0000" / "00.jpg").read_bytes()
    (root / "broken" / "truncated.jpg").write_bytes(whole[: len(whole) // 3])

    token = auth_env()
    os.environ.update(token)  # the fork server (and so every command) has the cluster's token
    commands = Commands(work / "logs")
    started = time.monotonic()
    cluster = LocalRayCluster(args.cpus, token)
    results: dict[str, Any] = {}
    try:

        def env(data_dir: Path, engine: str = "ray") -> dict[str, str]:
            return {
                "CLIPSEARCH_DATA_DIR": str(data_dir),
                "CLIPSEARCH_MODEL": MODEL,
                "CLIPSEARCH_PRETRAINED": str(checkpoint),
                "CLIPSEARCH_DEVICE": "cpu",
                "CLIPSEARCH_SHARD_SIZE": str(args.shard_size),
                "CLIPSEARCH_BATCH_SIZE": str(args.batch_size),
                "CLIPSEARCH_WORKERS": "1",
                "CLIPSEARCH_LABEL_ON_INDEX": "false",
                "CLIPSEARCH_ENGINE": engine,
                "CLIPSEARCH_RAY_ADDRESS": cluster.address,
            }

        argv = ["index", "--no-progress", str(root)]

        def index(data_dir: Path, engine: str = "ray", **kwargs: Any) -> Outcome:
            return commands.run(argv, env(data_dir, engine), **kwargs)

        clean_dir = work / "clean"
        outcome = index(clean_dir)
        assert outcome.code == 0, outcome.output[-3000:]
        clean_seconds = outcome.seconds
        no_queries = np.zeros((0, 1), dtype=np.float32)
        dim = next(iter(observe(clean_dir, root, no_queries).vectors.values())).size
        queries = np.random.default_rng(args.seed).standard_normal((QUERIES, dim))
        queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
        clean = observe(clean_dir, root, queries)
        local_dir = work / "local"
        local_outcome = index(local_dir, "local")
        assert local_outcome.code == 0, local_outcome.output[-3000:]
        local_found, _, local_gap = differences(observe(local_dir, root, queries), clean)

        # A second clean run: the same index again (the engine is deterministic), and how long
        # a whole job takes once the cluster is warm (its first job is slower): the kills fall
        # within that time.
        again_dir = work / "clean-again"
        again = index(again_dir)
        assert again.code == 0, again.output[-3000:]
        repeat_found, _, _ = differences(observe(again_dir, root, queries), clean)
        durations = [again.seconds]

        def typical() -> float:
            return float(np.median(durations[-8:]))

        def check(kind: Counts, data_dir: Path, first: Outcome) -> None:
            if "Traceback" in first.output:
                kind.tracebacks += 1
                kind.note(f"traceback: {first.output[-1500:]}")
            rerun = index(data_dir)
            if "Traceback" in rerun.output:
                kind.tracebacks += 1
                kind.note(f"re-run traceback: {rerun.output[-1500:]}")
            if rerun.code == 3:
                kind.lock_held += 1
            if rerun.code != 0:
                kind.rerun_failed += 1
                kind.note(f"re-run exit {rerun.code}: {rerun.output[-1500:]}")
                return
            mine = observe(data_dir, root, queries)
            found, lost, gap = differences(mine, clean)
            kind.max_vector_diff = max(kind.max_vector_diff, gap)
            kind.lost += len(lost)
            kind.duplicated += len(mine.duplicated)
            kind.orphaned += len(mine.orphaned)
            if mine.duplicated or mine.orphaned:
                kind.note(f"duplicated {mine.duplicated[:3]}, orphaned {mine.orphaned[:3]}")
            if found:
                # What `clipsearch verify` makes of it: a shard the reader leaves out?
                verified = commands.run(["verify"], env(data_dir))
                kind.note(
                    f"{data_dir.name}: {found}; verify exit {verified.code}: "
                    f"{verified.output[-600:]}"
                )
            else:
                kind.identical_after_rerun += 1

        workers, drivers = Counts(), Counts()

        def worker_run(run: int) -> None:
            """A decode task's or an encode actor's process killed at a random moment."""
            data_dir = work / f"worker-{run:03d}"
            holder: dict[str, Outcome] = {}
            thread = threading.Thread(target=lambda: holder.update(o=index(data_dir)))
            job_started = time.monotonic()
            thread.start()
            time.sleep(rng.uniform(0, 0.8 * typical()))
            victim = None
            while thread.is_alive() and victim is None:
                busy = worker_processes(cluster.pids())
                if busy:
                    victim = rng.choice(sorted(busy))
                    try:
                        os.kill(victim, signal.SIGKILL)
                    except ProcessLookupError:
                        victim = None
                        continue
                    title = busy[victim]
                    workers.killed += 1
                    workers.killed_titles["encode" if "EncodeActor" in title else "decode"] += 1
                    workers.kill_seconds.append(time.monotonic() - job_started)
                else:
                    time.sleep(0.05)
            thread.join()
            first = holder["o"]
            if first.code == 0:
                durations.append(first.seconds)
            workers.runs += 1
            if victim is None:
                workers.no_target += 1
            elif first.code == 0:
                workers.job_survived += 1
            elif first.code == CLUSTER_EXIT:
                workers.job_failed_clearly += 1
            else:
                workers.unexpected_exits += 1
                workers.note(f"exit {first.code} after a worker kill: {first.output[-1500:]}")
            check(workers, data_dir, first)
            shutil.rmtree(data_dir, ignore_errors=True)

        def driver_run(run: int) -> None:
            """The `clipsearch index` process itself killed at a random moment."""
            data_dir = work / f"driver-{run:03d}"
            delay = rng.uniform(0.2, typical())
            first = index(data_dir, kill_after=delay)
            drivers.runs += 1
            if first.code == KILLED:
                drivers.killed += 1
                drivers.kill_seconds.append(delay)
            elif first.code == 0:
                drivers.no_target += 1
            else:
                drivers.unexpected_exits += 1
                drivers.note(f"exit {first.code} before the kill: {first.output[-1500:]}")
            check(drivers, data_dir, first)
            shutil.rmtree(data_dir, ignore_errors=True)

        # The two kinds take turns, so that a time limit cuts both alike.
        for run in range(args.runs):
            if time.monotonic() - started > 60 * args.max_minutes:
                break
            if args.kills in ("both", "worker"):
                worker_run(run)
            if args.kills in ("both", "driver"):
                driver_run(run)
        results = {
            "worker_kills": workers.to_dict(),
            "driver_kills": drivers.to_dict(),
        }
    finally:
        cluster.stop()
    print(
        json.dumps(
            {
                "bench": "ray_faults",
                "images": args.images,
                "broken_files": 2,
                "shard_size": args.shard_size,
                "batch_size": args.batch_size,
                "cpus": args.cpus,
                "seed": args.seed,
                "clean_run_seconds": round(clean_seconds, 1),
                "clean_run_again_seconds": round(durations[0], 1),
                "clean_ray_repeats_itself": not repeat_found,
                "clean_ray_equals_local": not local_found,
                "ray_vs_local": {"differences": local_found, "max_vector_diff": local_gap},
                **results,
                "seconds": round(time.monotonic() - started, 1),
                **({"work": str(work)} if args.keep else {}),
            }
        )
    )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

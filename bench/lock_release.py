"""How soon the indexer lock is free, and its DataLoader workers gone, after `kill -9`.

Runs `clipsearch index --workers N` over generated pictures, lets it SIGKILL itself after its
first encoded batch (CLIPSEARCH_CRASH_AT=during_encode, workers busy decoding ahead), and
measures from the moment the killed process is reaped until (a) the lock in index_dir can be
taken and (b) no process of that run is left. Repeats, and prints one JSON line.

    python bench/lock_release.py --runs 5 --workers 2
    python bench/lock_release.py --repo /path/to/an/older/checkout   # the same, for that code
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from retrieval.training.shapes import generate_shapes  # noqa: E402

MARK = "CLIPSEARCH_BENCH_RUN"


def processes_of(run: str) -> list[int]:
    """Live (not zombie) processes whose environment carries this run's mark."""
    found = []
    needle = f"{MARK}={run}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                state = handle.read().rsplit(b")", 1)[1].split()[0]
            if state in (b"Z", b"X"):
                continue
            with open(f"/proc/{entry}/environ", "rb") as handle:
                if needle in handle.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def lock_is_free(path: Path) -> bool:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing our only descriptor releases it again
    return True


def one_run(repo: Path, base: Path, workers: int, limit_s: float) -> dict[str, float | int]:
    run = uuid.uuid4().hex
    data = base / f"data-{run[:8]}"
    env = {
        **os.environ,
        "PYTHONPATH": str(repo),
        MARK: run,
        "CLIPSEARCH_CRASH_AT": "during_encode",
        "CLIPSEARCH_DATA_DIR": str(data),
        "CLIPSEARCH_MODEL": "clipsearch-tiny",
        "CLIPSEARCH_PRETRAINED": "none",
        "CLIPSEARCH_DEVICE": "cpu",
        "CLIPSEARCH_BATCH_SIZE": "4",
    }
    args = [sys.executable, "-m", "indexer", "index", str(base / "pics"), "--no-progress"]
    # No pipes: a reader of the output would wait for the workers, which hold them open.
    proc = subprocess.Popen(
        [*args, "--workers", str(workers)],
        cwd=repo,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    most = 0
    next_scan = 0.0
    while proc.poll() is None:
        if time.monotonic() >= next_scan:
            most = max(most, len(processes_of(run)) - 1)
            next_scan = time.monotonic() + 0.05
        time.sleep(0.001)
    reaped = time.perf_counter()
    lock_path = data / "index" / "indexer.lock"
    lock_s = workers_s = limit_s
    while time.perf_counter() - reaped < limit_s:
        now = time.perf_counter() - reaped
        if lock_s == limit_s and lock_is_free(lock_path):
            lock_s = now
        if workers_s == limit_s and not processes_of(run):
            workers_s = now
        if lock_s < limit_s and workers_s < limit_s:
            break
        time.sleep(0.001)
    return {
        "exit": proc.returncode,
        "workers_seen": most,
        "lock_free_s": lock_s,
        "workers_gone_s": workers_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--limit", type=float, default=15.0, help="give up after this many s")
    parser.add_argument("--repo", type=Path, default=REPO, help="the code to run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        generate_shapes(base / "pics", args.images, seed=3)
        runs = [one_run(args.repo, base, args.workers, args.limit) for _ in range(args.runs)]
    lock = [float(r["lock_free_s"]) for r in runs]
    gone = [float(r["workers_gone_s"]) for r in runs]
    print(
        json.dumps(
            {
                "bench": "lock_release",
                "repo": str(args.repo),
                "runs": args.runs,
                "workers": args.workers,
                "killed_by_sigkill": sum(r["exit"] == -9 for r in runs),
                "workers_alive_at_kill_min": min(int(r["workers_seen"]) for r in runs),
                "lock_free_after_kill_s": {
                    "median": round(statistics.median(lock), 4),
                    "max": round(max(lock), 4),
                },
                "workers_gone_after_kill_s": {
                    "median": round(statistics.median(gone), 4),
                    "max": round(max(gone), 4),
                },
                "limit_s": args.limit,
            }
        )
    )


if __name__ == "__main__":
    main()

"""Text-query encoding with 2 vs 1 torch threads: on a quiet machine, and beside busy processes.

Why CLIPSEARCH_TORCH_THREADS exists: on a small box the API shares its cores with the nightly
indexer, and torch's default pool (one thread per core) then spins against it. ViT-B-32 with
random weights (timing only). Prints ONE JSON line.
Usage: python bench/torch_threads.py [BUSY_PROCESSES]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from retrieval.models.encoder import load_encoder
from retrieval.models.identity import ModelSpec

QUERY = ["a photo of a red dog on a beach"]


def _p50_ms(run: Callable[[], object], reps: int = 40) -> float:
    run()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return round(times[len(times) // 2], 1)


def main() -> None:
    busy_count = int(sys.argv[1]) if len(sys.argv) > 1 else os.cpu_count() or 2
    encoder = load_encoder(ModelSpec("ViT-B-32", "none", device="cpu"))
    default_threads = torch.get_num_threads()
    result: dict[str, object] = {
        "bench": "torch_threads",
        "cpu_count": os.cpu_count(),
        "busy_processes": busy_count,
    }
    for busy in (0, busy_count):
        burners = [
            subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)
        ]
        try:
            time.sleep(1)
            for threads in (default_threads, 1):
                torch.set_num_threads(threads)
                key = f"{'busy' if busy else 'quiet'}_threads{threads}_p50_ms"
                result[key] = _p50_ms(lambda: encoder.encode_texts(QUERY))
        finally:
            for burner in burners:
                burner.kill()
                burner.wait()
    print(json.dumps(result))


if __name__ == "__main__":
    main()

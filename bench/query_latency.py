"""Query latency: text encoding (full context vs trimmed) and end-to-end POST /search/text.

ViT-B-32 with random weights (pretrained="none"), 100k synthetic stored vectors in one shard
of the kind the indexer would build for them (BENCH_KIND, default auto: HNSW at 100k) plus
catalog rows, uvicorn in a subprocess on loopback; concurrency 1 and 16, with micro-batching
on and off, and on again with CLIPSEARCH_PRECISION=bf16. Prints ONE JSON line.
Usage: python bench/query_latency.py [N]
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.served_corpus import build_served_corpus, query_text  # noqa: E402
from retrieval.models.encoder import load_encoder  # noqa: E402
from retrieval.models.identity import ModelSpec  # noqa: E402


def _pct(values: list[float]) -> dict[str, float]:
    arr = np.array(values)
    return {
        "p50": round(float(np.percentile(arr, 50)), 2),
        "p99": round(float(np.percentile(arr, 99)), 2),
    }


def _encode_times(reps: int) -> dict[str, dict[str, float]]:
    encoder = load_encoder(ModelSpec("ViT-B-32", "none", device="cpu"))
    # bf16 weights halve the bytes each query streams through (on CPUs with native bf16).
    bf16 = load_encoder(ModelSpec("ViT-B-32", "none", device="cpu", precision="bf16"))
    runs = (("full", encoder, False), ("trimmed", encoder, True), ("trimmed_bf16", bf16, True))
    out: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    for i in range(reps):
        for mode, model, trim in runs:
            t = time.perf_counter()
            model.encode_texts([query_text(10_000 + i)], trim=trim)
            out[mode].append((time.perf_counter() - t) * 1000)
    return {k: _pct(v) for k, v in out.items()}


async def _load(base: str, concurrency: int, total: int, offset: int) -> dict[str, Any]:
    latencies: list[float] = []
    parts: dict[str, list[float]] = {}
    counter = iter(range(total))
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:

        async def worker() -> None:
            for i in counter:
                t = time.perf_counter()
                r = await client.post(
                    "/search/text", json={"query": query_text(offset + i), "k": 10}
                )
                r.raise_for_status()
                latencies.append((time.perf_counter() - t) * 1000)
                for part, ms in r.json()["took_ms"].items():
                    parts.setdefault(part, []).append(ms)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    # The server's own breakdown (p50 of each part), to see where the time goes.
    server = {part: round(float(np.median(v)), 2) for part, v in parts.items()}
    return {**_pct(latencies), "qps": round(total / wall, 1), "server_p50_ms": server}


def _serve(
    env: dict[str, str], microbatch: bool, requests: int, precision: str = "fp32"
) -> dict[str, object]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    full_env = {
        **os.environ,
        **env,
        "CLIPSEARCH_MICROBATCH": str(microbatch).lower(),
        "CLIPSEARCH_PRECISION": precision,
        "CLIPSEARCH_QUERY_CACHE_SIZE": "0",
        "CLIPSEARCH_RELOAD_INTERVAL_SECONDS": "0",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "indexer", "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO,
        env=full_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(base + "/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("server did not become ready")
            time.sleep(0.5)
        asyncio.run(_load(base, 1, 5, 900_000))  # warm-up
        return {
            "c1": asyncio.run(_load(base, 1, requests, 0)),
            "c16": asyncio.run(_load(base, 16, requests * 2, 500_000 if microbatch else 600_000)),
        }
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    requests = int(os.environ.get("BENCH_REQUESTS", "64"))
    with tempfile.TemporaryDirectory() as tmp:
        env, kind = build_served_corpus(
            Path(tmp), "ViT-B-32", n, os.environ.get("BENCH_KIND", "auto")
        )
        result: dict[str, object] = {
            "bench": "query_latency",
            "model": "ViT-B-32/none",
            "vectors": n,
            "index_kind": kind,
            "cpu_count": os.cpu_count(),
            "text_encode_ms": _encode_times(30),
        }
        http = {
            "microbatch_on": _serve(env, True, requests),
            "microbatch_off": _serve(env, False, requests),
            "microbatch_on_bf16": _serve(env, True, requests, precision="bf16"),
        }
        result["search_text_http_ms"] = http
        on: Any = http["microbatch_on"]["c16"]
        off: Any = http["microbatch_off"]["c16"]
        result["c16_throughput_ratio_on_vs_off"] = round(on["qps"] / off["qps"], 2)
        print(json.dumps(result))


if __name__ == "__main__":
    main()

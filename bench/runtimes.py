"""Runtimes side by side: torch fp32, torch bf16, ONNX Runtime fp32 and int8, in one run.

ViT-B-32 with random weights (`--pretrained none`: random weights time the same as real ones),
on the CPU. For each runtime: a text query's encode time at concurrency 1 (p50 and p99, trimmed
as the API runs it), the image tower's img/s at batch 32 (preprocessed tensors: the model's
share of indexing), and its fidelity against torch fp32 (cosine of unit embeddings, min and
median over queries and images). The ONNX exports go through the product's own path
(`CLIPSEARCH_RUNTIME=onnx`, `CLIPSEARCH_QUANTIZE=int8`); their export time is reported.

With `--serve`, also one real `clipsearch serve` per runtime on the same served index
(`--vectors` synthetic unit vectors, bench/served_corpus.py), one after the other: `POST
/search/text` at concurrency 1 (p50, p99, and the server's own p50 of each part), then the
server process's peak RSS (VmHWM, start-up included). The servers read the exports made above
from the same model cache (CLIPSEARCH_MODEL_CACHE_DIR, CLIPSEARCH_ONNX_FALLBACK=refuse); the
export files are checked unchanged. With `--index N`, the index job's img/s on N
photo-sized JPEGs with each runtime's encoder.
Prints ONE JSON line.

Usage: python bench/runtimes.py [--model ViT-B-32] [--queries 40] [--image-batches 3]
       [--cache DIR]  (an export cache to reuse; default: a new temporary one)
       [--serve [--vectors 100000] [--requests 40]] [--index PHOTOS]
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.served_corpus import build_served_corpus, query_text  # noqa: E402
from indexer.pipeline import IndexJob  # noqa: E402
from retrieval.catalog.database import Catalog  # noqa: E402
from retrieval.config import load_settings  # noqa: E402
from retrieval.models.cache import exports_dir  # noqa: E402
from retrieval.models.encoder import Encoder, load_encoder  # noqa: E402
from retrieval.models.identity import ModelSpec, RuntimeSpec  # noqa: E402
from retrieval.training.fidelity import row_cosines  # noqa: E402
from retrieval.training.shapes import generate_photos  # noqa: E402

BATCH = 32
# The environment of each runtime's `clipsearch serve`.
SERVE_ENV = {
    "torch_fp32": {"CLIPSEARCH_RUNTIME": "torch", "CLIPSEARCH_PRECISION": "fp32"},
    "torch_bf16": {"CLIPSEARCH_RUNTIME": "torch", "CLIPSEARCH_PRECISION": "bf16"},
    "onnx_fp32": {"CLIPSEARCH_RUNTIME": "onnx", "CLIPSEARCH_QUANTIZE": "none"},
    "onnx_int8": {"CLIPSEARCH_RUNTIME": "onnx", "CLIPSEARCH_QUANTIZE": "int8"},
}


def _timed(load: Callable[[], Encoder]) -> tuple[Encoder, float]:
    started = time.perf_counter()
    encoder = load()
    return encoder, time.perf_counter() - started


def _text_ms(encoders: dict[str, Encoder], queries: int) -> dict[str, dict[str, float]]:
    """Per-query encode time; the runtimes take turns on each query, so that load from other
    processes falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in encoders}
    for encoder in encoders.values():  # warm-up
        encoder.encode_texts([query_text(0)])
    for i in range(queries):
        for name, encoder in encoders.items():
            started = time.perf_counter()
            encoder.encode_texts([query_text(10_000 + i)])
            times[name].append((time.perf_counter() - started) * 1000)
    return {
        name: {
            "p50": round(float(np.percentile(values, 50)), 2),
            "p99": round(float(np.percentile(values, 99)), 2),
        }
        for name, values in times.items()
    }


def _images_per_s(encoders: dict[str, Encoder], batches: int, size: int) -> dict[str, float]:
    pixels = torch.randn(BATCH, 3, size, size, generator=torch.Generator().manual_seed(0))
    spent = dict.fromkeys(encoders, 0.0)
    for encoder in encoders.values():  # warm-up
        encoder.encode_image_tensors(pixels[:4])
    for _ in range(batches):
        for name, encoder in encoders.items():
            started = time.perf_counter()
            encoder.encode_image_tensors(pixels)
            spent[name] += time.perf_counter() - started
    return {name: round(BATCH * batches / seconds, 1) for name, seconds in spent.items()}


def _fidelity(
    encoders: dict[str, Encoder], reference: Encoder, size: int
) -> dict[str, dict[str, float]]:
    texts = [query_text(20_000 + i) for i in range(64)]
    pixels = torch.randn(16, 3, size, size, generator=torch.Generator().manual_seed(1))
    ref = np.concatenate([reference.encode_texts(texts), reference.encode_image_tensors(pixels)])
    out = {}
    for name, encoder in encoders.items():
        ours = np.concatenate([encoder.encode_texts(texts), encoder.encode_image_tensors(pixels)])
        cosines = row_cosines(ours, ref)
        out[name] = {
            "cosine_min": round(float(cosines.min()), 6),
            "cosine_median": round(float(np.median(cosines)), 6),
        }
    return out


def _same(encoder: Encoder) -> Encoder:
    return encoder


def _index_img_per_s(encoders: dict[str, Encoder], photos: int, model: str) -> dict[str, float]:
    """The index job (scan, hash, decode in workers, encode, write, commit) on `photos`
    1024x768 JPEGs, each runtime into a fresh index; torch fp32 runs again last, to show how
    much the machine's load moved meanwhile."""
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="clipsearch-runtimes-index-") as tmp:
        folder = Path(tmp) / "photos"
        generate_photos(folder, photos, seed=0)
        for name in [*encoders, "torch_fp32_again"]:
            encoder = encoders[name.removesuffix("_again")]
            settings = load_settings(data_dir=Path(tmp) / name, model=model, pretrained="none")
            catalog = Catalog(settings.resolved_database_url)
            started = time.perf_counter()
            report = IndexJob(settings, catalog, partial(_same, encoder), progress=False).run(
                [folder]
            )
            seconds = time.perf_counter() - started
            catalog.dispose()
            if report.encoded != photos:
                raise RuntimeError(f"{name}: indexed {report.encoded} of {photos} photos")
            out[name] = round(photos / seconds, 1)
    return out


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    """Each file under `folder` with its size and mtime: an export rewritten shows here."""
    return {
        str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not path.name.startswith(".")  # not the .lock
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _peak_rss_mb(pid: int) -> dict[str, float]:
    """VmHWM (peak resident set) and VmRSS of a live process, in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = round(int(value.split()[0]) / 1024, 1)  # kB
    return {"peak_rss_mb": fields["VmHWM"], "rss_after_mb": fields["VmRSS"]}


def _wait_ready(base: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 600
    while True:
        try:
            if httpx.get(base + "/ready", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"server did not become ready:\n{tail}")
        time.sleep(0.5)


def _serve_one(base_env: dict[str, str], name: str, requests: int, log: Path) -> dict[str, Any]:
    """Start `clipsearch serve` for one runtime, time `requests` queries, read its peak RSS."""
    port = _free_port()
    env = {**os.environ, **base_env, **SERVE_ENV[name]}
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "indexer", "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        started = time.perf_counter()
        _wait_ready(base, proc, log)
        ready_s = time.perf_counter() - started
        times: list[float] = []
        parts: dict[str, list[float]] = {}
        with httpx.Client(base_url=base, timeout=60) as client:
            for i in range(-5, requests):  # the first five warm up
                query = {"query": query_text(900_000 + i), "k": 10}
                t = time.perf_counter()
                r = client.post("/search/text", json=query)
                r.raise_for_status()
                if len(r.json()["results"]) != 10:  # a shard left out would time nothing
                    raise RuntimeError(f"{name}: {len(r.json()['results'])} hits, not 10")
                if i >= 0:
                    times.append((time.perf_counter() - t) * 1000)
                    for part, ms in r.json()["took_ms"].items():
                        parts.setdefault(part, []).append(ms)
        return {
            "p50": round(float(np.percentile(times, 50)), 2),
            "p99": round(float(np.percentile(times, 99)), 2),
            "server_p50_ms": {part: round(float(np.median(v)), 2) for part, v in parts.items()},
            **_peak_rss_mb(proc.pid),
            "ready_s": round(ready_s, 1),
        }
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _serve(
    names: list[str], cache: Path, vectors: int, requests: int, model: str
) -> dict[str, Any]:
    """One `clipsearch serve` per runtime, one after the other: servers up at once and taking
    turns slow each other down (an idle server's threads still spin after its last query)."""
    with tempfile.TemporaryDirectory(prefix="clipsearch-runtimes-serve-") as tmp:
        corpus_env, kind = build_served_corpus(Path(tmp), model, vectors)
        base_env = {
            **corpus_env,
            "CLIPSEARCH_MODEL_CACHE_DIR": str(cache),
            "CLIPSEARCH_ONNX_FALLBACK": "refuse",  # never torch under an onnx name
            "CLIPSEARCH_QUERY_CACHE_SIZE": "0",
            "CLIPSEARCH_RELOAD_INTERVAL_SECONDS": "0",
        }
        servers = {
            name: _serve_one(base_env, name, requests, Path(tmp) / f"serve-{name}.log")
            for name in names
        }
    return {"index_kind": kind, "servers": servers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--image-batches", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--serve", action="store_true", help="also time a served index")
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--index", type=int, default=0, metavar="PHOTOS", help="also time indexing")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    cache = args.cache or Path(tempfile.mkdtemp(prefix="clipsearch-runtimes-"))
    spec = ModelSpec(args.model, "none", device="cpu", cache_dir=cache)
    encoders: dict[str, Encoder] = {}
    load_s: dict[str, float] = {}
    encoders["torch_fp32"], load_s["torch_fp32"] = _timed(lambda: load_encoder(spec))
    encoders["torch_bf16"], load_s["torch_bf16"] = _timed(
        lambda: load_encoder(replace(spec, precision="bf16"))
    )
    # The first onnx load exports (and verifies) the towers; the int8 load adds the int8 graphs.
    encoders["onnx_fp32"], load_s["onnx_fp32_with_export"] = _timed(
        lambda: load_encoder(replace(spec, runtime=RuntimeSpec("onnx")))
    )
    encoders["onnx_int8"], load_s["onnx_int8_with_quantize"] = _timed(
        lambda: load_encoder(replace(spec, runtime=RuntimeSpec("onnx", quantize="int8")))
    )
    _, load_s["onnx_fp32_cached"] = _timed(
        lambda: load_encoder(replace(spec, runtime=RuntimeSpec("onnx")))
    )
    size = encoders["torch_fp32"].identity.image_size

    text = _text_ms(encoders, args.queries)
    images = _images_per_s(encoders, args.image_batches, size)
    fidelity = _fidelity(encoders, encoders["torch_fp32"], size)
    base_text, base_images = text["torch_fp32"]["p50"], images["torch_fp32"]
    result: dict[str, Any] = {
        "bench": "runtimes",
        "model": f"{args.model} (random weights)",
        "threads": torch.get_num_threads(),
        "text_query_ms": text,
        "image_img_per_s_batch32": images,
        "vs_torch_fp32": {
            name: {
                "text_speedup": round(base_text / text[name]["p50"], 2),
                "image_speedup": round(images[name] / base_images, 2),
            }
            for name in encoders
        },
        "fidelity_vs_torch_fp32": fidelity,
        "load_s": {name: round(seconds, 1) for name, seconds in load_s.items()},
        "queries": args.queries,
        "image_batches": args.image_batches,
    }
    if args.index:
        indexed = _index_img_per_s(encoders, args.index, args.model)
        result["index_job_img_per_s"] = {
            "photos": args.index,
            "size": "1024x768",
            **indexed,
            "vs_torch_fp32": {
                name: round(indexed[name] / indexed["torch_fp32"], 2) for name in encoders
            },
        }
    if args.serve:
        names = list(encoders)
        del encoders, _
        gc.collect()
        exports = exports_dir(cache)
        before = _files(exports)
        serve = _serve(names, cache, args.vectors, args.requests, args.model)
        servers = serve["servers"]
        base_ms, base_rss = servers["torch_fp32"]["p50"], servers["torch_fp32"]["peak_rss_mb"]
        result["serve"] = {
            "vectors": args.vectors,
            "index_kind": serve["index_kind"],
            "requests": args.requests,
            "concurrency": 1,
            "search_text_ms": servers,
            "vs_torch_fp32": {
                name: {
                    "search_speedup": round(base_ms / s["p50"], 2),
                    "peak_rss_ratio": round(s["peak_rss_mb"] / base_rss, 2),
                }
                for name, s in servers.items()
            },
            "exports_unchanged_by_serve": _files(exports) == before and bool(before),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

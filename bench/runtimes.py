"""Runtimes side by side: torch fp32, torch bf16, ONNX Runtime fp32 and int8, in one run.

ViT-B-32 with random weights (`--pretrained none`: random weights time the same as real ones),
on the CPU. For each runtime: a text query's encode time at concurrency 1 (p50 and p99, trimmed
as the API runs it), the image tower's img/s at batch 32 (preprocessed tensors: the model's
share of indexing), and its fidelity against torch fp32 (cosine of unit embeddings, min and
median over queries and images). The ONNX exports go through the product's own path
(`CLIPSEARCH_RUNTIME=onnx`, `CLIPSEARCH_QUANTIZE=int8`); their export time is reported.
Prints ONE JSON line.

Usage: python bench/runtimes.py [--model ViT-B-32] [--queries 40] [--image-batches 3]
       [--cache DIR]  (an export cache to reuse; default: a new temporary one)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.served_corpus import query_text  # noqa: E402
from retrieval.models.encoder import Encoder, load_encoder  # noqa: E402
from retrieval.models.identity import ModelSpec, RuntimeSpec  # noqa: E402

BATCH = 32


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
        cosines = (ours.astype(np.float64) * ref).sum(axis=1)
        out[name] = {
            "cosine_min": round(float(cosines.min()), 6),
            "cosine_median": round(float(np.median(cosines)), 6),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--image-batches", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=None)
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
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Indexing throughput: the full `clipsearch index` job against two baselines, in one run.

  1. images/s of the whole index job (scan, hash, decode in workers, encode, write, commit);
  2. images/s of the model alone on pre-made tensors (same batch size and threads);
  3. images/s of a naive loop: open, preprocess, encode and add one image at a time.

Targets: 1/2 >= 0.85 (decoding hides behind encoding) and 1/3 >= 3.
Random weights are fine for timing. Prints one JSON line.

    python bench/index_throughput.py --model ViT-B-32 --n 1000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexer.pipeline import IndexJob
from retrieval.catalog.database import Catalog
from retrieval.config import load_settings  # noqa: E402
from retrieval.images import decode_image  # noqa: E402
from retrieval.models.encoder import load_encoder
from retrieval.models.identity import ModelSpec
from retrieval.training.shapes import generate_photos


def photo_folder(base: Path, n: int) -> Path:
    """`base`/N holding N generated 1024x768 photo JPEGs (made once, kept between runs)."""
    photos = base / f"{n}"
    if len(list(photos.glob("*.jpg"))) != n:
        shutil.rmtree(photos, ignore_errors=True)
        generate_photos(photos, n, seed=0)
    return photos


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="clipsearch-tiny")
    parser.add_argument("--n", type=int, default=1000, help="photos in the folder")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--naive-n", type=int, default=200, help="images for the naive loop")
    parser.add_argument("--photos", type=Path, default=Path("bench/out/photos"))
    args = parser.parse_args()

    photos = photo_folder(args.photos, args.n)
    paths = sorted(str(p) for p in photos.glob("*.jpg"))

    encoder = load_encoder(ModelSpec(args.model, "none", device="auto"))
    size = encoder.identity.image_size
    threads = torch.get_num_threads()

    # 2. the model alone, on tensors made in advance
    tensors = torch.randn(args.batch_size, 3, size, size)
    encoder.encode_image_tensors(tensors[:2])  # warm-up
    started = time.perf_counter()
    done = 0
    while done < args.n:
        batch = tensors[: min(args.batch_size, args.n - done)]
        encoder.encode_image_tensors(batch)
        done += batch.shape[0]
    model_ips = args.n / (time.perf_counter() - started)

    # 1. the whole index job, fresh state
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(
            data_dir=Path(tmp),
            model=args.model,
            pretrained="none",
            batch_size=args.batch_size,
            workers=args.workers,
        )
        catalog = Catalog(settings.resolved_database_url)
        started = time.perf_counter()
        report = IndexJob(settings, catalog, lambda: encoder, progress=False).run([photos])
        job_seconds = time.perf_counter() - started
        catalog.dispose()
    assert report.encoded == args.n, report.to_dict()
    job_ips = args.n / job_seconds

    # 3. one image at a time: open, preprocess, encode, add
    naive = paths[: args.naive_n]
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(encoder.dim))
    started = time.perf_counter()
    for number, path in enumerate(naive):
        image = decode_image(path, max_pixels=100_000_000).image
        vector = encoder.encode_image_tensors(encoder.preprocess(image).unsqueeze(0))
        index.add_with_ids(vector, np.array([number], dtype=np.int64))
    naive_ips = len(naive) / (time.perf_counter() - started)

    print(
        json.dumps(
            {
                "bench": "index_throughput",
                "model": args.model,
                "images": args.n,
                "image_size": "1024x768",
                "batch_size": args.batch_size,
                "workers": args.workers,
                "torch_threads": threads,
                "device": encoder.device,
                "index_job_ips": round(job_ips, 2),
                "model_only_ips": round(model_ips, 2),
                "naive_loop_ips": round(naive_ips, 2),
                "job_over_model": round(job_ips / model_ips, 3),
                "job_over_naive": round(job_ips / naive_ips, 3),
                "job_seconds": round(job_seconds, 2),
            }
        )
    )


if __name__ == "__main__":
    main()

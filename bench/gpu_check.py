"""GPU checks in one run, on a CUDA machine: CUDA encode, fp16, FAISS on the GPU, throughput.

  1. fidelity: one random-init ViT-B-32 checkpoint loaded through the product's loader on the
     CPU (fp32) and on CUDA (fp32, fp16); image and text embeddings compared (cosine, max |diff|);
  2. FAISS GPU (when this FAISS build sees a GPU): an IVF shard trained and filled on the GPU
     against the CPU build (recall@10 of each against exact search, before any re-scoring),
     and ShardSet searches through the real `FaissGpu` placement, with tombstones, against the
     CPU searches;
  3. `bench/index_throughput.py` on the GPU (full job, model alone, naive loop).

Prints one JSON line (also written to --out/gpu_check.json). On a machine without CUDA it says
so and checks only what needs no GPU. `scripts/device_check.sh` installs the carried wheels and
runs this on a GPU machine without network access.

    python bench/gpu_check.py --out /tmp/gpu-check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.images import decode_image  # noqa: E402
from retrieval.index.faiss_gpu import FaissGpu, gpu_available
from retrieval.index.kinds import IndexParams, build_index
from retrieval.index.shard import write_shard
from retrieval.index.shard_set import ShardSet
from retrieval.models.encoder import load_encoder
from retrieval.models.identity import ModelSpec
from retrieval.training.shapes import generate_photos

TEXTS = ["a photo of a dog", "a red car on a street", "a bowl of fruit", "mountains at dusk"]


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "faiss": faiss.__version__,
        "faiss_gpus": faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0,
        "faiss_gpu_build": hasattr(faiss, "StandardGpuResources"),
        "cpus": os.cpu_count(),
    }
    if info["cuda"]:
        info["gpu"] = torch.cuda.get_device_name(0)
        info["torch_cuda"] = torch.version.cuda
    return info


def _cosines(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"min_cosine": float(cos.min()), "max_abs_diff": float(np.abs(a - b).max())}


def fidelity(work: Path, photos: list[Path]) -> dict[str, Any]:
    """The same checkpoint on the CPU and on CUDA, through load_encoder."""
    import open_clip

    torch.manual_seed(0)
    checkpoint = work / "vit-b-32-random.pt"
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    del model
    images = [decode_image(p, max_pixels=100_000_000).image for p in photos]
    out: dict[str, Any] = {}
    reference = load_encoder(ModelSpec("ViT-B-32", str(checkpoint), device="cpu", precision="fp32"))
    ref_images, ref_texts = reference.encode_images(images), reference.encode_texts(TEXTS)
    for precision in ("fp32", "fp16"):
        encoder = load_encoder(
            ModelSpec("ViT-B-32", str(checkpoint), device="cuda", precision=precision)
        )
        assert encoder.identity.key == reference.identity.key  # same weights, same identity
        out[precision] = {
            "images": _cosines(encoder.encode_images(images), ref_images),
            "texts": _cosines(encoder.encode_texts(TEXTS), ref_texts),
        }
        del encoder
        torch.cuda.empty_cache()
    return out


def _clustered(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 100), dim), dtype=np.float32)
    x = centres[rng.integers(0, len(centres), size=n)]
    x += 0.35 * rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(
        np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth, strict=True)])
    )


def faiss_on_gpu(work: Path, n: int) -> dict[str, Any]:
    """IVF built on the GPU vs the CPU, and ShardSet searches through FaissGpu vs the CPU."""
    dim = 512
    x = _clustered(n, dim, seed=1)
    ids = np.arange(n, dtype=np.int64) * 3 + 1
    queries = x[np.random.default_rng(2).choice(n, 200, replace=False)]
    truth = np.argsort(-(queries @ x.T), axis=1)[:, :10]
    truth_ids = ids[truth]
    out: dict[str, Any] = {}
    for kind in ("ivf", "ivfpq"):
        params = IndexParams(kind=kind)
        timings = {}
        results = {}
        for where, use_gpu in (("cpu", False), ("gpu", True)):
            started = time.perf_counter()
            index = build_index(x, ids, params, use_gpu=use_gpu)
            timings[where] = round(time.perf_counter() - started, 3)
            faiss.extract_index_ivf(index).nprobe = 32
            results[where] = _recall(index.search(queries, 10)[1], truth_ids)
        out[f"{kind}_build_seconds"] = timings
        out[f"{kind}_raw_recall_at_10"] = {k: round(v, 4) for k, v in results.items()}

    index_dir = work / "index"
    model = {"name": "check", "key": "check"}
    half = n // 2
    write_shard(
        index_dir,
        "flat",
        ids=ids[:half],
        embeddings=x[:half],
        params=IndexParams("flat"),
        model=model,
        use_gpu=False,
    )
    write_shard(
        index_dir,
        "ivf",
        ids=ids[half:],
        embeddings=x[half:],
        params=IndexParams("ivf"),
        model=model,
        use_gpu=True,
    )
    deleted = np.random.default_rng(3).choice(ids, size=500, replace=False)
    gpu = FaissGpu()
    with (
        ShardSet.open(index_dir, ["flat", "ivf"], deleted_ids=deleted, gpu=gpu) as on_gpu,
        ShardSet.open(index_dir, ["flat", "ivf"], deleted_ids=deleted) as on_cpu,
    ):
        out["device_shards"] = on_gpu.device_shards
        gpu_scores, gpu_ids = on_gpu.search(queries, 10)
        cpu_scores, cpu_ids = on_cpu.search(queries, 10)
        out["search_tombstones_returned"] = int(np.isin(gpu_ids, deleted).sum())
        out["search_same_ids_fraction"] = float((gpu_ids == cpu_ids).mean())
        out["search_max_score_diff"] = float(np.abs(gpu_scores - cpu_scores).max())
        for name, shards in (("gpu", on_gpu), ("cpu", on_cpu)):
            one = queries[:1]
            for _ in range(5):
                shards.search(one, 10)
            started = time.perf_counter()
            for _ in range(100):
                shards.search(one, 10)
            out[f"search_ms_per_query_{name}"] = round((time.perf_counter() - started) * 10, 3)
    return out


def throughput(args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable,
        "bench/index_throughput.py",
        "--model",
        "ViT-B-32",
        "--n",
        str(args.n),
        "--batch-size",
        str(args.batch_size),
        "--workers",
        str(args.workers),
        "--naive-n",
        "200",
        "--photos",
        str(args.photos),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1:] or ["failed"]}
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/out/gpu-check"))
    parser.add_argument("--n", type=int, default=2000, help="photos for the throughput run")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)))
    parser.add_argument("--vectors", type=int, default=100_000, help="vectors for the FAISS checks")
    parser.add_argument("--photos", type=Path, default=Path("/tmp/clipsearch-photos"))
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    report: dict[str, Any] = {"bench": "gpu_check", "environment": environment()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        photo_dir = work / "photos"
        generate_photos(photo_dir, 16, seed=5)
        photos = sorted(photo_dir.glob("*.jpg"))
        if torch.cuda.is_available():
            report["fidelity"] = fidelity(work, photos)
        else:
            report["fidelity"] = "skipped: torch sees no CUDA device"
        if gpu_available():
            report["faiss_gpu"] = faiss_on_gpu(work, args.vectors)
        else:
            report["faiss_gpu"] = "skipped: this FAISS build has no GPU support or sees no GPU"
    if torch.cuda.is_available() and not args.skip_throughput:
        report["throughput"] = throughput(args)
    line = json.dumps(report)
    (args.out / "gpu_check.json").write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()

"""GPU checks in one run, on a CUDA machine: CUDA encode, fp16, FAISS on the GPU, throughput.

  1. fidelity: one random-init ViT-B-32 checkpoint loaded through the product's loader on the
     CPU (fp32) and on CUDA (fp32, fp16); image and text embeddings compared (cosine, max |diff|);
  2. FAISS GPU (when this FAISS build sees a GPU): an IVF shard trained and filled on the GPU
     against the CPU build (recall@10 of each against exact search, before any re-scoring),
     and ShardSet searches through the real `FaissGpu` placement, with tombstones, against the
     CPU searches;
  3. `bench/index_throughput.py` on the GPU (full job, model alone, naive loop);
  4. runtimes: ViT-B-32 (random weights) in torch fp32 and fp16, ONNX Runtime's CUDA provider
     in fp16 and its TensorRT provider in fp16, each loaded through the product's loader
     (CLIPSEARCH_RUNTIME, CLIPSEARCH_PRECISION): the image tower's img/s at --batch-size on
     preprocessed tensors (the model-only limit), `clipsearch index`'s img/s on --runtime-photos
     photo-sized JPEGs with that encoder, their ratio, the load time (TensorRT's twice: the
     second start reads the engines the first built), and the cosine of image and text
     embeddings against torch fp32 on the CPU. A runtime whose package is missing
     (onnxruntime-gpu, TensorRT's libraries) is reported as skipped with the reason.

Prints one JSON line (also written to --out/gpu_check.json). On a machine without CUDA it
checks nothing: it prints one line saying so (`no GPU: ...`) on stderr and exits 1.
`scripts/device_check.sh` installs the carried wheels and runs this on a GPU machine without
network access.

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
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexer.pipeline import IndexJob  # noqa: E402
from retrieval.catalog.database import Catalog  # noqa: E402
from retrieval.config import load_settings  # noqa: E402
from retrieval.errors import ClipsearchError  # noqa: E402
from retrieval.images import decode_image  # noqa: E402
from retrieval.index.faiss_gpu import FaissGpu, gpu_available  # noqa: E402
from retrieval.index.kinds import IndexParams, build_index  # noqa: E402
from retrieval.index.shard import write_shard  # noqa: E402
from retrieval.index.shard_set import ShardSet  # noqa: E402
from retrieval.models.encoder import Encoder, load_encoder  # noqa: E402
from retrieval.models.identity import ModelSpec, RuntimeSpec  # noqa: E402
from retrieval.training.shapes import generate_photos  # noqa: E402

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


def random_checkpoint(work: Path) -> Path:
    """ViT-B-32 with random weights, saved like a user's checkpoint (made once per run)."""
    import open_clip

    checkpoint = work / "vit-b-32-random.pt"
    if not checkpoint.exists():
        torch.manual_seed(0)
        model = open_clip.create_model("ViT-B-32", pretrained=None)
        torch.save({"state_dict": model.state_dict()}, checkpoint)
    return checkpoint


def fidelity(work: Path, photos: list[Path]) -> dict[str, Any]:
    """The same checkpoint on the CPU and on CUDA, through load_encoder."""
    checkpoint = random_checkpoint(work)
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


# The runtimes compared: (CLIPSEARCH_RUNTIME, CLIPSEARCH_PRECISION).
RUNTIMES = {
    "torch_fp32": ("torch", "fp32"),
    "torch_fp16": ("torch", "fp16"),
    "onnx_cuda_fp16": ("onnx", "fp16"),
    "tensorrt_fp16": ("tensorrt", "fp16"),
}


def _same(encoder: Encoder) -> Encoder:
    return encoder


def _model_img_per_s(encoder: Encoder, batch: int, size: int, batches: int = 10) -> float:
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    encoder.encode_image_tensors(pixels)  # warm-up (cuDNN, engine profiles)
    started = time.perf_counter()
    for _ in range(batches):
        encoder.encode_image_tensors(pixels)  # returns numpy: the device has finished
    return batch * batches / (time.perf_counter() - started)


def _index_img_per_s(
    encoder: Encoder, photos: Path, count: int, data_dir: Path, args: argparse.Namespace
) -> float:
    settings = load_settings(
        data_dir=data_dir,
        model="ViT-B-32",
        pretrained=encoder.identity.pretrained,
        batch_size=args.batch_size,
        workers=args.workers,
    )
    catalog = Catalog(settings.resolved_database_url)
    started = time.perf_counter()
    report = IndexJob(settings, catalog, partial(_same, encoder), progress=False).run([photos])
    seconds = time.perf_counter() - started
    catalog.dispose()
    if report.encoded != count:
        raise RuntimeError(f"indexed {report.encoded} of {count} photos")
    return count / seconds


def runtimes(work: Path, photos: list[Path], args: argparse.Namespace) -> dict[str, Any]:
    """Each runtime's model-only and end-to-end img/s and its fidelity to torch fp32 on the CPU."""
    checkpoint = random_checkpoint(work)
    cache = work / "model-cache"  # the exports and TensorRT engines of this run
    images = [decode_image(p, max_pixels=100_000_000).image for p in photos]
    base = ModelSpec("ViT-B-32", str(checkpoint), device="cpu", precision="fp32", cache_dir=cache)
    reference = load_encoder(base)
    ref_images, ref_texts = reference.encode_images(images), reference.encode_texts(TEXTS)
    size = reference.identity.image_size
    del reference
    folder = work / "runtime-photos"
    generate_photos(folder, args.runtime_photos, seed=7)
    out: dict[str, Any] = {
        "model": "ViT-B-32 (random weights)",
        "batch_size": args.batch_size,
        "workers": args.workers,
        "photos": args.runtime_photos,
    }
    for name, (runtime, precision) in RUNTIMES.items():
        spec = replace(
            base,
            device="cuda",
            precision=precision,
            runtime=RuntimeSpec(runtime, fallback="refuse"),
        )
        try:
            started = time.perf_counter()
            encoder = load_encoder(spec)
            loaded = {"load_s": round(time.perf_counter() - started, 1)}
            if runtime == "tensorrt":  # again: the engines come from the cache this time
                del encoder
                started = time.perf_counter()
                encoder = load_encoder(spec)
                loaded["second_load_s"] = round(time.perf_counter() - started, 1)
        except ClipsearchError as exc:
            out[name] = f"skipped: {exc}"
            continue
        model = _model_img_per_s(encoder, args.batch_size, size)
        indexed = _index_img_per_s(encoder, folder, args.runtime_photos, work / f"idx-{name}", args)
        out[name] = {
            "runs_on": encoder.runtimes.describe(),
            "model_img_per_s": round(model, 1),
            "index_img_per_s": round(indexed, 1),
            "index_vs_model": round(indexed / model, 2),
            **loaded,
            "images": _cosines(encoder.encode_images(images), ref_images),
            "texts": _cosines(encoder.encode_texts(TEXTS), ref_texts),
        }
        del encoder
        torch.cuda.empty_cache()
    return out


def no_gpu_reason() -> str | None:
    """Why this machine has nothing for the check to run on; None where torch sees a GPU."""
    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        return "torch sees no CUDA device (this torch build has no CUDA support)"
    return "torch sees no CUDA device (no GPU, no NVIDIA driver, or CUDA_VISIBLE_DEVICES hides it)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/out/gpu-check"))
    parser.add_argument("--n", type=int, default=2000, help="photos for the throughput run")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)))
    parser.add_argument("--vectors", type=int, default=100_000, help="vectors for the FAISS checks")
    parser.add_argument("--photos", type=Path, default=Path("/tmp/clipsearch-photos"))
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument(
        "--runtime-photos", type=int, default=1000, help="photos each runtime indexes"
    )
    parser.add_argument("--skip-runtimes", action="store_true")
    args = parser.parse_args()
    reason = no_gpu_reason()
    if reason is not None:
        print(f"no GPU: {reason}; bench/gpu_check.py checks nothing here", file=sys.stderr)
        raise SystemExit(1)
    args.out.mkdir(parents=True, exist_ok=True)

    report: dict[str, Any] = {"bench": "gpu_check", "environment": environment()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        photo_dir = work / "photos"
        generate_photos(photo_dir, 16, seed=5)
        photos = sorted(photo_dir.glob("*.jpg"))
        report["fidelity"] = fidelity(work, photos)
        if not args.skip_runtimes:
            report["runtimes"] = runtimes(work, photos, args)
        if gpu_available():
            report["faiss_gpu"] = faiss_on_gpu(work, args.vectors)
        else:
            report["faiss_gpu"] = "skipped: this FAISS build has no GPU support or sees no GPU"
    if not args.skip_throughput:
        report["throughput"] = throughput(args)
    line = json.dumps(report)
    (args.out / "gpu_check.json").write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()

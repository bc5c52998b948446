"""What encoding N images costs: measured CPU figures, and GPU figures extrapolated from them.

Measured here, on one core: the product's own decode and preprocess (`decode_for_model`, with
the JPEG draft mode the indexer uses) of 1024x768 and 4032x3024 (12 MP) photo JPEGs, in
images/s; and the FLOPs of one image through each model's image tower (torch's FlopCounterMode,
random weights of the real configs).

Extrapolated, not measured (no GPU here): images/s of a GPU = its dense fp16/bf16 tensor peak x
an assumed utilisation / the tower's FLOPs per image, and so the hours for N images on one GPU
and the CPU cores that must decode for it. The peaks are the vendors' published dense figures;
the utilisation (BENCH_GPU_UTILISATION, default 0.3) is an assumption, printed with the result.
Replace it with a measured figure (`python bench/gpu_check.py` on the GPU) before buying.

Prints ONE JSON line. Usage: python bench/encode_plan.py [N_IMAGES] (default 100,000,000)
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from indexer.decode import decode_for_model  # noqa: E402
from retrieval.models.encoder import load_encoder  # noqa: E402
from retrieval.models.identity import ModelSpec  # noqa: E402
from retrieval.training.shapes import generate_photos  # noqa: E402

MODELS = ("ViT-B-32", "ViT-B-16", "ViT-L-14")
# Dense fp16/bf16 tensor-core peaks (no sparsity), TFLOPS, from the vendors' data sheets.
GPU_PEAK_TFLOPS = {"T4": 65, "A10G": 70, "L4": 121, "A100": 312, "H100 SXM": 989}
UTILISATION = float(os.environ.get("BENCH_GPU_UTILISATION", "0.3"))
MAX_PIXELS = 200_000_000


def _decode_rate(paths: list[Path], preprocess: Any, min_side: int) -> float:
    torch.set_num_threads(1)
    for path in paths[:2]:  # warm-up
        decode_for_model(
            str(path), preprocess, max_pixels=MAX_PIXELS, min_side=min_side, max_bytes=None
        )
    times = []
    for _ in range(3):
        started = time.process_time()
        for path in paths:
            tensor, meta = decode_for_model(
                str(path), preprocess, max_pixels=MAX_PIXELS, min_side=min_side, max_bytes=None
            )
            assert tensor is not None, meta
        times.append(time.process_time() - started)
    # CPU time of this process: what one core does, whatever else the machine is running.
    return len(paths) / float(np.median(times))


def _image_gflops(name: str) -> tuple[float, int]:
    from torch.utils.flop_counter import FlopCounterMode

    encoder = load_encoder(ModelSpec(name, "none", device="cpu"))
    side = encoder.identity.image_size
    image = torch.zeros(1, 3, side, side)
    encode_image = getattr(encoder.model, "encode_image")  # noqa: B009 - typed as a Module
    counter = FlopCounterMode(display=False)
    # With autograd on: under no_grad or inference_mode, nn.MultiheadAttention takes its fused
    # fast path, whose projections FlopCounterMode does not count (a third of a ViT's FLOPs).
    with counter, torch.enable_grad():
        encode_image(image)
    return counter.get_total_flops() / 1e9, side


def main() -> None:
    n_images = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000_000
    load_start = os.getloadavg()
    preprocess = load_encoder(ModelSpec("ViT-B-32", "none", device="cpu")).preprocess
    decode: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, size, count in (("1024x768", (1024, 768), 40), ("4032x3024", (4032, 3024), 12)):
            paths = generate_photos(Path(tmp) / label, count, seed=1, size=size)
            decode[label] = round(_decode_rate(paths, preprocess, 224), 1)
    torch.set_num_threads(os.cpu_count() or 1)
    models: dict[str, Any] = {}
    for name in MODELS:
        gflops, side = _image_gflops(name)
        per_gpu = {
            gpu: round(peak * 1e12 * UTILISATION / (gflops * 1e9))
            for gpu, peak in GPU_PEAK_TFLOPS.items()
        }
        models[name] = {
            "image_size": side,
            "image_gflops": round(gflops, 2),
            "gpu_img_s_extrapolated": per_gpu,
            "gpu_hours_extrapolated": {
                gpu: round(n_images / rate / 3600, 1) for gpu, rate in per_gpu.items()
            },
            "decode_cores_per_gpu_12mp": {
                gpu: round(rate / decode["4032x3024"], 1) for gpu, rate in per_gpu.items()
            },
        }
    print(
        json.dumps(
            {
                "bench": "encode_plan",
                "images": n_images,
                "cpu_count": os.cpu_count(),
                "decode_img_s_one_core": decode,
                "models": models,
                "assumptions": {
                    "gpu_dense_fp16_peak_tflops": GPU_PEAK_TFLOPS,
                    "utilisation": UTILISATION,
                    "gpu_figures": "extrapolated, not measured",
                },
                "loadavg_start": [round(x, 2) for x in load_start],
                "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            }
        )
    )


if __name__ == "__main__":
    main()

"""`CLIPSEARCH_RUNTIME=auto`: each tower runs where it was measured fastest on this machine.

Every runtime meets the fidelity bar before it competes: an fp32 export is kept only within
1e-5 of torch fp32 (unit embeddings), an fp16 one (CUDA) only at cosine 0.999 or more, int8
graphs only run when CLIPSEARCH_QUANTIZE=int8 asks for them, and torch runs in the precision
the settings name. A runtime other than torch must be `MARGIN` faster to be chosen. The
measurement (a text query, trimmed, at batch 1; a batch of images) takes a few seconds at
the first start and is kept in the export's folder, keyed by what decides it: the CPU, the
thread count, the device and the precision.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from retrieval.models.backend import ModelBackend
from retrieval.models.identity import ModelSpec
from retrieval.models.runtimes.base import Runtimes, TowerRuntime

log = logging.getLogger(__name__)

CALIBRATION = "calibration.json"
QUERY = "a photo of a dog playing on the beach"
IMAGE_BATCH = 8
TEXT_RUNS = 9
IMAGE_RUNS = 3
# ONNX Runtime must be this much faster to be chosen: within it, torch (the reference) stays.
MARGIN = 0.95
NAMES = {"onnx": "ONNX Runtime", "tensorrt": "TensorRT"}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key(runtimes: dict[str, TowerRuntime], threads: int) -> str:
    material = [
        _cpu_name(),
        os.cpu_count(),
        threads or torch.get_num_threads(),
        *(runtime.describe() for runtime in runtimes.values()),
    ]
    return hashlib.sha256(json.dumps(material).encode()).hexdigest()[:16]


def _median_ms(run: Callable[[], Any], runs: int) -> float:
    run()  # warm-up: first calls allocate
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


@torch.inference_mode()
def measure(backend: ModelBackend, runtimes: dict[str, TowerRuntime]) -> dict[str, Any]:
    """Median ms of a trimmed text query and of an image batch, per runtime."""
    tokens = backend.tokenize([QUERY])
    size = backend.identity.image_size
    pixels = torch.randn(IMAGE_BATCH, 3, size, size, generator=torch.Generator().manual_seed(0))
    result: dict[str, Any] = {"text_ms": {}, "image_batch_ms": {}, "image_batch": IMAGE_BATCH}
    for name, runtime in runtimes.items():

        def text(runtime: TowerRuntime = runtime) -> object:
            return runtime.encode_text(tokens, trim=True)

        def image(runtime: TowerRuntime = runtime) -> object:
            return runtime.encode_image(pixels)

        result["text_ms"][name] = round(_median_ms(text, TEXT_RUNS), 3)
        result["image_batch_ms"][name] = round(_median_ms(image, IMAGE_RUNS), 3)
    return result


def winners(measured: dict[str, Any]) -> dict[str, str]:
    """The runtime of each tower: the fastest, where it is at least 1/MARGIN times as fast as
    torch; else torch."""
    chosen = {}
    for tower, key in (("text", "text_ms"), ("image", "image_batch_ms")):
        times = measured[key]
        name = min(times, key=times.__getitem__)
        chosen[tower] = name if times[name] <= MARGIN * times["torch"] else "torch"
    return chosen


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write(path: Path, data: dict[str, Any]) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps(data, indent=2), encoding="utf-8")
    os.replace(partial, path)


def fastest(
    backend: ModelBackend,
    torch_runtime: TowerRuntime,
    candidates: dict[str, Any],
    spec: ModelSpec,
) -> Runtimes:
    """The Runtimes `auto` picks among torch and `candidates` (ONNX Runtime sessions by kind:
    onnx, tensorrt): measured now, or read from the export's calibration."""
    folder = Path(next(iter(candidates.values())).folder)
    by_name: dict[str, Any] = {"torch": torch_runtime, **candidates}
    key = machine_key(by_name, spec.runtime.threads)
    path = folder / CALIBRATION
    cached = _read(path)
    entry = cached.get(key)
    if not isinstance(entry, dict) or "chosen" not in entry:
        names = [NAMES.get(name, name) for name in by_name]
        listed = f"{', '.join(names[:-1])} and {names[-1]}"
        log.warning("CLIPSEARCH_RUNTIME=auto: measuring %s on this machine", listed)
        measured = measure(backend, by_name)
        entry = {**measured, "chosen": winners(measured), "measured_at": time.time()}
        cached[key] = entry
        try:
            _write(path, cached)
        except OSError as exc:  # a read-only cache: measure again next time
            log.warning("cannot keep the runtime measurement in %s: %s", path, exc)
    chosen = entry["chosen"]
    for name, runtime in candidates.items():  # each keeps only the towers it runs
        by_name[name] = runtime.only([t for t in ("image", "text") if chosen.get(t) == name])
    runtimes = Runtimes(by_name[chosen.get("image", "torch")], by_name[chosen.get("text", "torch")])
    log.info("CLIPSEARCH_RUNTIME=auto chose %s (%s)", runtimes.describe(), entry)
    return runtimes

"""The torch-free install against the full one: venv size, and `clipsearch serve` cold start.

The torch-free venv is what `pip install 'clipsearch[onnx]'` makes (no torch, torchvision or
open_clip); the full one holds every extra (torch's CUDA build among them). Both serve the same
index with the same export of `--model` (random weights: they start and run as real ones do),
made first with the full install (`clipsearch export`). Cold start: from the process's start to
the first 200 of /ready, median of `--runs`, with the first POST /search/text after it and the
server's peak RSS (VmHWM). Runs, each a fresh `clipsearch serve`:

- `full/torch`: the full install, CLIPSEARCH_RUNTIME=torch (the default);
- `full/onnx`: the full install, CLIPSEARCH_RUNTIME=onnx (the export alone; torch not loaded);
- `torch-free/onnx`: the torch-free venv, CLIPSEARCH_RUNTIME=onnx.

Both venvs run this checkout's code (the command runs in the repository root), so only the
installed packages differ. Prints ONE JSON line.

Usage: python bench/install_footprint.py --onnx-venv /tmp/venv-onnx [--full-venv .venv]
       [--model ViT-B-32] [--runs 3] [--work DIR]
  make the torch-free venv with: python -m venv /tmp/venv-onnx &&
       /tmp/venv-onnx/bin/pip install '.[onnx]'
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PICTURES = 32


def venv_mib(venv: Path) -> float:
    """Bytes of every file under the venv (links not followed), in MiB."""
    total = 0
    for folder, _, files in os.walk(venv):
        for name in files:
            path = Path(folder) / name
            if not path.is_symlink():
                total += path.stat().st_size
    return round(total / 2**20, 1)


def has_package(python: Path, name: str) -> bool:
    probe = f"import importlib.util as u; print(u.find_spec({name!r}) is not None)"
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=True)
    return done.stdout.strip() == "True"


def clipsearch(python: Path, env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [str(python), "-m", "indexer", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if done.returncode != 0:
        raise SystemExit(f"clipsearch {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def cold_start(python: Path, env: dict[str, str], log: Path) -> dict[str, float]:
    """One `clipsearch serve`: seconds to the first 200 of /ready, the first query's ms, and
    the server's peak RSS."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(python), "-m", "indexer", "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        with httpx.Client(base_url=base, timeout=60) as client:
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"serve exited:\n{log.read_text()[-2000:]}")
                try:
                    if client.get("/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.perf_counter() - started > 600:
                    raise SystemExit(f"serve not ready in 600 s:\n{log.read_text()[-2000:]}")
                time.sleep(0.05)
            ready = time.perf_counter() - started
            query = time.perf_counter()
            response = client.post("/search/text", json={"query": "a red circle", "k": 10})
            first_query_ms = (time.perf_counter() - query) * 1000
            if response.status_code != 200 or len(response.json()["results"]) != 10:
                raise SystemExit(f"search failed: {response.status_code} {response.text[:300]}")
        rss = peak_rss_mib(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return {"ready_s": ready, "first_query_ms": first_query_ms, "peak_rss_mib": rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--onnx-venv", type=Path, required=True)
    parser.add_argument("--full-venv", type=Path, default=REPO / ".venv")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="install-footprint-"))
    full_python = args.full_venv / "bin" / "python"
    onnx_python = args.onnx_venv / "bin" / "python"
    installs: dict[str, dict[str, Any]] = {
        name: {
            "venv": str(venv),
            "venv_mib": venv_mib(venv),
            "torch": has_package(venv / "bin" / "python", "torch"),
            "onnxruntime": has_package(venv / "bin" / "python", "onnxruntime"),
        }
        for name, venv in (("full", args.full_venv), ("torch_free", args.onnx_venv))
    }
    if installs["torch_free"]["torch"]:
        raise SystemExit(f"{args.onnx_venv} has torch: not a torch-free install")

    base = {k: v for k, v in os.environ.items() if not k.startswith("CLIPSEARCH_")}
    base.pop("PYTHONPATH", None)
    base.update(
        {
            "CLIPSEARCH_MODEL": args.model,
            "CLIPSEARCH_PRETRAINED": "none",
            "CLIPSEARCH_MODEL_CACHE_DIR": str(work / "cache"),
            "CLIPSEARCH_DATA_DIR": str(work / "data"),
            "CLIPSEARCH_DEVICE": "cpu",
        }
    )
    started = time.perf_counter()
    export = json.loads(clipsearch(full_python, base, "export", "--json"))
    export_s = time.perf_counter() - started
    pictures = work / "pictures"
    pictures.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for n in range(PICTURES):
        pixels = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(pictures / f"{n:03}.jpg")
    clipsearch(full_python, {**base, "CLIPSEARCH_RUNTIME": "onnx"}, "index", str(pictures))

    result: dict[str, Any] = {
        "bench": "install_footprint",
        "model": args.model,
        "cpus": os.cpu_count(),
        "installs": installs,
        "venv_ratio": round(installs["torch_free"]["venv_mib"] / installs["full"]["venv_mib"], 3),
        "export_s": round(export_s, 1),
        "export_folder": export["folder"],
        "runs": args.runs,
        "serve": {},
    }
    plans = {
        "full/torch": (full_python, "torch"),
        "full/onnx": (full_python, "onnx"),
        "torch-free/onnx": (onnx_python, "onnx"),
    }
    measured: dict[str, list[dict[str, float]]] = {name: [] for name in plans}
    for run in range(args.runs):  # interleaved, so that load on the machine hits all alike
        for name, (python, runtime) in plans.items():
            env = {**base, "CLIPSEARCH_RUNTIME": runtime, "CLIPSEARCH_ONNX_FALLBACK": "refuse"}
            log = work / f"serve-{name.replace('/', '-')}-{run}.log"
            measured[name].append(cold_start(python, env, log))
    for name, runs in measured.items():
        result["serve"][name] = {
            key: round(statistics.median(run[key] for run in runs), 2) for key in runs[0]
        } | {"ready_s_all": [round(run["ready_s"], 2) for run in runs]}
    torch_ready = result["serve"]["full/torch"]["ready_s"]
    result["ready_speedup_torch_free"] = round(
        torch_ready / result["serve"]["torch-free/onnx"]["ready_s"], 2
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()

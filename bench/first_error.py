"""Time to the first error of the checks that need no model, through the real `clipsearch`.

Each check runs `clipsearch` in a fresh process (imports included, as a user sees it) with
open_clip ViT-B-32 and random weights (`--pretrained none`, which loads as slowly as trained
ones), and the time a successful search takes (the model load included) as the reference:
- an empty index (`search`, exit 9);
- a data dir that does not exist (`search --data-dir`, exit 2);
- a model that is not the index's (`search --model ViT-B-32` on an index of the tiny model,
  exit 4);
- a busy port (`serve --port` on a port another socket holds, exit 2).
Prints ONE JSON line: seconds and exit code of each. Usage: python bench/first_error.py [RUNS]
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from retrieval.models.weights import register_model_configs  # noqa: E402
from retrieval.training.shapes import generate_shapes  # noqa: E402

CLI = [sys.executable, "-c", "from indexer.cli.app import main; main()"]


def clipsearch(args: list[str], env: dict[str, str]) -> tuple[float, int]:
    started = time.perf_counter()
    done = subprocess.run([*CLI, *args], env=env, capture_output=True, timeout=600)
    return time.perf_counter() - started, done.returncode


def main() -> None:
    import open_clip

    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    work = Path(tempfile.mkdtemp(prefix="first-error-"))
    register_model_configs()
    torch.manual_seed(0)
    tiny = work / "tiny.pt"
    torch.save({"state_dict": open_clip.create_model("clipsearch-tiny").state_dict()}, tiny)
    generate_shapes(work / "pics", 8, seed=5)
    base = {**os.environ, "CLIPSEARCH_DEVICE": "cpu", "CLIPSEARCH_WORKERS": "0"}
    for name in ("CLIPSEARCH_DATABASE_URL", "CLIPSEARCH_INDEX_DIR", "CLIPSEARCH_DATA_DIR"):
        base.pop(name, None)
    model = {**base, "CLIPSEARCH_MODEL": "ViT-B-32", "CLIPSEARCH_PRETRAINED": "none"}
    tiny_env = {**base, "CLIPSEARCH_MODEL": "clipsearch-tiny", "CLIPSEARCH_PRETRAINED": str(tiny)}
    clipsearch(["index", str(work / "pics"), "--data-dir", str(work / "tiny")], tiny_env)
    clipsearch(["index", str(work / "pics"), "--data-dir", str(work / "b32")], model)
    (work / "empty").mkdir()
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = str(holder.getsockname()[1])
    checks = {
        "empty_index": ["search", "a dog", "--data-dir", str(work / "empty")],
        "missing_data_dir": ["search", "a dog", "--data-dir", str(work / "no-such-dir")],
        "model_mismatch": ["search", "a dog", "--data-dir", str(work / "tiny")],
        "busy_port": ["serve", "--port", port, "--data-dir", str(work / "tiny")],
        # The reference: a search that loads the model.
        "search_with_model_load": ["search", "a dog", "--data-dir", str(work / "b32")],
    }
    results = {}
    for name, args in checks.items():
        timings = [clipsearch(args, model) for _ in range(runs)]
        results[name] = {
            "seconds_median": round(statistics.median(t for t, _ in timings), 2),
            "exit": timings[0][1],
        }
    holder.close()
    print(json.dumps({"model": "ViT-B-32 (random weights)", "runs": runs, **results}))


if __name__ == "__main__":
    main()

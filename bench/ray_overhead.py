"""Ray's overhead on one machine: `clipsearch index --engine ray` against `--engine local` on the
same cores and the same photos, in one run. Prints ONE JSON line.

Each job is a fresh `python -m indexer index --json` on the same folder of generated 1024x768
JPEGs (bench/index_throughput.py's), into a new data dir and SQLite catalog, with the same
model checkpoint (random weights of a real config, saved once). The variants take turns, in
one order and then the reverse, `--repeats` times:

  local        the local engine (DataLoader decoder processes, one model in the process);
  ray          --engine ray with no address: a Ray cluster started on this machine for the job;
  ray_cluster  --engine ray on a Ray cluster already running on this machine (started by this
               script with `ray start --head`, as a team's cluster would be).

Per job: img/s of the encode phase (the job's own `images_per_second`), img/s of the whole job
(its `seconds`: scan, decode, encode, shard writes, commits) and of the whole command (process
start to exit, imports included); the peak of the summed RSS (and PSS, shared pages divided
among processes) of every process of the job: the driver and its decoders for local, the driver
and the Ray cluster's processes (GCS, raylet, agents, workers) for ray. Medians are reported,
and ray / local ratios of them (goal: encode img/s ratio >= 0.85).

    python bench/ray_overhead.py --n 400 --model ViT-B-32 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.raycluster import MIB, LocalRayCluster, MemorySampler, auth_env  # noqa: E402

VARIANTS = ("local", "ray", "ray_cluster")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=400, help="photos in the folder")
    parser.add_argument("--model", default="ViT-B-32", help="an open_clip config (random weights)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds (each: every variant twice)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--photos", type=Path, default=Path("bench/out/photos"))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    return parser.parse_args()


def save_checkpoint(model: str, path: Path) -> None:
    """Random weights of a real config, saved once: every process loads the same model."""
    import open_clip
    import torch

    from retrieval.models.weights import register_model_configs

    register_model_configs()
    torch.manual_seed(1234)
    torch.save({"state_dict": open_clip.create_model(model).state_dict()}, path)


def run_job(
    variant: str,
    photos: Path,
    work: Path,
    env: dict[str, str],
    cluster: LocalRayCluster | None,
) -> dict[str, Any]:
    data_dir = Path(tempfile.mkdtemp(prefix=f"{variant}-", dir=work))
    job_env = {**env, "CLIPSEARCH_DATA_DIR": str(data_dir)}
    if variant == "local":
        job_env["CLIPSEARCH_ENGINE"] = "local"
    else:
        job_env["CLIPSEARCH_ENGINE"] = "ray"
        job_env["CLIPSEARCH_RAY_ADDRESS"] = cluster.address if cluster else ""
        if cluster is None:
            # Ray joins a cluster that `ray start` left running on this machine when given no
            # address (its /tmp/ray/ray_current_cluster): RAY_ADDRESS=local starts a new one.
            job_env["RAY_ADDRESS"] = "local"
    log = work / f"{data_dir.name}.log"
    started = time.monotonic()
    with open(log, "wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "indexer", "index", "--json", "--no-progress", str(photos)],
            env=job_env,
            stdout=subprocess.PIPE,
            stderr=err,
            cwd=ROOT,
        )

        def roots() -> list[int]:
            return [process.pid, *(cluster.roots() if cluster else [])]

        with MemorySampler(roots, process.pid) as sampler:
            out, _ = process.communicate(timeout=1800)
    wall = time.monotonic() - started
    if process.returncode != 0:
        raise SystemExit(
            f"{variant}: exit {process.returncode}: {log.read_text(errors='replace')[-3000:]}"
        )
    report = json.loads(out.decode().strip().splitlines()[-1])
    shutil.rmtree(data_dir, ignore_errors=True)
    encoded = report["encoded"]
    peak = sampler.peak
    return {
        "encode_ips": report["images_per_second"],
        "job_ips": encoded / report["seconds"],
        "command_ips": encoded / wall,
        "encoders": report.get("encoders"),
        "peak_rss_mib": peak.rss / MIB,
        "peak_pss_mib": peak.pss / MIB,
        "driver_peak_rss_mib": peak.driver_rss / MIB,
        "processes_at_peak": peak.processes,
    }


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [key for key in runs[0] if isinstance(runs[0][key], int | float)]
    return {key: round(statistics.median(run[key] for run in runs), 2) for key in keys}


def main() -> None:
    args = parse_args()
    variants = [v for v in args.variants.split(",") if v]
    from bench.index_throughput import photo_folder

    photos = photo_folder(args.photos, args.n).resolve()
    work = Path(tempfile.mkdtemp(prefix="clipsearch-ray-overhead-"))
    checkpoint = work / "model.pt"
    save_checkpoint(args.model, checkpoint)
    outside = {k: v for k, v in os.environ.items() if not k.startswith("CLIPSEARCH_")}
    env = {
        **outside,
        "RAY_USAGE_STATS_ENABLED": "0",
        "CLIPSEARCH_MODEL": args.model,
        "CLIPSEARCH_PRETRAINED": str(checkpoint),
        "CLIPSEARCH_DEVICE": "cpu",
        "CLIPSEARCH_BATCH_SIZE": str(args.batch_size),
        "CLIPSEARCH_WORKERS": str(min(4, args.cpus)),
        "CLIPSEARCH_LABEL_ON_INDEX": "false",
        **auth_env(),
    }
    cluster = LocalRayCluster(args.cpus, env) if "ray_cluster" in variants else None
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    order: list[str] = []
    started = time.monotonic()
    try:
        idle_cluster_mib = 0.0
        if cluster is not None:
            time.sleep(3)  # the cluster's agents settle
            from bench.raycluster import descendants, rss_bytes

            idle_cluster_mib = sum(rss_bytes(p) for p in descendants(cluster.roots())) / MIB
        for round_number in range(args.repeats):
            turn = variants if round_number % 2 == 0 else list(reversed(variants))
            for variant in [*turn, *reversed(turn)]:
                order.append(variant)
                runs[variant].append(
                    run_job(
                        variant,
                        photos,
                        work,
                        env,
                        cluster if variant == "ray_cluster" else None,
                    )
                )
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(work, ignore_errors=True)

    medians = {variant: summary(found) for variant, found in runs.items()}
    result: dict[str, Any] = {
        "bench": "ray_overhead",
        "model": args.model,
        "images": args.n,
        "image_size": "1024x768",
        "cpus": args.cpus,
        "batch_size": args.batch_size,
        "runs_per_variant": 2 * args.repeats,
        "order": order,
        **medians,
    }
    local = medians.get("local")
    for variant in ("ray", "ray_cluster"):
        mine = medians.get(variant)
        if local and mine:
            result[f"{variant}_over_local"] = {
                "encode_ips": round(mine["encode_ips"] / local["encode_ips"], 3),
                "job_ips": round(mine["job_ips"] / local["job_ips"], 3),
                "command_ips": round(mine["command_ips"] / local["command_ips"], 3),
                "extra_peak_rss_mib": round(mine["peak_rss_mib"] - local["peak_rss_mib"]),
                "extra_peak_pss_mib": round(mine["peak_pss_mib"] - local["peak_pss_mib"]),
            }
    if cluster is not None:
        result["idle_cluster_rss_mib"] = round(idle_cluster_mib)
    result["runs"] = {
        v: [{k: round(x, 2) if isinstance(x, float) else x for k, x in r.items()} for r in found]
        for v, found in runs.items()
    }
    result["seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

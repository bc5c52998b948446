#!/usr/bin/env bash
# Runs bench/gpu_check.py on a GPU machine without network access, from the repository root,
# with the .whl/ that scripts/device_wheels.sh downloaded on a machine with network access:
#   bash scripts/device_check.sh
# Installs the carried wheels beside the machine's own torch, then runs bench/gpu_check.py.
# Its JSON line goes to stdout and to gpu_check.json in $OUT (default bench/out/gpu-check).
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec python3 bench/gpu_check.py --out "${OUT:-bench/out/gpu-check}" "$@"

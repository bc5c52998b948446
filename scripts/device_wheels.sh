#!/usr/bin/env bash
# Downloads, into .whl/ (git-ignored), the wheels that bench/gpu_check.py needs on a GPU machine
# without network access whose Python has a CUDA torch, numpy, typer, tqdm, PyYAML and
# huggingface_hub but no open_clip, SQLAlchemy, Alembic, pydantic or FAISS. Pillow and typing_extensions go too,
# at this venv's versions, since the image's may be older. Python 3.12 wheels. About 34 MB.
#
# FAISS on the GPU cannot travel: faiss-gpu-cu12 (48 MB) needs CUDA 12's cuBLAS (about 600 MB
# more where a machine has CUDA 13's), and faiss-gpu-cu13-cuvs (81 MB) needs cuVS. So faiss-cpu
# goes, and the check reports the FAISS GPU part as skipped unless a GPU FAISS is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
    manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$tag")
done
pick() { .venv/bin/python -c "import importlib.metadata as m; print('$1==' + m.version('$1'))"; }
wanted=()
for name in open_clip_torch ftfy wcwidth SQLAlchemy greenlet alembic Mako pydantic pydantic_core \
    pydantic-settings python-dotenv annotated-types typing-inspection typing_extensions pillow \
    faiss-cpu; do
    wanted+=("$(pick "$name")")
done
rm -rf .whl && mkdir .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d .whl "${wanted[@]}"
du -sh .whl

#!/usr/bin/env bash
# Sets up everything on a fresh machine: venv, dependencies, catalog migrations, then
# runs the offline demo. `scripts/setup.sh --no-demo` stops after the install.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x .venv/bin/python ]; then
    echo "creating .venv with $PYTHON"
    "$PYTHON" -m venv .venv
fi

# Re-install only when the dependency list changed: keeps the test command fast.
stamp=".venv/.clipsearch-deps"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "installing clipsearch and its dependencies into .venv (torch comes from local disk when available)"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[torch,postgres,chinese,hf,onnx,export,ray,test,dev]'
    echo "$want" > "$stamp"
fi

.venv/bin/clipsearch db upgrade

if [ "${1:-}" != "--no-demo" ]; then
    .venv/bin/clipsearch demo --dir demo-data
fi

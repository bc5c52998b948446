#!/usr/bin/env bash
# Runs the whole test suite (installs first if needed). Extra arguments go to pytest.
# The catalog tests also run on Postgres when CLIPSEARCH_TEST_DATABASE_URL is set, or
# when a server answers on 127.0.0.1:5432 (database "test", user postgres).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --no-demo >/dev/null

if [ -z "${CLIPSEARCH_TEST_DATABASE_URL+set}" ]; then
    candidate="postgresql+psycopg://postgres@127.0.0.1:5432/test"
    if .venv/bin/python - "$candidate" <<'PY' 2>/dev/null; then
import sys
import psycopg
psycopg.connect(sys.argv[1].replace("+psycopg", ""), connect_timeout=3).close()
PY
        export CLIPSEARCH_TEST_DATABASE_URL="$candidate"
        echo "catalog tests also run on Postgres at 127.0.0.1:5432/test"
    fi
fi

# The semantic test models (trained by `finetune`, 1.5-4 minutes on 2 cores) are the demo's:
# both read ~/.cache/clipsearch/trained, under a name that hashes the recipe, retrieval/ and
# the library versions, so the model `scripts/setup.sh` trained for the demo is reused and a
# change to the code that trains it trains a new one. CLIPSEARCH_TEST_MODEL_CACHE=DIR moves
# it; CLIPSEARCH_TEST_MODEL_CACHE= (empty) trains them every run.

# --durations=25 lists the slowest tests at the end; a --durations among the extra arguments
# comes later on the line and wins.
exec .venv/bin/python -m pytest --durations=25 "$@"

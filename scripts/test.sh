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

# The semantic test model (trained by `finetune`, about 1.5 minutes on 2 cores) is kept between
# runs, under a name that hashes retrieval/ and the library versions, so a change to the code
# that trains it trains a new one. CLIPSEARCH_TEST_MODEL_CACHE= (empty) trains it every run.
export CLIPSEARCH_TEST_MODEL_CACHE="${CLIPSEARCH_TEST_MODEL_CACHE-${XDG_CACHE_HOME:-$HOME/.cache}/clipsearch/test-models}"

# --durations=25 lists the slowest tests at the end; a --durations among the extra arguments
# comes later on the line and wins.
exec .venv/bin/python -m pytest --durations=25 "$@"

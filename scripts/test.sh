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

exec .venv/bin/python -m pytest "$@"

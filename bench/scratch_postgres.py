"""A scratch Postgres database for a benchmark: created fresh, dropped afterwards.

Created and dropped through BENCH_PG_ADMIN_URL (default the local server's `test` database,
trust auth), so a benchmark never touches a database the tests or a user keep.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

ADMIN_URL = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/test")


def admin() -> Any:
    """An autocommit connection to the admin database (psycopg)."""
    import psycopg

    return psycopg.connect(ADMIN_URL, autocommit=True)


@contextmanager
def scratch_database(name: str) -> Iterator[str]:
    """The SQLAlchemy URL of a new, empty database `name`, dropped (connections and all) after."""
    with admin() as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")
    host = ADMIN_URL.split("://", 1)[1].rsplit("/", 1)[0]
    try:
        yield f"postgresql+psycopg://{host}/{name}"
    finally:
        with admin() as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

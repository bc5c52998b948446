"""Run the Alembic migrations in `migrations/` against a catalog engine."""

from __future__ import annotations

import fcntl
import functools
import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

# Any constant works; it only has to be the same for every clipsearch process.
_PG_LOCK_KEY = 0x636C6970


def migrations_dir() -> Path:
    spec = importlib.util.find_spec("migrations")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("The clipsearch 'migrations' package is not installed.")
    return Path(next(iter(spec.submodule_search_locations)))


def alembic_config(connection: Connection | None = None, url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    if url:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@contextmanager
def _migration_lock(engine: Engine, connection: Connection) -> Iterator[None]:
    # The API and the indexer may both start at once and both upgrade: serialise them.
    if engine.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _PG_LOCK_KEY})
        connection.commit()
        try:
            yield
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _PG_LOCK_KEY})
            connection.commit()
    elif engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        lock_path = Path(str(engine.url.database) + ".migrate.lock")
        with open(lock_path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
    else:
        yield


def upgrade_database(engine: Engine, revision: str = "head") -> None:
    with engine.connect() as connection, _migration_lock(engine, connection):
        command.upgrade(alembic_config(connection), revision)
        connection.commit()


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


@functools.cache
def migration_chain() -> tuple[frozenset[str], str]:
    """Every revision in `migrations/`, and the newest (the schema this clipsearch reads)."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config())
    head = script.get_current_head()
    if head is None:
        raise RuntimeError("The clipsearch 'migrations' package holds no revision.")
    return frozenset(r.revision for r in script.walk_revisions()), head


def head_revision() -> str:
    """The newest revision in `migrations/`: the schema this clipsearch writes and reads."""
    return migration_chain()[1]

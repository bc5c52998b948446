"""Whether a database holds a clipsearch catalog, and at which schema revision; reads only.

Commands that read an index, and the API, never create or migrate a catalog: they look first,
without changing anything (not even creating a SQLite file), and say what they found. Only
`clipsearch index` and `clipsearch db upgrade` create or migrate one (`Catalog.upgrade`), and
only in an empty database or one that already holds a clipsearch catalog: our tables added to
another application's database would be a mess for its owner to clean up.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from sqlalchemy import inspect, text

from retrieval.catalog.identity import pairing_problem, read_index_file
from retrieval.catalog.migrate import migration_chain
from retrieval.catalog.tables import IndexStateRow
from retrieval.errors import (
    CatalogMismatch,
    CatalogSchemaMismatch,
    CatalogUnreadable,
    ClipsearchError,
    ConfigError,
    NoCatalog,
)
from retrieval.index.shard import list_shard_dirs

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from retrieval.catalog.catalog_file import CatalogFileWatch


class Catalog(Protocol):
    """What this module reads of a `retrieval.catalog.database.Catalog` (which imports this
    module to check a schema before it upgrades one, so it names no class of that module)."""

    @property
    def shown_url(self) -> str: ...

    @property
    def engine(self) -> Engine: ...

    @property
    def file_watch(self) -> CatalogFileWatch | None: ...


VERSION_TABLE = "alembic_version"


class Found(enum.Enum):
    NOTHING = "nothing"  # no SQLite file, or a database (schema) without tables
    FOREIGN = "foreign"  # another application's tables, and no clipsearch revision
    OLDER = "older"  # a clipsearch catalog at an older revision: `clipsearch db upgrade`
    NEWER = "newer"  # a clipsearch catalog at a revision this clipsearch does not know
    CURRENT = "current"


@dataclass(frozen=True)
class CatalogSchema:
    """What a database holds, as far as clipsearch is concerned."""

    url: str  # password masked
    revision: str | None  # alembic_version's; None when there is no such table
    tables: tuple[str, ...] = ()  # every table besides alembic_version, sorted
    # Postgres: the connection's search_path names no schema that exists (it was dropped).
    no_schema: bool = False

    @property
    def found(self) -> Found:
        known, head = migration_chain()
        if self.revision is None:
            return Found.FOREIGN if self.tables else Found.NOTHING
        if self.revision == head:
            return Found.CURRENT
        if self.revision in known:
            return Found.OLDER
        # Another application managed by Alembic has a version table too.
        return Found.NEWER if IndexStateRow.__tablename__ in self.tables else Found.FOREIGN

    @property
    def holds_catalog(self) -> bool:
        return self.found in (Found.OLDER, Found.NEWER, Found.CURRENT)

    def schema_mismatch(self) -> CatalogSchemaMismatch:
        _, head = migration_chain()
        return CatalogSchemaMismatch(self.url, self.revision, head, newer=self.found is Found.NEWER)

    def foreign_tables(self) -> str:
        shown = ", ".join(self.tables[:5]) + (", ..." if len(self.tables) > 5 else "")
        count = f"{len(self.tables)} table" + ("s" if len(self.tables) > 1 else "")
        return f"{count} of another application ({shown})"


def read_schema(catalog: Catalog) -> CatalogSchema:
    """What the catalog's database holds. Creates nothing: a SQLite file that is not there is
    not opened. A database that cannot be asked raises SQLAlchemy's error."""
    url = catalog.shown_url
    path = catalog.file_watch.path if catalog.file_watch is not None else None
    if path is not None and not Path(path).exists():
        return CatalogSchema(url, None)
    with catalog.engine.connect() as conn:
        no_schema = False
        if conn.dialect.name == "postgresql":
            no_schema = conn.execute(text("SELECT current_schema()")).scalar() is None
        names = [] if no_schema else inspect(conn).get_table_names()
        revision = None
        if VERSION_TABLE in names:
            revision = conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()
    tables = tuple(sorted(name for name in names if name != VERSION_TABLE))
    return CatalogSchema(url, revision, tables, no_schema)


def stamped_current(catalog: Catalog) -> bool:
    """Whether the catalog's revision stamp is this clipsearch's head: one query, for a poll
    that found the whole catalog current before (a SQLite file's presence is the caller's to
    check first: connecting would create it). A database error is SQLAlchemy's."""
    with catalog.engine.connect() as conn:
        revision = conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()
    return revision == migration_chain()[1]


def one_line(error: BaseException) -> str:
    """A database error in the database's own words, on one line (no SQL, no link to the
    SQLAlchemy docs): `OperationalError: no such table: images`."""
    original = getattr(error, "orig", None) or error
    words = " ".join(str(original).split()) or type(original).__name__
    return f"{type(original).__name__}: {words}"


def unreadable(url: str, error: BaseException) -> CatalogUnreadable:
    return CatalogUnreadable(url, one_line(error))


def no_catalog_problem(schema: CatalogSchema, index_dir: Path) -> ClipsearchError:
    """What to tell a reader that found no catalog: a lost catalog (CatalogMismatch) when the
    index dir holds an index, else NoCatalog."""
    if schema.found is Found.FOREIGN:
        return NoCatalog(
            schema.url,
            f"it holds {schema.foreign_tables()}. Point CLIPSEARCH_DATABASE_URL (or "
            "--database-url) at your clipsearch catalog",
        )
    found = read_index_file(index_dir)
    if found is not None:
        problem = pairing_problem(
            None, found, False, writing=False, catalog=schema.url, index_dir=index_dir
        )
        assert problem is not None  # no catalog id beside an index.json: a lost catalog
        return problem
    shards = list_shard_dirs(index_dir)
    if shards:
        return CatalogMismatch(
            "catalog_lost",
            f"The index directory {index_dir} holds {len(shards)} shard directories, but there "
            f"is no clipsearch catalog in {schema.url}: the catalog was deleted, reset or "
            "replaced. Restore the catalog from a backup; or, to re-encode every image into a "
            "new index and set the old shards aside (nothing is deleted), run `clipsearch index "
            "--rebuild-catalog`.",
            schema.url,
            str(index_dir),
        )
    if schema.no_schema:
        return NoCatalog(
            schema.url,
            "its search_path names no schema that exists. Check CLIPSEARCH_DATABASE_URL, or "
            "create the schema and run `clipsearch index ROOT` to create a catalog in it",
        )
    return NoCatalog(schema.url)


def require_catalog(catalog: Catalog, index_dir: Path, *, or_nothing: bool = False) -> bool:
    """For everything but `index` and `db upgrade`: the catalog must exist, at this clipsearch's
    schema revision. Raises NoCatalog, CatalogMismatch (a lost catalog beside an index) or
    CatalogSchemaMismatch; changes nothing. True when the catalog is there.

    `or_nothing`: an empty database beside an index dir with no index answers False instead
    (a server may start before the first index run creates its catalog).
    """
    schema = read_schema(catalog)
    found = schema.found
    if found is Found.CURRENT:
        return True
    if found in (Found.NOTHING, Found.FOREIGN):
        problem = no_catalog_problem(schema, index_dir)
        fresh = found is Found.NOTHING and not schema.no_schema
        if or_nothing and fresh and isinstance(problem, NoCatalog):
            return False
        raise problem
    raise schema.schema_mismatch()


def check_writable(schema: CatalogSchema) -> None:
    """Refuse to create or migrate a catalog anywhere but in an empty database or our own."""
    if schema.no_schema:
        raise ConfigError(
            "CLIPSEARCH_DATABASE_URL",
            f"the search_path of {schema.url} names no schema that exists, so there is nowhere "
            "to create the catalog; create the schema first, or point it at another database",
        )
    found = schema.found
    if found is Found.FOREIGN:
        raise ConfigError(
            "CLIPSEARCH_DATABASE_URL",
            f"{schema.url} holds {schema.foreign_tables()} and no clipsearch catalog; "
            "clipsearch creates its catalog only in an empty database (or schema), or migrates "
            "its own. Point it at an empty database, or at your clipsearch catalog",
        )
    if found is Found.NEWER:
        raise schema.schema_mismatch()

"""What a database holds, read without changing it; readers never create or migrate a catalog,
and writers create one only in an empty database or their own. SQLite and Postgres."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from retrieval.catalog.catalog_file import sqlite_file
from retrieval.catalog.database import Catalog
from retrieval.catalog.identity import write_index_file
from retrieval.catalog.migrate import current_revision, head_revision
from retrieval.catalog.schema import Found, read_schema, require_catalog
from retrieval.errors import CatalogMismatch, CatalogSchemaMismatch, ConfigError, NoCatalog
from tests.fixtures.catalogs import database_tables, downgrade_catalog, drop_catalog

OLDER = "0005"  # a revision every later clipsearch still knows


@pytest.fixture
def bare(db_url: str) -> Iterator[Catalog]:
    """A catalog object on a database that holds nothing yet (no SQLite file at all)."""
    catalog = Catalog(db_url)
    yield catalog
    catalog.dispose()


def _foreign_table(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total INTEGER)"))
    engine.dispose()


def test_nothing_is_read_as_nothing_and_nothing_is_created(
    bare: Catalog, db_url: str, tmp_path: Path
) -> None:
    schema = read_schema(bare)
    assert schema.found is Found.NOTHING and not schema.holds_catalog
    with pytest.raises(NoCatalog) as refused:
        require_catalog(bare, tmp_path / "index")
    assert str(refused.value) == (
        f"no clipsearch catalog in {bare.shown_url}; run `clipsearch index ROOT` to create one"
    )
    assert bare.recorded_model() is None
    with pytest.raises((NoCatalog, CatalogMismatch)):  # SQLite opens no file; Postgres: no table
        bare.state()
    path = sqlite_file(db_url)
    if path is not None:
        assert not path.exists() and not Path(f"{path}-wal").exists()
    assert database_tables(db_url) == []


def test_a_current_catalog_is_current_and_an_older_one_is_named_not_migrated(
    bare: Catalog, db_url: str, tmp_path: Path
) -> None:
    bare.upgrade()
    assert read_schema(bare).found is Found.CURRENT
    assert require_catalog(bare, tmp_path / "index") is True
    bare.dispose()
    downgrade_catalog(db_url, OLDER)
    older = Catalog(db_url)
    try:
        assert read_schema(older).found is Found.OLDER
        with pytest.raises(CatalogSchemaMismatch) as refused:
            require_catalog(older, tmp_path / "index")
        assert str(refused.value) == (
            f"the catalog in {older.shown_url} is at schema revision {OLDER}, older than this "
            f"clipsearch's {head_revision()}; run `clipsearch db upgrade` (with the same "
            "--data-dir or --database-url) to migrate it"
        )
        assert current_revision(older.engine) == OLDER  # the reader migrated nothing
        older.upgrade()  # a writer does
        assert current_revision(older.engine) == head_revision()
    finally:
        older.dispose()


def test_a_catalog_from_a_newer_clipsearch_is_refused_by_readers_and_writers(
    bare: Catalog, tmp_path: Path
) -> None:
    bare.upgrade()
    with bare.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    assert read_schema(bare).found is Found.NEWER
    expected = (
        f"the catalog in {bare.shown_url} is at schema revision 9999, which this clipsearch "
        f"does not know (it reads {head_revision()}): a newer clipsearch wrote it. Upgrade "
        "clipsearch to use this catalog"
    )
    with pytest.raises(CatalogSchemaMismatch) as read:
        require_catalog(bare, tmp_path / "index")
    with pytest.raises(CatalogSchemaMismatch) as written:
        bare.upgrade()
    assert str(read.value) == str(written.value) == expected


def test_another_applications_database_gets_no_clipsearch_table(
    bare: Catalog, db_url: str, tmp_path: Path
) -> None:
    path = sqlite_file(db_url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    _foreign_table(db_url)
    assert read_schema(bare).found is Found.FOREIGN
    with pytest.raises(ConfigError) as refused:
        bare.upgrade()
    assert str(refused.value) == (
        f"Invalid setting CLIPSEARCH_DATABASE_URL: {bare.shown_url} holds 1 table of another "
        "application (invoices) and no clipsearch catalog; clipsearch creates its catalog only "
        "in an empty database (or schema), or migrates its own. Point it at an empty database, "
        "or at your clipsearch catalog"
    )
    with pytest.raises(NoCatalog) as read:
        require_catalog(bare, tmp_path / "index")
    assert str(read.value) == (
        f"no clipsearch catalog in {bare.shown_url}; it holds 1 table of another application "
        "(invoices). Point CLIPSEARCH_DATABASE_URL (or --database-url) at your clipsearch "
        "catalog"
    )
    assert database_tables(db_url) == ["invoices"]


def test_no_catalog_beside_an_index_is_a_lost_catalog(bare: Catalog, tmp_path: Path) -> None:
    index_dir = tmp_path / "index"
    write_index_file(index_dir, "abc123")
    with pytest.raises(CatalogMismatch) as refused:
        require_catalog(bare, index_dir)
    assert refused.value.reason == "catalog_lost"
    assert str(refused.value).startswith(
        f"The catalog {bare.shown_url} holds no index, but the index directory {index_dir} "
        "holds index abc123: the catalog was deleted, reset or replaced."
    )


def test_a_server_may_wait_for_the_first_catalog_but_not_beside_a_lost_one(
    bare: Catalog, tmp_path: Path
) -> None:
    index_dir = tmp_path / "index"
    assert require_catalog(bare, index_dir, or_nothing=True) is False
    (index_dir / "shards" / "20260101T000000Z-abc").mkdir(parents=True)
    with pytest.raises(CatalogMismatch) as refused:
        require_catalog(bare, index_dir, or_nothing=True)
    assert str(refused.value).startswith(
        f"The index directory {index_dir} holds 1 shard directories, but there is no "
        f"clipsearch catalog in {bare.shown_url}: the catalog was deleted, reset or replaced."
    )


def test_a_dropped_postgres_schema_is_named(db_url: str, tmp_path: Path) -> None:
    if sqlite_file(db_url) is not None:
        pytest.skip("a search_path schema is Postgres's")
    catalog = Catalog(db_url)
    catalog.upgrade()
    schema = db_url.rsplit("%3D", 1)[-1]
    drop_catalog(db_url)
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text(f"DROP SCHEMA {schema}"))
    engine.dispose()
    catalog.dispose()
    catalog = Catalog(db_url)
    try:
        assert read_schema(catalog).no_schema
        with pytest.raises(NoCatalog) as read:
            require_catalog(catalog, tmp_path / "index")
        assert "its search_path names no schema that exists" in str(read.value)
        with pytest.raises(ConfigError) as written:
            catalog.upgrade()
        assert "names no schema that exists, so there is nowhere to create the catalog" in str(
            written.value
        )
    finally:
        catalog.dispose()
        with create_engine(db_url).begin() as conn:  # for the fixture's DROP SCHEMA
            conn.execute(text(f"CREATE SCHEMA {schema}"))


def test_upgrade_creates_the_sqlite_folder_only_when_it_creates_the_catalog(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'new' / 'catalog.db'}"
    catalog = Catalog(url)
    try:
        assert read_schema(catalog).found is Found.NOTHING
        assert not (tmp_path / "new").exists()
        catalog.upgrade()
        assert inspect(catalog.engine).has_table("index_state")
        assert current_revision(catalog.engine) == head_revision()
    finally:
        catalog.dispose()

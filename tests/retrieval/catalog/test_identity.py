"""The index identity and the catalog file watch: a reader notices a removed, replaced or reset
catalog, and never mixes connections to two catalog files."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from retrieval.catalog.catalog_file import sqlite_file
from retrieval.catalog.database import Catalog
from retrieval.catalog.identity import (
    INDEX_FILE,
    IndexFile,
    new_index_id,
    pairing_problem,
    read_index_file,
    read_index_id,
    write_index_file,
)
from retrieval.errors import CatalogMismatch
from tests.fixtures.catalogs import drop_catalog


def _catalog_with_id(path: Path, index_id: str) -> Catalog:
    catalog = Catalog(f"sqlite:///{path}")
    catalog.upgrade()
    catalog.set_index_id(index_id)
    return catalog


def test_index_json_round_trip_and_refusals(tmp_path: Path) -> None:
    assert read_index_id(tmp_path) is None
    index_id = new_index_id()
    write_index_file(tmp_path, index_id, ("older",))
    assert read_index_file(tmp_path) == IndexFile(index_id, ("older",))
    assert read_index_id(tmp_path) == index_id
    assert [p.name for p in tmp_path.iterdir()] == [INDEX_FILE]  # no temporary file left
    for body in (
        "{broken",
        "[]",
        '{"index_id": ""}',
        '{"index_id": 7}',
        '{"index_id": "a", "read_only_catalogs": "b"}',
    ):
        (tmp_path / INDEX_FILE).write_text(body)
        with pytest.raises(CatalogMismatch) as refused:
            read_index_id(tmp_path)
        assert refused.value.reason == "unreadable_identity"


@pytest.mark.parametrize(
    ("catalog_id", "found", "missing", "reason", "reason_writing"),
    [
        ("a", IndexFile("a"), False, None, None),
        (None, None, False, None, None),  # before identities; the writer checks its shards
        ("a", None, False, None, None),  # index.json lost, every shard there (or a first run)
        ("a", None, True, "index_dir_lost", "index_dir_lost"),
        (None, IndexFile("a"), False, "catalog_lost", "catalog_lost"),
        ("a", IndexFile("b"), False, "other_index", "other_index"),
        ("a", IndexFile("b", ("a",)), False, None, "read_only_catalog"),  # left by migrate-to
        ("c", IndexFile("b", ("a",)), False, "other_index", "other_index"),
    ],
)
def test_pairing_rules(
    catalog_id: str | None,
    found: IndexFile | None,
    missing: bool,
    reason: str | None,
    reason_writing: str | None,
) -> None:
    for writing, expected in ((False, reason), (True, reason_writing)):
        problem = pairing_problem(
            catalog_id, found, missing, writing=writing, catalog="db", index_dir=Path("/index")
        )
        assert (problem.reason if problem else None) == expected, writing


def test_sqlite_file_url_parsing() -> None:
    assert sqlite_file("sqlite:////var/lib/c.db") == Path("/var/lib/c.db")
    assert sqlite_file("sqlite:///rel/c.db?timeout=3") == Path("rel/c.db")
    assert sqlite_file("sqlite:///:memory:") is None
    assert sqlite_file("postgresql+psycopg://u@h/db") is None


def test_a_replaced_sqlite_file_is_noticed_and_never_mixed(tmp_path: Path) -> None:
    path = tmp_path / "catalog.db"
    catalog = _catalog_with_id(path, "first")
    try:
        assert catalog.state().index_id == "first"
        assert catalog.reopen_if_replaced() is False
        other = _catalog_with_id(tmp_path / "other.db", "second")
        other.dispose()
        # A restore as it should be done: the old write-ahead log goes with the old file.
        for suffix in ("-wal", "-shm"):
            Path(f"{path}{suffix}").unlink()
        os.replace(tmp_path / "other.db", path)
        # A new connection would open the other file beside the pooled one: refused.
        with catalog.engine.connect(), pytest.raises(CatalogMismatch) as refused:
            with catalog.engine.connect():
                pass
        assert refused.value.reason == "catalog_replaced"
        assert catalog.reopen_if_replaced() is True
        assert catalog.state().index_id == "second"
        assert catalog.reopen_if_replaced() is False
    finally:
        catalog.dispose()


def test_a_removed_sqlite_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "catalog.db"
    catalog = _catalog_with_id(path, "first")
    try:
        catalog.state()
        path.unlink()
        with pytest.raises(CatalogMismatch) as refused:
            catalog.reopen_if_replaced()
        assert refused.value.reason == "catalog_removed" and str(path) in str(refused.value)
        assert not path.exists()  # the check did not create an empty file in its place
    finally:
        catalog.dispose()


def test_no_new_catalog_is_opened_beside_the_log_of_a_deleted_one(tmp_path: Path) -> None:
    path = tmp_path / "catalog.db"
    catalog = _catalog_with_id(path, "first")
    try:
        catalog.state()  # an open connection keeps catalog.db-wal, with frames, on disk
        path.unlink()
        fresh = Catalog(f"sqlite:///{path}")
        with pytest.raises(CatalogMismatch) as refused:
            fresh.upgrade()
        assert refused.value.reason == "catalog_removed" and "-wal" in str(refused.value)
        assert not path.exists()  # nothing was created
        fresh.dispose()
    finally:
        catalog.dispose()


def test_a_catalog_without_tables_is_a_lost_catalog(db_url: str) -> None:
    catalog = Catalog(db_url)
    catalog.upgrade()
    catalog.set_index_id("first")
    assert catalog.state().index_id == "first"
    path = sqlite_file(db_url)
    if path is None:
        drop_catalog(db_url)  # Postgres: the tables go, the connection stays
    else:
        catalog.dispose()
        drop_catalog(db_url)
        sqlite3.connect(path).close()  # an empty file where the catalog was
        catalog = Catalog(db_url)
    try:
        with pytest.raises(CatalogMismatch) as refused:
            catalog.state()
        assert refused.value.reason == "catalog_lost"
        assert "no clipsearch tables" in str(refused.value)
    finally:
        catalog.dispose()

"""Say where it looked: `status` names the data dir, the catalog (password masked) and the index
dir; no catalog is reported as such; readers never create or migrate one; `index` and `db
upgrade` create one only in an empty database or their own, and nothing beside a lost catalog."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from retrieval.catalog.catalog_file import sqlite_file
from retrieval.catalog.copy import display_url
from retrieval.catalog.database import Catalog
from retrieval.catalog.migrate import current_revision, head_revision
from retrieval.config import Settings
from retrieval.training.shapes import generate_shapes
from tests.fixtures.catalogs import database_tables, downgrade_catalog, drop_catalog
from tests.indexer.cli.test_cli import env, run_cli  # noqa: F401 - `env` is a fixture
from tests.indexer.cli.test_index_model import free_port, uvicorn_runs  # noqa: F401

OLDER = "0005"


@pytest.fixture
def where(env: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:  # noqa: F811
    """The environment of `env`; on SQLite, the catalog is the data dir's own (no URL set)."""
    env.data_dir.mkdir(parents=True)
    if sqlite_file(env.resolved_database_url) is not None:
        monkeypatch.delenv("CLIPSEARCH_DATABASE_URL")
        return env.model_copy(update={"database_url": None})
    return env


def _cli(args: list[str], capsys: Any, monkeypatch: Any) -> tuple[int, str, str]:
    return run_cli(args, capsys, monkeypatch)


def _files(settings: Settings) -> list[str]:
    return sorted(str(p.relative_to(settings.data_dir)) for p in settings.data_dir.rglob("*"))


def _places(settings: Settings, url: str) -> str:
    return (
        f"data dir:  {settings.data_dir}\n"
        f"database:  {url}\n"
        f"index dir: {settings.resolved_index_dir}  (does not exist)\n"
    )


# --- status says where it looked ------------------------------------------------------------


def test_status_prints_the_data_dir_the_masked_url_and_the_index_dir(
    where: Settings,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = where.resolved_database_url
    if sqlite_file(url) is None:  # Postgres here trusts any password: the URL carries one
        url = url.replace("postgres@", "postgres:s3cret@", 1)
        monkeypatch.setenv("CLIPSEARCH_DATABASE_URL", url)
    Catalog(url).upgrade()
    shown = display_url(url)
    code, out, err = _cli(["status"], capsys, monkeypatch)
    assert code == 0, err
    assert out.startswith(_places(where, shown) + "generation 0, model none\n")
    code, out, err = _cli(["status", "--json"], capsys, monkeypatch)
    assert code == 0, err
    info = json.loads(out)
    assert (info["data_dir"], info["database"], info["index_dir"]) == (
        str(where.data_dir),
        shown,
        str(where.resolved_index_dir),
    )
    assert "s3cret" not in shown and "s3cret" not in out + err


# --- no catalog -----------------------------------------------------------------------------

READERS = [
    ["status"],
    ["search", "a red circle"],
    ["verify"],
    ["labels", "list"],
    ["labels", "show", "shapes"],
    ["label"],
    ["eval", "--ann"],
    ["compact"],
    ["repair"],
]


@pytest.mark.parametrize("args", READERS, ids=lambda args: " ".join(args))
def test_every_reader_reports_no_catalog_and_creates_nothing(
    args: list[str],
    where: Settings,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    code, out, err = _cli(args, capsys, monkeypatch)
    shown = display_url(where.resolved_database_url)
    assert code == 9, out + err
    assert err.endswith(
        f"error: no clipsearch catalog in {shown}; run `clipsearch index ROOT` to create one\n"
    )
    assert "generation" not in out and "Traceback" not in err
    if args == ["status"]:  # where it looked comes first
        assert out == _places(where, shown)
    assert _files(where) == []  # no catalog file, log, lock, index dir
    assert database_tables(where.resolved_database_url) == []


def test_serve_with_no_catalog_yet_warns_and_creates_nothing(
    where: Settings,
    uvicorn_runs: list[dict[str, Any]],  # noqa: F811
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    code, _, err = _cli(["serve", "--port", free_port()], capsys, monkeypatch)
    assert code == 0, err
    shown = display_url(where.resolved_database_url)
    assert (
        f"warning: no clipsearch catalog in {shown}; run `clipsearch index ROOT` to create one; "
        "the server answers 503 (not ready) until then\n"
    ) in err
    assert len(uvicorn_runs) == 1
    assert _files(where) == [] and database_tables(where.resolved_database_url) == []


# --- an older catalog -----------------------------------------------------------------------


def test_readers_name_db_upgrade_for_an_older_catalog_and_migrate_nothing(
    where: Settings,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = where.resolved_database_url
    Catalog(url).upgrade()
    downgrade_catalog(url, OLDER)
    expected = (
        f"error: the catalog in {display_url(url)} is at schema revision {OLDER}, older than "
        f"this clipsearch's {head_revision()}; run `clipsearch db upgrade` (with the same "
        "--data-dir or --database-url) to migrate it\n"
    )
    for args in (["status"], ["search", "a red circle"], ["verify"], ["labels", "list"]):
        code, _, err = _cli(args, capsys, monkeypatch)
        assert (code, err) == (11, expected), args
    engine = create_engine(url)
    assert current_revision(engine) == OLDER
    code, out, err = _cli(["db", "upgrade"], capsys, monkeypatch)
    assert (code, out) == (0, f"catalog at revision {head_revision()}\n"), err
    assert current_revision(engine) == head_revision()
    engine.dispose()
    assert _cli(["status"], capsys, monkeypatch)[0] == 0


# --- another application's database ----------------------------------------------------------


def test_index_and_db_upgrade_refuse_a_database_of_another_application(
    where: Settings,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = where.resolved_database_url
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE invoices (id INTEGER PRIMARY KEY)"))
    engine.dispose()
    generate_shapes(tmp_path / "pics", 2, seed=1)
    refused = (
        f"error: Invalid setting CLIPSEARCH_DATABASE_URL: {display_url(url)} holds 1 table of "
        "another application (invoices) and no clipsearch catalog; clipsearch creates its "
        "catalog only in an empty database (or schema), or migrates its own. Point it at an "
        "empty database, or at your clipsearch catalog\n"
    )
    for args in (["index", str(tmp_path / "pics")], ["db", "upgrade"]):
        code, _, err = _cli(args, capsys, monkeypatch)
        assert (code, err) == (2, refused), args
    code, _, err = _cli(["status"], capsys, monkeypatch)
    assert code == 9 and "it holds 1 table of another application (invoices)" in err
    assert database_tables(url) == ["invoices"]


# --- a lost catalog (issue: a refused index created and migrated an empty one) --------------


@pytest.mark.parametrize("loss", ["deleted", "schema dropped"])
def test_index_beside_a_lost_catalog_refuses_and_creates_nothing(
    loss: str,
    where: Settings,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = where.resolved_database_url
    path = sqlite_file(url)
    if loss == "schema dropped" and path is not None:
        pytest.skip("a schema is Postgres's; the SQLite file is deleted in the other case")
    generate_shapes(tmp_path / "pics", 4, seed=2)
    code, _, err = _cli(["index", str(tmp_path / "pics")], capsys, monkeypatch)
    assert code == 0, err
    drop_catalog(url)  # SQLite: the file and its log go; Postgres: every table goes
    schema = url.rsplit("%3D", 1)[-1]
    if loss == "schema dropped":
        with create_engine(url).begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema}"))
    before = _files(where)
    try:
        for args in (["index", str(tmp_path / "pics")], ["status"]):
            code, _, err = _cli(args, capsys, monkeypatch)
            assert code == 8, (args, err)
            assert "holds no index, but the index directory" in err, err
            assert "--rebuild-catalog" in err and "Traceback" not in err
        assert _files(where) == before  # no catalog.db, -wal, -shm or .migrate.lock
        if path is not None:
            assert not path.exists()
        elif loss == "deleted":
            assert database_tables(url) == []
    finally:
        if loss == "schema dropped":
            with create_engine(url).begin() as conn:  # for the fixture's DROP SCHEMA
                conn.execute(text(f"CREATE SCHEMA {schema}"))

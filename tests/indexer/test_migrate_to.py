"""`clipsearch db migrate-to`: an indexed SQLite catalog into Postgres, then the same searches."""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from retrieval.training.shapes import generate_shapes
from tests.conftest import BOTH_DATABASES, TINY, fresh_database
from tests.indexer.cli.test_cli import run_cli

QUERIES = ["a red circle", "a blue square", "a green star"]


@pytest.fixture(params=BOTH_DATABASES)
def target_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    directory = tmp_path / "target"
    directory.mkdir()
    yield from fresh_database(request.param, directory)


@pytest.fixture
def sqlite_env(tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A SQLite catalog in the data dir, the tiny model, every other setting default."""
    for key in list(os.environ):
        if key.startswith("CLIPSEARCH_") and key != "CLIPSEARCH_TEST_DATABASE_URL":
            monkeypatch.delenv(key)
    data_dir = tmp_path / "data"
    monkeypatch.setenv("CLIPSEARCH_DATA_DIR", str(data_dir))
    monkeypatch.setenv("CLIPSEARCH_MODEL", TINY)
    monkeypatch.setenv("CLIPSEARCH_PRETRAINED", str(tiny_checkpoint))
    monkeypatch.setenv("CLIPSEARCH_DEVICE", "cpu")
    monkeypatch.setenv("CLIPSEARCH_WORKERS", "0")
    return data_dir


def _json(args: list[str], capsys: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    code, out, err = run_cli([*args, "--json"], capsys, monkeypatch)
    assert code == 0, err
    return json.loads(out)


def _instant(text: str) -> dt.datetime:
    moment = dt.datetime.fromisoformat(text)
    return moment.replace(tzinfo=dt.UTC) if moment.tzinfo is None else moment.astimezone(dt.UTC)


def _comparable(result: dict[str, Any]) -> list[tuple[Any, ...]]:
    return [
        (hit["id"], hit["path"], hit["score"], hit["width"], hit["height"], hit["format"])
        + (_instant(hit["indexed_at"]),)
        for hit in result["results"]
    ]


@pytest.mark.slow
def test_migrate_to_copies_the_catalog_and_searches_agree(
    sqlite_env: Path,
    target_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pics = tmp_path / "pics"
    samples = generate_shapes(pics, 24, seed=8)
    assert _json(["index", str(pics)], capsys, monkeypatch)["new"] == 24
    # Tombstones and a move, so the copy holds more than fresh rows.
    samples[1].path.unlink()
    samples[2].path.rename(pics / "moved.jpg")
    second = _json(["index", str(pics)], capsys, monkeypatch)
    assert (second["deleted"], second["moved"]) == (1, 1)
    source_status = _json(["status"], capsys, monkeypatch)
    source_url = source_status["database"]

    code, out, err = run_cli(["db", "migrate-to", target_url, "--no-progress"], capsys, monkeypatch)
    assert code == 0, err
    assert "row counts verified" in out and "CLIPSEARCH_DATABASE_URL=" in out
    assert f"CLIPSEARCH_INDEX_DIR={sqlite_env / 'index'}" in out

    target_status = _json(["status", "--database-url", target_url], capsys, monkeypatch)
    for key in ("generation", "model", "shards", "images", "index_dir"):
        assert target_status[key] == source_status[key], key
    assert target_status["images"] == {"active": 23, "deleted": 1}

    # The same index dir serves both catalogs: identical ids, paths and scores.
    for query in QUERIES:
        on_sqlite = _json(["search", query, "-k", "10"], capsys, monkeypatch)
        on_target = _json(
            ["search", query, "-k", "10", "--database-url", target_url], capsys, monkeypatch
        )
        assert len(on_sqlite["results"]) == 10
        assert _comparable(on_target) == _comparable(on_sqlite), query
        assert on_target["generation"] == on_sqlite["generation"]
    by_image = [
        _json(["search", "--image", str(samples[5].path), "-k", "5", *extra], capsys, monkeypatch)
        for extra in ([], ["--database-url", target_url])
    ]
    assert _comparable(by_image[0]) == _comparable(by_image[1])
    assert by_image[0]["results"][0]["path"] == str(samples[5].path)
    deleted_path = str(samples[1].path)
    assert all(hit["path"] != deleted_path for hit in on_target["results"])

    # A second copy is refused: the target is no longer empty.
    code, _, err = run_cli(["db", "migrate-to", target_url, "--no-progress"], capsys, monkeypatch)
    assert code == 2 and "not empty" in err and "--force" in err

    # The new catalog goes on: the next run assigns fresh ids and job ids.
    generate_shapes(tmp_path / "more", 1, seed=99)
    (tmp_path / "more" / "red_circle" / "00000.jpg").rename(pics / "new.jpg")
    third = _json(["index", str(pics), "--database-url", target_url], capsys, monkeypatch)
    assert third["new"] == 1 and third["unchanged"] == 23
    hit = _json(
        ["search", "--image", str(pics / "new.jpg"), "-k", "1", "--database-url", target_url],
        capsys,
        monkeypatch,
    )["results"][0]
    assert hit["path"] == str(pics / "new.jpg") and hit["id"] == 25
    # The SQLite catalog was left as it was.
    assert _json(["status"], capsys, monkeypatch)["images"] == source_status["images"]
    assert source_url.startswith("sqlite")


def test_migrate_to_refuses_a_bad_url(
    sqlite_env: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, err = run_cli(["db", "migrate-to", "mysql://x/y"], capsys, monkeypatch)
    assert code == 2 and "sqlite:/// or postgresql://" in err
    assert "Traceback" not in err

"""The `clipsearch` command in-process: output formats, exit codes, error messages."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from indexer.cli.app import main
from retrieval.catalog.database import Catalog
from retrieval.catalog.migrate import head_revision
from retrieval.config import Settings
from retrieval.training.shapes import generate_shapes


def run_cli(
    args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["clipsearch", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("CLIPSEARCH_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("CLIPSEARCH_DATABASE_URL", settings.resolved_database_url)
    monkeypatch.setenv("CLIPSEARCH_MODEL", settings.model)
    monkeypatch.setenv("CLIPSEARCH_PRETRAINED", settings.pretrained)
    monkeypatch.setenv("CLIPSEARCH_DEVICE", "cpu")
    monkeypatch.setenv("CLIPSEARCH_WORKERS", "0")
    return settings


def test_help_names_every_command(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, _ = run_cli(["--help"], capsys, monkeypatch)
    assert code == 0
    for command in ("index", "search", "compact", "status", "db", "demo"):
        assert command in out
    assert "Exit codes" in out


def test_index_search_status_roundtrip(
    env: Settings,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    samples = generate_shapes(tmp_path / "pics", 12, seed=4)
    code, out, err = run_cli(["index", str(tmp_path / "pics"), "--json"], capsys, monkeypatch)
    assert code == 0, err
    report = json.loads(out)
    assert report["new"] == 12 and report["failed"] == []

    code, out, err = run_cli(["search", "a red circle", "-k", "5", "--json"], capsys, monkeypatch)
    assert code == 0, err
    result = json.loads(out)
    assert len(result["results"]) == 5
    assert set(result["results"][0]) >= {"id", "path", "score"}
    scores = [r["score"] for r in result["results"]]
    assert scores == sorted(scores, reverse=True)

    code, out, err = run_cli(
        ["search", "--image", str(samples[3].path), "-k", "1"], capsys, monkeypatch
    )
    assert code == 0, err
    header, first = out.splitlines()
    assert header == "   score        id  path"  # the README's order: score, id, path, labels
    score, image_id, path = first.split(maxsplit=2)
    assert float(score) > 0.99 and int(image_id) >= 1
    assert path == str(samples[3].path)  # an indexed image finds itself first

    code, out, _ = run_cli(["status", "--json"], capsys, monkeypatch)
    status = json.loads(out)
    assert status["images"] == {"active": 12}
    assert status["model"]["name"] == env.model


def test_bad_setting_exits_2_naming_the_variable(
    env: Settings,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("CLIPSEARCH_BATCH_SIZE", "0")
    code, _, err = run_cli(["index", str(tmp_path)], capsys, monkeypatch)
    assert code == 2
    assert "CLIPSEARCH_BATCH_SIZE" in err and "Traceback" not in err


def test_bad_image_query_exits_2(
    env: Settings,
    catalog: Catalog,  # an empty one: the image is refused before the empty index
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image at all")
    code, _, err = run_cli(["search", "--image", str(junk)], capsys, monkeypatch)
    assert code == 2
    assert "not_an_image" in err


def test_search_needs_exactly_one_query(
    env: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, err = run_cli(["search"], capsys, monkeypatch)
    assert code == 2 and "either a text QUERY or --image" in err


def test_model_mismatch_exits_4(
    env: Settings,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    generate_shapes(tmp_path / "pics", 4, seed=4)
    assert run_cli(["index", str(tmp_path / "pics")], capsys, monkeypatch)[0] == 0
    code, _, err = run_cli(["search", "a red circle", "--pretrained", "none"], capsys, monkeypatch)
    assert code == 4
    assert "re-index" in err


def test_db_upgrade_reports_revision(
    env: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, _ = run_cli(["db", "upgrade"], capsys, monkeypatch)
    assert code == 0 and f"revision {head_revision()}" in out

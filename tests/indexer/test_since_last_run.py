"""`clipsearch index --since-last-run`: the nightly form of `index`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from retrieval.catalog.database import Catalog
from retrieval.catalog.schema import read_schema
from retrieval.config import Settings
from retrieval.training.shapes import generate_shapes
from tests.indexer.cli.test_cli import run_cli


@pytest.fixture
def env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name in ("data_dir", "model", "pretrained", "device", "workers"):
        monkeypatch.setenv(f"CLIPSEARCH_{name.upper()}", str(getattr(settings, name)))
    monkeypatch.setenv("CLIPSEARCH_DATABASE_URL", settings.resolved_database_url)
    return settings


def test_an_empty_catalog_is_refused_and_nothing_is_indexed(
    env: Settings,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    generate_shapes(tmp_path / "pics", 3, seed=1)
    code, out, err = run_cli(
        ["index", str(tmp_path / "pics"), "--since-last-run"], capsys, monkeypatch
    )
    assert code == 2, out + err
    assert "no previous index run" in err and "CLIPSEARCH_DATABASE_URL" in err
    assert "Traceback" not in err
    catalog = Catalog(env.resolved_database_url)
    assert not read_schema(catalog).holds_catalog  # not even an empty catalog was made
    catalog.dispose()


def test_a_nightly_run_names_the_previous_run_and_counts_only_changes(
    env: Settings,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pics = tmp_path / "pics"
    samples = generate_shapes(pics, 6, seed=2)
    code, _, err = run_cli(["index", str(pics)], capsys, monkeypatch)  # the first run, by hand
    assert code == 0, err
    samples[0].path.unlink()
    samples[1].path.rename(pics / "moved.jpg")

    code, out, err = run_cli(
        ["index", str(pics), "--since-last-run", "--json"], capsys, monkeypatch
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["since"]["job"] == 1 and report["since"]["status"] == "succeeded"
    assert (report["new"], report["moved"], report["deleted"], report["unchanged"]) == (0, 1, 1, 4)
    assert report["encoded"] == 0

    code, out, err = run_cli(["index", str(pics), "--since-last-run"], capsys, monkeypatch)
    assert code == 0, err
    first, second = out.splitlines()[:2]
    assert first.startswith("since job 2 (succeeded, started ") and first.endswith(" UTC):")
    assert "0 new, 0 changed, 0 moved, 0 copied, 0 deleted, 5 unchanged" in second

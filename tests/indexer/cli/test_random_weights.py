"""An index built with random weights (pretrained=none) says so wherever its results are shown:
`clipsearch status` and every `clipsearch search`; trained weights say nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from retrieval.config import Settings
from retrieval.training.shapes import generate_shapes
from tests.conftest import fresh_database
from tests.indexer.cli.test_cli import env, run_cli  # noqa: F401 - `env` is a fixture

WARNING = (
    "warning: random weights (pretrained=none): results are meaningless; `clipsearch models` "
    "lists real weights to index with"
)


@pytest.fixture
def db_url(tmp_path: Path) -> Iterator[str]:
    """The warning does not depend on the database: SQLite only."""
    yield from fresh_database("sqlite", tmp_path)


@pytest.mark.parametrize("pretrained", ["none", "checkpoint"])
def test_status_and_search_warn_about_random_weights(
    pretrained: str,
    env: Settings,  # noqa: F811 - the fixture
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    random = pretrained == "none"
    if random:
        monkeypatch.setenv("CLIPSEARCH_PRETRAINED", "none")
    generate_shapes(tmp_path / "pics", 4, seed=2)
    code, _, err = run_cli(["index", str(tmp_path / "pics")], capsys, monkeypatch)
    assert code == 0, err
    monkeypatch.delenv("CLIPSEARCH_PRETRAINED")  # searches use the index's model

    code, out, err = run_cli(["status"], capsys, monkeypatch)
    assert code == 0, err
    assert (WARNING in out.splitlines()) is random
    code, out, _ = run_cli(["status", "--json"], capsys, monkeypatch)
    assert json.loads(out)["random_weights"] is random

    for args in (["search", "a red circle", "-k", "2"], ["search", "a red circle", "--json"]):
        code, out, err = run_cli(args, capsys, monkeypatch)
        assert code == 0, err
        assert err.splitlines() == ([WARNING] if random else [])
        assert WARNING not in out  # stdout keeps only the results

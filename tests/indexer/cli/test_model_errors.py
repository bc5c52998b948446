"""A bad model setting, through `clipsearch index` over an existing index: each one a clear
error with its exit code, no traceback, and nothing in the catalog or the index changed."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from retrieval.catalog.database import Catalog
from retrieval.config import Settings
from retrieval.training.shapes import generate_shapes
from tests.conftest import FamilyModel
from tests.fixtures.open_clip_hf import SIGLIP, write_configs
from tests.indexer.cli.test_cli import env, run_cli  # noqa: F401 - `env` is a fixture

Snapshot = tuple[object, list[tuple[str, int, int]]]


def _snapshot(settings: Settings) -> Snapshot:
    """The catalog's state and every file under the index (path, size, mtime), but the lock."""
    catalog = Catalog(settings.resolved_database_url)
    try:
        state = catalog.state()
    finally:
        catalog.dispose()
    index = settings.resolved_index_dir
    files = [
        (str(path.relative_to(index)), path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(index.rglob("*"))
        if path.is_file() and path.name != "indexer.lock"
    ]
    return state, files


def _not_a_model(tmp: Path, monkeypatch: pytest.MonkeyPatch, _: dict[str, FamilyModel]) -> None:
    folder = tmp / "holiday-photos"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a model")
    monkeypatch.setenv("CLIPSEARCH_MODEL", f"hf:{folder}")
    monkeypatch.setenv("CLIPSEARCH_PRETRAINED", "")


def _tokenizer_missing(
    tmp: Path, monkeypatch: pytest.MonkeyPatch, _: dict[str, FamilyModel]
) -> None:
    configs = write_configs(tmp / "open-clip-hf")
    config = configs / f"{SIGLIP}.json"
    config.write_text(config.read_text().replace(str(tmp / "open-clip-hf" / "tokenizer"), "/gone"))
    monkeypatch.setenv("CLIPSEARCH_MODEL", SIGLIP)
    monkeypatch.setenv("CLIPSEARCH_PRETRAINED", "none")
    monkeypatch.setenv("CLIPSEARCH_MODEL_CONFIG_DIR", str(configs))


def _extra_missing(tmp: Path, monkeypatch: pytest.MonkeyPatch, _: dict[str, FamilyModel]) -> None:
    monkeypatch.delitem(sys.modules, "retrieval.models.families.chinese_clip", raising=False)
    monkeypatch.setitem(sys.modules, "cn_clip", None)  # as if not installed
    monkeypatch.setenv("CLIPSEARCH_MODEL", "cn-clip:ViT-B-16")


def _wrong_architecture(
    tmp: Path, monkeypatch: pytest.MonkeyPatch, models: dict[str, FamilyModel]
) -> None:
    # The open_clip tiny model's weights, loaded as a Chinese-CLIP model.
    monkeypatch.setenv("CLIPSEARCH_MODEL", "cn-clip:clipsearch-tiny-zh")
    monkeypatch.setenv("CLIPSEARCH_PRETRAINED", models["open_clip"].pretrained)


def _another_family(
    tmp: Path, monkeypatch: pytest.MonkeyPatch, models: dict[str, FamilyModel]
) -> None:
    monkeypatch.setenv("CLIPSEARCH_MODEL", models["cn_clip"].model)
    monkeypatch.setenv("CLIPSEARCH_PRETRAINED", models["cn_clip"].pretrained)


CASES: list[tuple[str, Callable[..., None], int, tuple[str, ...]]] = [
    ("a folder that is not a model", _not_a_model, 5, ("config.json",)),
    ("a config whose tokenizer is missing", _tokenizer_missing, 5, ("/gone", "does not exist")),
    ("the family's extra not installed", _extra_missing, 2, ("pip install 'clipsearch[chinese]'",)),
    ("weights of another architecture", _wrong_architecture, 5, ("clipsearch-tiny-zh",)),
    ("an index built with another family", _another_family, 4, ("re-index",)),
]


@pytest.mark.parametrize(
    ("setup", "code", "says"), [case[1:] for case in CASES], ids=[case[0] for case in CASES]
)
def test_a_bad_model_is_refused_and_changes_nothing(
    setup: Callable[..., None],
    code: int,
    says: tuple[str, ...],
    env: Settings,  # noqa: F811 - the fixture
    family_models: dict[str, FamilyModel],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pictures = tmp_path / "pics"
    generate_shapes(pictures, 6, seed=3)
    done, _, err = run_cli(["index", str(pictures)], capsys, monkeypatch)
    assert done == 0, err
    generate_shapes(pictures / "more", 2, seed=8)  # work for the next run
    before = _snapshot(env)

    setup(tmp_path, monkeypatch, family_models)
    torch.manual_seed(0)
    exit_code, out, err = run_cli(["index", str(pictures)], capsys, monkeypatch)
    assert exit_code == code, err
    assert "Traceback" not in err + out
    for text in says:
        assert text in err
    assert _snapshot(env) == before

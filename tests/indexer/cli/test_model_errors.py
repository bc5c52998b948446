"""A bad model setting, through `clipsearch index`: each one a clear error with its exit code, no
traceback, and nothing in the catalog or the index changed.

Over an existing index, a model of another family or architecture is refused as not the index's
(exit 4) before anything is loaded; into a new index, each setting gets its own error."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from retrieval.catalog.database import Catalog
from retrieval.config import Settings
from retrieval.models import encoder
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
]
# Over an existing index of the tiny open_clip model: what makes each one not the index's model.
NOT_THE_INDEXS = {
    "a folder that is not a model": "an hf model, the index's is an open_clip model",
    "a config whose tokenizer is missing": f"architecture {SIGLIP}, the index's is",
    "the family's extra not installed": "a cn_clip model, the index's is an open_clip model",
    "weights of another architecture": "a cn_clip model, the index's is an open_clip model",
    "an index built with another family": "a cn_clip model, the index's is an open_clip model",
}


OVER_AN_INDEX = [
    *((name, setup) for name, setup, *_ in CASES),
    ("an index built with another family", _another_family),
]


@pytest.mark.parametrize(
    ("setup", "says"),
    [(setup, NOT_THE_INDEXS[name]) for name, setup in OVER_AN_INDEX],
    ids=[name for name, _ in OVER_AN_INDEX],
)
def test_a_model_that_is_not_the_indexs_is_refused_before_loading(
    setup: Callable[..., None],
    says: str,
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
    loads: list[str] = []
    monkeypatch.setattr(encoder, "load_backend", lambda spec, *_: loads.append(spec.name))
    exit_code, out, err = run_cli(["index", str(pictures)], capsys, monkeypatch)
    assert exit_code == 4, err
    assert says in err and "re-index" in err and "Traceback" not in err + out
    assert loads == []  # refused from the recorded identity, before any weights were read
    assert _snapshot(env) == before


@pytest.mark.parametrize(
    ("setup", "code", "says"), [case[1:] for case in CASES], ids=[case[0] for case in CASES]
)
def test_a_bad_model_is_refused_and_changes_nothing(
    setup: Callable[..., None],
    code: int,
    says: tuple[str, ...],
    family_models: dict[str, FamilyModel],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A new index (nothing recorded to compare with): each setting gets its own error.
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.setenv("CLIPSEARCH_DATA_DIR", str(data))
    monkeypatch.delenv("CLIPSEARCH_DATABASE_URL", raising=False)
    monkeypatch.setenv("CLIPSEARCH_DEVICE", "cpu")
    monkeypatch.setenv("CLIPSEARCH_WORKERS", "0")
    pictures = tmp_path / "pics"
    generate_shapes(pictures, 2, seed=3)

    setup(tmp_path, monkeypatch, family_models)
    torch.manual_seed(0)
    exit_code, out, err = run_cli(["index", str(pictures)], capsys, monkeypatch)
    assert exit_code == code, err
    assert "Traceback" not in err + out
    for text in says:
        assert text in err
    catalog = Catalog(f"sqlite:///{data / 'catalog.db'}")
    try:
        assert catalog.state().generation == 0 and catalog.counts() == {}
    finally:
        catalog.dispose()
    assert not list((data / "index").glob("shards/*"))

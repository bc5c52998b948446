"""Which model a reading command loads: the index's recorded one, or the one named explicitly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from retrieval.config import load_settings
from retrieval.errors import ModelMismatch
from retrieval.models.identity import ModelIdentity, ModelSource, ModelSpec
from retrieval.models.recorded import check_before_loading, choose_model


def _recorded(name: str = "ViT-B-16", family: str = "open_clip", **source: Any) -> dict[str, Any]:
    identity = ModelIdentity(
        name=name,
        pretrained="/weights/b16.pt",
        weights_sha256="ab" * 32,
        dim=512,
        image_size=224,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        family=family,
        source=ModelSource(**source) if source else None,
    )
    return identity.to_dict()


@pytest.fixture(autouse=True)
def _no_model_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CLIPSEARCH_MODEL", "CLIPSEARCH_PRETRAINED", "CLIPSEARCH_MODEL_CONFIG_DIR"):
        monkeypatch.delenv(name, raising=False)


def test_nothing_named_takes_the_recorded_source(tmp_path: Path) -> None:
    recorded = _recorded(model="ViT-B-16", pretrained="/w/b16.pt", config_dir=str(tmp_path))
    choice = choose_model(load_settings(), recorded)
    assert choice.from_index
    assert (choice.settings.model, choice.settings.pretrained) == ("ViT-B-16", "/w/b16.pt")
    assert choice.settings.model_config_dir == tmp_path


def test_a_record_without_a_source_is_loaded_by_its_name_and_pretrained() -> None:
    choice = choose_model(load_settings(), _recorded())
    assert (choice.settings.model, choice.settings.pretrained) == ("ViT-B-16", "/weights/b16.pt")
    # An hf: identity's name is a digest, not a folder: the settings stay as they are.
    hf = choose_model(load_settings(), _recorded("hf:clip:0123456789ab", "hf"))
    assert not hf.from_index and hf.settings.model == "ViT-B-32"


@pytest.mark.parametrize(
    ("named", "expected"),
    [
        ({"model": "ViT-B-16"}, ("ViT-B-16", "/w/b16.pt")),  # the index's model: its weights
        ({"model": "open_clip:ViT-B-16"}, ("open_clip:ViT-B-16", "/w/b16.pt")),
        ({"model": "ViT-L-14"}, ("ViT-L-14", "laion2b_s34b_b79k")),  # another: the default tag
        ({"pretrained": "/w/tuned.pt"}, ("ViT-B-16", "/w/tuned.pt")),
        ({"model": "ViT-L-14", "pretrained": "none"}, ("ViT-L-14", "none")),
    ],
)
def test_what_is_named_wins(named: dict[str, str], expected: tuple[str, str]) -> None:
    recorded = _recorded(model="ViT-B-16", pretrained="/w/b16.pt")
    settings = choose_model(load_settings(**named), recorded).settings
    assert (settings.model, settings.pretrained) == expected


def test_the_environment_counts_as_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPSEARCH_MODEL", "ViT-L-14")
    monkeypatch.setenv("CLIPSEARCH_PRETRAINED", "none")
    choice = choose_model(load_settings(), _recorded(model="ViT-B-16", pretrained="/w/b16.pt"))
    assert not choice.from_index and choice.settings.model == "ViT-L-14"


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        (ModelSpec("cn-clip:ViT-B-16", "x.pt"), "a cn_clip model, the index's is an open_clip"),
        (ModelSpec("ViT-L-14", "x.pt"), "architecture ViT-L-14, the index's is ViT-B-16"),
        (ModelSpec("ViT-B-16", "none"), "random weights, the index's are trained ones"),
    ],
)
def test_a_certain_difference_is_refused_before_loading(spec: ModelSpec, says: str) -> None:
    with pytest.raises(ModelMismatch, match=says):
        check_before_loading(spec, ModelIdentity.from_dict(_recorded()))


def test_what_cannot_be_told_cheaply_is_left_to_the_loader(tmp_path: Path) -> None:
    indexed = ModelIdentity.from_dict(_recorded())
    check_before_loading(ModelSpec("ViT-B-16", "laion2b_s34b_b88k"), indexed)  # a tag: load it
    check_before_loading(ModelSpec("ViT-B-16", str(tmp_path / "gone.pt")), indexed)
    check_before_loading(ModelSpec("cn-clip:ViT-B-16", "none"), None)  # nothing indexed
    same = tmp_path / "same.pt"
    same.write_bytes(b"weights")
    from retrieval.models.weights import sha256_file

    recorded = _recorded()
    recorded["weights_sha256"] = sha256_file(same)
    check_before_loading(ModelSpec("ViT-B-16", str(same)), ModelIdentity.from_dict(recorded))

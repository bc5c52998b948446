"""Model names (FAMILY:NAME) and identities: what decides whether two indexes may mix."""

from __future__ import annotations

import pytest

from retrieval.errors import ConfigError, ModelMismatch
from retrieval.models.identity import ModelIdentity, ModelSpec, parse_model_name

BASE = {
    "name": "ViT-B-32",
    "pretrained": "laion2b_s34b_b79k",
    "weights_sha256": "ab" * 32,
    "dim": 512,
    "image_size": 224,
    "mean": [0.5, 0.5, 0.5],
    "std": [0.25, 0.25, 0.25],
}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("ViT-B-32", ("open_clip", "ViT-B-32")),
        ("open_clip:ViT-B-32", ("open_clip", "ViT-B-32")),
        ("hf-hub:timm/ViT-B-16-SigLIP", ("open_clip", "hf-hub:timm/ViT-B-16-SigLIP")),
        ("cn-clip:ViT-B-16", ("cn_clip", "ViT-B-16")),
        ("Chinese-CLIP:RN50", ("cn_clip", "RN50")),
        ("hf:/models/my clip:v2", ("hf", "/models/my clip:v2")),
        ("/models/a:b", ("open_clip", "/models/a:b")),
    ],
)
def test_model_names_parse_to_a_family(name: str, expected: tuple[str, str]) -> None:
    assert parse_model_name(name) == expected
    spec = ModelSpec(name, "none")
    assert (spec.family, spec.family_name) == expected


@pytest.mark.parametrize("name", ["clip-ru:ViT-B-32", "hf:", "cn-clip:  "])
def test_bad_model_names_are_setting_errors(name: str) -> None:
    with pytest.raises(ConfigError, match="CLIPSEARCH_MODEL"):
        parse_model_name(name)


def test_open_clip_keys_are_those_of_indexes_written_before_families() -> None:
    # The key of an open_clip identity stored without family/tokenizer must not change:
    # otherwise every existing index would refuse its own model.
    old = ModelIdentity.from_dict(BASE)
    assert old.family == "open_clip" and old.tokenizer == ""
    assert old.key == "b30ac391b89e690e"  # computed by the code before families existed
    assert ModelIdentity.from_dict(old.to_dict()) == old


def test_another_family_with_the_same_weights_is_another_model() -> None:
    old = ModelIdentity.from_dict(BASE)
    other = ModelIdentity.from_dict({**BASE, "family": "cn_clip", "tokenizer": "bert:1234"})
    assert other.key != old.key
    with pytest.raises(ModelMismatch):
        other.require_same(old)
    retokenized = ModelIdentity.from_dict({**BASE, "family": "cn_clip", "tokenizer": "bert:5678"})
    assert retokenized.key != other.key

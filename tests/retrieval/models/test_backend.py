"""The family seam: loading through a family module, and a family whose package is missing."""

from __future__ import annotations

import sys

import pytest

from retrieval.errors import ConfigError
from retrieval.models.backend import FAMILY_MODULES
from retrieval.models.encoder import load_encoder
from retrieval.models.identity import ModelSpec


@pytest.mark.parametrize(
    ("name", "package", "extra"),
    [("cn-clip:ViT-B-16", "cn_clip", "chinese"), ("hf:/models/x", "transformers", "hf")],
)
def test_a_family_without_its_package_names_the_extra_to_install(
    monkeypatch: pytest.MonkeyPatch, name: str, package: str, extra: str
) -> None:
    family = FAMILY_MODULES[ModelSpec(name, "none").family]
    # As if the package were not installed: importing it raises ImportError.
    monkeypatch.delitem(sys.modules, f"retrieval.models.families.{family.module}", raising=False)
    monkeypatch.setitem(sys.modules, package, None)
    with pytest.raises(ConfigError) as info:
        load_encoder(ModelSpec(name, "none", device="cpu"))
    assert f"pip install 'clipsearch[{extra}]'" in str(info.value)
    assert package in str(info.value)

"""An export's torch-free preprocessing and tokenizers equal the torch backend's, family by
family: pixels within 1e-6 on images of many sizes and modes, token ids and trimmed lengths
exactly, on English, Chinese, emoji, long and empty texts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval.models.backend import ModelBackend
from retrieval.models.encoder import load_encoder
from retrieval.models.exported import describe
from retrieval.models.exported.preprocess import ImagePreprocess
from retrieval.models.exported.text import open_tokenizer, trimmed
from tests.conftest import FamilyModel

PORTABLE_FAMILIES = ["open_clip", "cn_clip", "open_clip-xlmr", "open_clip-siglip"]
TEXTS = [
    "a red circle",
    "A Photo of TWO dogs, playing on the beach!",
    "一只猫坐在窗台上",
    "红色的圆形 and a blue square",
    "🙂🐶 emoji 🎉 party",
    "café naïve résumé &amp; co &lt;b&gt;",
    "",
    "   spaced    out\ttext\n",
    "long " * 80,
    "一只非常长的猫" * 30,
    "don't we'll it's they're I'M",
    "numbers 1234567 and 3.14",
]


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(97, 61), (61, 97), (64, 64), (300, 200), (13, 7), (33, 120), (1, 1), (257, 256)]
    modes = ["RGB", "L", "RGBA", "P", "LA", "CMYK", "RGB", "I;16"]
    images = []
    for (width, height), mode in zip(sizes, modes, strict=True):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        image = Image.fromarray(pixels, "RGB")
        if mode == "P":
            image = image.quantize(32)
        elif mode == "I;16":
            image = image.convert("L").convert("I;16")
        elif mode != "RGB":
            image = image.convert(mode)
        images.append(image)
    return images


@pytest.fixture(scope="module")
def backends(family_models: dict[str, FamilyModel]) -> dict[str, ModelBackend]:
    return {name: load_encoder(family_models[name].spec()).backend for name in PORTABLE_FAMILIES}


@pytest.mark.parametrize("family", PORTABLE_FAMILIES)
def test_preprocessing_equals_the_torch_transform(
    family: str, backends: dict[str, ModelBackend]
) -> None:
    backend = backends[family]
    ours = ImagePreprocess(describe.image_steps(backend.preprocess))
    for image in _images():
        if image.mode == "I;16" and family != "open_clip":
            continue
        expected = backend.preprocess(image).numpy()
        got = ours(image)
        assert got.dtype == np.float32 and got.shape == expected.shape, image
        assert np.abs(got - expected).max() <= 1e-6, (image.mode, image.size)


@pytest.mark.parametrize("family", PORTABLE_FAMILIES)
def test_tokens_and_trimming_equal_the_torch_tokenizer(
    family: str, backends: dict[str, ModelBackend], tmp_path: Path
) -> None:
    backend = backends[family]
    parts = describe.portable_parts(backend, tmp_path)
    assert "why" not in parts
    tokenizer = open_tokenizer(tmp_path, parts["text"])
    for text in TEXTS:
        expected = backend.tokenize([text])
        got = tokenizer([text])
        np.testing.assert_array_equal(got.ids, expected.ids.numpy(), err_msg=repr(text))
        assert got.mask is None or expected.mask is None or np.array_equal(got.mask, expected.mask)
    batch_expected = backend.tokenize(TEXTS[:3])
    batch = tokenizer(TEXTS[:3])
    np.testing.assert_array_equal(batch.ids, batch_expected.ids.numpy())
    for texts in (TEXTS[:1], TEXTS[:3], TEXTS[6:7], TEXTS):
        ours = trimmed(tokenizer(texts), parts["text"]["trim"])
        theirs = backend.trimmed(backend.tokenize(texts))
        assert ours.ids.shape == tuple(theirs.ids.shape), texts


def test_transformers_folders_say_why_they_need_torch(
    family_models: dict[str, FamilyModel], tmp_path: Path
) -> None:
    backend = load_encoder(family_models["hf"].spec()).backend
    assert describe.portable_parts(backend, tmp_path) == {
        "why": "a transformers image processor runs in torch only"
    }

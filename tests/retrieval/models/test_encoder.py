"""The encoder against open_clip's own reference path, on the tiny test model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from retrieval.errors import ConfigError, ModelMismatch, WeightsUnavailable
from retrieval.models.encoder import Encoder, load_encoder
from retrieval.models.identity import ModelIdentity, ModelSpec

TEXTS = ["a red circle", "a photo of a blue square on a wooden table", "x", "a b c d e f g h"]


def _images(n: int = 5) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(64, 64), (120, 80), (33, 200), (300, 301), (64, 48)]
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes[:n]]


def test_image_embeddings_match_open_clip_reference(
    encoder: Encoder, tiny_checkpoint: Path
) -> None:
    model, _, preprocess = open_clip.create_model_and_transforms(
        "clipsearch-tiny", pretrained=str(tiny_checkpoint)
    )
    model.eval()
    images = _images()
    with torch.no_grad():
        reference = model.encode_image(torch.stack([preprocess(im) for im in images]))
        reference = torch.nn.functional.normalize(reference, dim=-1).numpy()
    ours = encoder.encode_images(images)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, reference, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_text_embeddings_match_open_clip_reference(encoder: Encoder, tiny_checkpoint: Path) -> None:
    model = open_clip.create_model("clipsearch-tiny", pretrained=str(tiny_checkpoint))
    model.eval()
    tokenizer = open_clip.get_tokenizer("clipsearch-tiny")
    with torch.no_grad():
        reference = model.encode_text(tokenizer(TEXTS))
        reference = torch.nn.functional.normalize(reference, dim=-1).numpy()
    np.testing.assert_allclose(encoder.encode_texts(TEXTS), reference, atol=1e-5)


def test_trimmed_text_equals_full_context(encoder: Encoder) -> None:
    assert encoder.backend.trims_exactly()
    trimmed = encoder.encode_texts(TEXTS, trim=True)
    full = encoder.encode_texts(TEXTS, trim=False)
    np.testing.assert_allclose(trimmed, full, atol=1e-6)
    # one at a time, too: each query is trimmed to its own length
    for text, row in zip(TEXTS, full, strict=True):
        np.testing.assert_allclose(encoder.encode_texts([text])[0], row, atol=1e-6)


def test_identity_records_the_weights(encoder: Encoder, tiny_checkpoint: Path) -> None:
    identity = encoder.identity
    assert identity.name == "clipsearch-tiny"
    assert identity.dim == 128
    assert identity.image_size == 64
    assert len(identity.weights_sha256) == 64
    assert ModelIdentity.from_dict(identity.to_dict()) == identity


def test_same_weights_at_another_path_is_the_same_model(
    encoder: Encoder, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "moved.pt"
    copy.write_bytes(tiny_checkpoint.read_bytes())
    other = load_encoder(ModelSpec("clipsearch-tiny", str(copy), device="cpu"))
    assert other.identity.key == encoder.identity.key
    other.identity.require_same(encoder.identity)


def test_other_weights_are_a_mismatch(encoder: Encoder) -> None:
    random = load_encoder(ModelSpec("clipsearch-tiny", "none", device="cpu"))
    with pytest.raises(ModelMismatch, match="re-index"):
        random.identity.require_same(encoder.identity)


def test_missing_checkpoint_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailable) as info:
        load_encoder(ModelSpec("clipsearch-tiny", str(tmp_path / "nope.pt"), device="cpu"))
    assert "CLIPSEARCH_PRETRAINED" in str(info.value)


def test_unknown_tag_lists_known_tags() -> None:
    with pytest.raises(WeightsUnavailable) as info:
        load_encoder(ModelSpec("ViT-B-32", "not-a-tag", device="cpu"))
    assert "laion2b_s34b_b79k" in str(info.value)


def test_a_mistyped_tag_suggests_the_nearest_one() -> None:
    with pytest.raises(WeightsUnavailable) as info:
        load_encoder(ModelSpec("ViT-B-32", "laion2b_s34b_b97k", device="cpu"))
    message = str(info.value)
    assert "Did you mean 'laion2b_s34b_b79k'?" in message
    assert "open_clip.create_model" not in message and "python -c" not in message


def test_a_mistyped_model_suggests_the_nearest_one() -> None:
    with pytest.raises(WeightsUnavailable, match="Did you mean ViT-B-32"):
        load_encoder(ModelSpec("ViT-B-23", "none", device="cpu"))


def test_unknown_model_name() -> None:
    with pytest.raises(WeightsUnavailable, match="Unknown model"):
        load_encoder(ModelSpec("ViT-Nope", "none", device="cpu"))


def test_uncached_tag_offline_fails_fast_with_instructions(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import retrieval.models.weights as weights

    # Simulate a machine with no route to the hub and an empty cache.
    monkeypatch.setattr(weights, "host_resolves", lambda url, timeout=3.0: False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(WeightsUnavailable) as info:
        load_encoder(ModelSpec("ViT-B-32", "laion2b_s34b_b79k", cache_dir=tmp_path, device="cpu"))
    message = str(info.value)
    assert "not in the local cache" in message
    # The exact repo and file, their size, and the commands that get them.
    assert "laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in message
    assert "open_clip_model.safetensors" in message and "about 605 MB" in message
    assert "clipsearch models fetch ViT-B-32" in message
    assert "clipsearch models import FILE --name ViT-B-32" in message
    assert "open_clip.create_model" not in message and "pre-populate" not in message


def test_fp16_on_cpu_is_refused_clearly(tiny_checkpoint: Path) -> None:
    # A bad setting (exit 2), not missing weights (exit 5).
    with pytest.raises(ConfigError, match="CLIPSEARCH_PRECISION: fp16 needs a CUDA device"):
        load_encoder(
            ModelSpec("clipsearch-tiny", str(tiny_checkpoint), device="cpu", precision="fp16")
        )


def test_encoder_from_settings_applies_torch_threads(tmp_path: Path, tiny_checkpoint: Path) -> None:
    from retrieval.config import load_settings
    from retrieval.models.encoder import encoder_from_settings

    before = torch.get_num_threads()
    try:
        settings = load_settings(
            data_dir=tmp_path,
            model="clipsearch-tiny",
            pretrained=str(tiny_checkpoint),
            device="cpu",
            torch_threads=1,
        )
        encoder = encoder_from_settings(settings)
        assert torch.get_num_threads() == 1
        direct = load_encoder(ModelSpec("clipsearch-tiny", str(tiny_checkpoint), device="cpu"))
        assert encoder.identity == direct.identity
    finally:
        torch.set_num_threads(before)


def test_a_missing_hub_tokenizer_fails_fast_with_instructions(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # SigLIP's text side reads a Hugging Face tokenizer; offline and uncached, transformers
    # would retry for half a minute and raise its own error.
    import retrieval.models.families.openclip as family

    monkeypatch.setattr(family, "host_resolves", lambda url, timeout=3.0: False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(WeightsUnavailable) as info:
        load_encoder(ModelSpec("ViT-B-16-SigLIP", "none", device="cpu"))
    message = str(info.value)
    assert "timm/ViT-B-16-SigLIP" in message
    assert "clipsearch models fetch ViT-B-16-SigLIP --pretrained none" in message
    assert "clipsearch models import FOLDER" in message


def test_family_prefixes_name_the_same_open_clip_model(
    encoder: Encoder, tiny_checkpoint: Path
) -> None:
    prefixed = load_encoder(
        ModelSpec("open_clip:clipsearch-tiny", str(tiny_checkpoint), device="cpu")
    )
    assert prefixed.identity.key == encoder.identity.key
    assert prefixed.identity.family == "open_clip"

"""The Chinese-CLIP family against cn_clip's own reference path, on the tiny bundled configs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cn_clip.clip import image_transform, tokenize
from cn_clip.clip.model import CLIP
from PIL import Image

from retrieval.errors import ConfigError, ModelMismatch, WeightsUnavailable
from retrieval.models.encoder import Encoder, load_encoder
from retrieval.models.families import chinese_clip
from retrieval.models.identity import ModelIdentity, ModelSpec
from retrieval.models.weights import sha256_file

TINY = "cn-clip:clipsearch-tiny-zh"
TINY_RN = "cn-clip:clipsearch-tiny-zh-rn"
TEXTS = [
    "一只在海滩上的狗",
    "红色的圆形",
    "a red circle",
    "a photo of a blue square on a wooden table",
    "x",
    "草地上的一只猫 and a dog",
]


def _model_info(name: str) -> dict[str, Any]:
    path = chinese_clip.CN_CLIP_CONFIG_DIR / f"{name.partition(':')[2]}.json"
    info: dict[str, Any] = json.loads(path.read_text())
    return info


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(64, 64), (120, 80), (33, 200), (300, 301)]
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    # Grey and RGBA images go through the transform's RGB conversion.
    return [*images, images[1].convert("L"), images[2].convert("RGBA")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """cn_clip's own model with seeded random weights, saved as cn_clip releases are saved:
    from DistributedDataParallel ("module." keys) with the BERT pooler cn_clip does not build."""
    torch.manual_seed(1234)
    model = CLIP(**_model_info(TINY))
    model.eval()
    state = {f"module.{key}": value for key, value in model.state_dict().items()}
    width = model.bert_config.hidden_size
    state["module.bert.pooler.dense.weight"] = torch.zeros(width, width)
    state["module.bert.pooler.dense.bias"] = torch.zeros(width)
    path = tmp_path_factory.mktemp("cn-clip") / "tiny-zh.pt"
    torch.save({"epoch": 1, "step": 10, "name": "tiny", "state_dict": state}, path)
    return path, model


@pytest.fixture(scope="module")
def zh_encoder(reference: tuple[Path, Any]) -> Encoder:
    return load_encoder(ModelSpec(TINY, str(reference[0]), device="cpu"))


@pytest.fixture(scope="module")
def random_encoder() -> Encoder:
    return load_encoder(ModelSpec(TINY, "none", device="cpu"))


def _normalised(features: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(features, dim=-1).numpy()


def test_image_embeddings_match_cn_clip_reference(
    zh_encoder: Encoder, reference: tuple[Path, Any]
) -> None:
    model = reference[1]
    transform = image_transform(64)
    images = _images()
    with torch.no_grad():
        expected = _normalised(model.encode_image(torch.stack([transform(im) for im in images])))
    ours = zh_encoder.encode_images(images)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_text_embeddings_match_cn_clip_reference(
    zh_encoder: Encoder, reference: tuple[Path, Any]
) -> None:
    with torch.no_grad():
        expected = _normalised(reference[1].encode_text(tokenize(TEXTS)))
    np.testing.assert_allclose(zh_encoder.encode_texts(TEXTS, trim=False), expected, atol=1e-5)
    np.testing.assert_allclose(zh_encoder.encode_texts(TEXTS), expected, atol=1e-5)
    # Chinese texts are tokenized per character, as cn_clip does, not into [UNK]s.
    assert torch.equal(zh_encoder.tokenize(TEXTS).ids, tokenize(TEXTS))


def test_trimmed_text_equals_full_context(zh_encoder: Encoder) -> None:
    assert zh_encoder.backend.trims_exactly()
    texts = [*TEXTS, "很长的句子" * 20]  # one text fills the whole context of 52
    assert (zh_encoder.tokenize(TEXTS).ids != 0).sum(dim=1).max() < 20  # the trim cuts a lot
    trimmed = zh_encoder.encode_texts(texts, trim=True)
    full = zh_encoder.encode_texts(texts, trim=False)
    np.testing.assert_allclose(trimmed, full, atol=1e-6)
    # one at a time, too: each query is trimmed to its own length
    for text, row in zip(texts, full, strict=True):
        np.testing.assert_allclose(zh_encoder.encode_texts([text])[0], row, atol=1e-6)


def test_half_precision_is_cn_clips_own(reference: tuple[Path, Any]) -> None:
    # The CUDA path (precision fp16), run on CPU: cn_clip's convert_weights, then our encoder.
    spec = ModelSpec(TINY, str(reference[0]))
    full = Encoder(chinese_clip.load(spec, "cpu", "fp32"), "cpu", torch.float32)
    half = Encoder(chinese_clip.load(spec, "cpu", "fp16"), "cpu", torch.float16)
    assert half.model.get_parameter("bert.embeddings.word_embeddings.weight").dtype == torch.float16
    np.testing.assert_allclose(half.encode_texts(TEXTS), full.encode_texts(TEXTS), atol=2e-3)
    np.testing.assert_allclose(
        half.encode_images(_images()), full.encode_images(_images()), atol=2e-3
    )
    np.testing.assert_allclose(
        half.encode_texts(TEXTS, trim=True), half.encode_texts(TEXTS, trim=False), atol=1e-6
    )
    assert half.identity == full.identity


def test_identity_names_the_family_tokenizer_and_weights(
    zh_encoder: Encoder, reference: tuple[Path, Any]
) -> None:
    identity = zh_encoder.identity
    assert identity.name == "cn_clip:clipsearch-tiny-zh"
    assert identity.family == "cn_clip"
    assert identity.tokenizer.startswith("cn_clip-bert-vocab:")
    assert (identity.dim, identity.image_size) == (64, 64)
    normalize = image_transform(64).transforms[-1]
    assert identity.mean == tuple(normalize.mean) and identity.std == tuple(normalize.std)
    assert identity.weights_sha256 == sha256_file(reference[0])
    assert ModelIdentity.from_dict(identity.to_dict()) == identity


def test_spellings_of_the_family_are_one_model(
    zh_encoder: Encoder, reference: tuple[Path, Any]
) -> None:
    for name in ("chinese-clip:clipsearch-tiny-zh", "cn_clip:clipsearch-tiny-zh"):
        other = load_encoder(ModelSpec(name, str(reference[0]), device="cpu"))
        assert other.identity == zh_encoder.identity
        assert other.identity.key == zh_encoder.identity.key


def test_an_open_clip_index_is_refused(zh_encoder: Encoder, encoder: Encoder) -> None:
    assert zh_encoder.identity.key != encoder.identity.key
    with pytest.raises(ModelMismatch):
        zh_encoder.identity.require_same(encoder.identity)
    with pytest.raises(ModelMismatch):
        encoder.identity.require_same(zh_encoder.identity)


def test_score_rule_and_towers(zh_encoder: Encoder) -> None:
    rule = zh_encoder.score_rule
    assert not rule.is_sigmoid
    assert rule.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)  # cn_clip's initial scale
    towers: dict[str, list[str]] = {"image": [], "text": [], "shared": []}
    for name, _ in zh_encoder.model.named_parameters():
        towers[zh_encoder.backend.tower(name)].append(name)
    assert towers["shared"] == ["logit_scale"]
    assert all(name.startswith("visual.") for name in towers["image"]) and towers["image"]
    assert "text_projection" in towers["text"]
    assert all(name.startswith(("bert.", "text_projection")) for name in towers["text"])


def test_random_weights_are_seeded(random_encoder: Encoder) -> None:
    again = load_encoder(ModelSpec(TINY, "random", device="cpu"))
    np.testing.assert_array_equal(again.encode_texts(TEXTS), random_encoder.encode_texts(TEXTS))
    assert random_encoder.identity.weights_sha256 == "random-init-seed0"
    other_seed = load_encoder(ModelSpec(TINY, "none", device="cpu", seed=1))
    assert other_seed.identity.key != random_encoder.identity.key
    assert not np.allclose(other_seed.encode_texts(TEXTS), random_encoder.encode_texts(TEXTS))


def test_a_fine_tuned_checkpoint_loads_back(random_encoder: Encoder, tmp_path: Path) -> None:
    # As retrieval.training.finetune saves it: the backend's checkpoint_state in float32 on CPU.
    state = {
        key: value.detach().to("cpu", torch.float32).clone()
        for key, value in random_encoder.backend.checkpoint_state().items()
    }
    state["logit_scale"] = torch.tensor(3.0)  # a change that shows the file was read
    path = tmp_path / "tuned.pt"
    meta = {"model": TINY, "started_from": "none", "steps": 1}
    torch.save({"state_dict": state, "clipsearch": meta}, path)
    tuned = load_encoder(ModelSpec(TINY, str(path), device="cpu"))
    np.testing.assert_allclose(
        tuned.encode_texts(TEXTS), random_encoder.encode_texts(TEXTS), atol=1e-6
    )
    images = _images()
    np.testing.assert_allclose(
        tuned.encode_images(images), random_encoder.encode_images(images), atol=1e-6
    )
    assert tuned.logit_scale == pytest.approx(float(np.exp(3.0)), rel=1e-6)
    assert tuned.identity.key != random_encoder.identity.key


def test_a_config_of_your_own(tmp_path: Path) -> None:
    info = _model_info(TINY) | {"embed_dim": 32}
    (tmp_path / "cn_clip").mkdir()
    (tmp_path / "cn_clip" / "my-zh.json").write_text(json.dumps(info))
    encoder = load_encoder(ModelSpec("cn-clip:my-zh", "none", device="cpu", config_dir=tmp_path))
    assert encoder.encode_texts(["你好"]).shape == (1, 32)
    # An open_clip config in the same folder is not mistaken for a Chinese-CLIP one.
    (tmp_path / "oc.json").write_text(json.dumps({"embed_dim": 8, "vision_cfg": {}}))
    with pytest.raises(ConfigError, match="open_clip config"):
        load_encoder(ModelSpec("cn-clip:oc", "none", device="cpu", config_dir=tmp_path))
    (tmp_path / "bad.json").write_text(json.dumps(info | {"text_width": 3}))
    with pytest.raises(ConfigError, match="text_width"):
        load_encoder(ModelSpec("cn-clip:bad", "none", device="cpu", config_dir=tmp_path))


# --- errors -------------------------------------------------------------------------------


def test_unknown_model_name_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as info:
        load_encoder(ModelSpec("cn-clip:ViT-Nope", "none", device="cpu"))
    message = str(info.value)
    assert "CLIPSEARCH_MODEL" in message
    assert "ViT-B-16" in message and "clipsearch-tiny-zh" in message


def test_missing_checkpoint_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailable) as info:
        load_encoder(ModelSpec(TINY, str(tmp_path / "nope.pt"), device="cpu"))
    assert "does not exist" in str(info.value)
    assert "CLIPSEARCH_PRETRAINED" in str(info.value)


def test_a_file_that_is_no_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "notes.pt"
    path.write_text("not weights")
    with pytest.raises(WeightsUnavailable, match="not a readable checkpoint"):
        load_encoder(ModelSpec(TINY, str(path), device="cpu"))


def test_an_open_clip_checkpoint_is_another_architecture(tiny_checkpoint: Path) -> None:
    with pytest.raises(WeightsUnavailable) as info:
        load_encoder(ModelSpec(TINY, str(tiny_checkpoint), device="cpu"))
    assert "another architecture" in str(info.value)
    assert "CLIPSEARCH_PRETRAINED" in str(info.value)


def test_a_resnet_checkpoint_loaded_as_the_vit_model(tmp_path: Path) -> None:
    resnet = load_encoder(ModelSpec(TINY_RN, "none", device="cpu"))
    path = tmp_path / "rn.pt"
    meta = {"model": TINY_RN, "started_from": "none", "steps": 1}
    torch.save({"state_dict": resnet.backend.checkpoint_state(), "clipsearch": meta}, path)
    with pytest.raises(WeightsUnavailable) as info:
        load_encoder(ModelSpec(TINY, str(path), device="cpu"))
    message = str(info.value)
    assert "another architecture" in message and "visual." in message
    assert f"fine-tuned from {TINY_RN}" in message


def test_an_uncached_release_names_the_file_and_the_repo(tmp_path: Path) -> None:
    spec = ModelSpec("cn-clip:ViT-B-16", "clip_cn_vit-b-16.pt", device="cpu", cache_dir=tmp_path)
    with pytest.raises(WeightsUnavailable) as info:
        load_encoder(spec)
    message = str(info.value)
    assert "clip_cn_vit-b-16.pt" in message
    assert "OFA-Sys/chinese-clip-vit-base-patch16" in message
    assert "CLIPSEARCH_PRETRAINED" in message and str(tmp_path) in message
    assert "about 753 MB" in message and "sha256 not recorded" in message
    assert "clipsearch models fetch cn-clip:ViT-B-16" in message
    assert "clipsearch models import FILE --name cn-clip:ViT-B-16" in message


def test_a_cached_release_is_found(tmp_path: Path) -> None:
    (tmp_path / "clip_cn_rn50.pt").write_bytes(b"")
    spec = ModelSpec("cn-clip:RN50", "clip_cn_rn50", device="cpu", cache_dir=tmp_path)
    config = chinese_clip.model_config("RN50")
    assert config.model_info["vision_layers"] == [3, 4, 6, 3]
    assert chinese_clip.resolve_checkpoint(spec, config) == tmp_path / "clip_cn_rn50.pt"


def test_the_default_pretrained_tag_means_the_models_own_release(tmp_path: Path) -> None:
    # CLIPSEARCH_MODEL=cn-clip:RN50 alone (CLIPSEARCH_PRETRAINED left at open_clip's default
    # tag) loads cn-clip:RN50's released file, or names it when it is missing.
    from retrieval.config import Settings

    default = Settings.model_fields["pretrained"].default
    config = chinese_clip.model_config("RN50")
    spec = ModelSpec("cn-clip:RN50", default, device="cpu", cache_dir=tmp_path)
    with pytest.raises(WeightsUnavailable, match="clip_cn_rn50.pt"):
        chinese_clip.resolve_checkpoint(spec, config)
    (tmp_path / "clip_cn_rn50.pt").write_bytes(b"")
    assert chinese_clip.resolve_checkpoint(spec, config) == tmp_path / "clip_cn_rn50.pt"
    # A tiny config of one's own has no release: the tag is still refused, clearly.
    with pytest.raises(WeightsUnavailable, match="neither an existing file"):
        load_encoder(ModelSpec(TINY, default, device="cpu"))


def test_the_release_of_another_model_is_refused() -> None:
    with pytest.raises(WeightsUnavailable, match="set CLIPSEARCH_MODEL=cn-clip:RN50"):
        load_encoder(ModelSpec("cn-clip:ViT-B-16", "clip_cn_rn50.pt", device="cpu"))


def test_bf16_is_refused_clearly() -> None:
    with pytest.raises(ConfigError, match="CLIPSEARCH_PRECISION"):
        chinese_clip.load(ModelSpec(TINY, "none"), "cpu", "bf16")

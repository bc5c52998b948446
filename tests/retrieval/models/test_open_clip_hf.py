"""open_clip's models with Hugging Face text sides (multilingual XLM-R / NLLB towers, SigLIP)
against open_clip's own reference path: tiny towers, a local tokenizer folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pytest
import torch

from retrieval.models.encoder import Encoder, load_encoder
from retrieval.models.identity import ModelSpec
from tests.fixtures.open_clip_hf import NLLB, SIGLIP, XLMR, write_configs
from tests.retrieval.models.test_encoder import TEXTS, _images

MODELS = [XLMR, NLLB, SIGLIP]
MIXED = [*TEXTS, "一只在海滩上的狗", "红色的圆形 next to 蓝色的正方形", ""]


@pytest.fixture(scope="module")
def configs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_configs(tmp_path_factory.mktemp("open-clip-hf"))


@pytest.fixture(scope="module")
def checkpoints(configs: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each model's seeded random weights saved as a checkpoint file, so that the product and
    the reference load the very same weights."""
    folder = tmp_path_factory.mktemp("open-clip-hf-weights")
    paths = {}
    for n, name in enumerate(MODELS):
        model = load_encoder(
            ModelSpec(name, "none", device="cpu", config_dir=configs, seed=n)
        ).model
        paths[name] = folder / f"{name}.pt"
        torch.save({"state_dict": model.state_dict()}, paths[name])
    return paths


def _ours(name: str, configs: Path, checkpoints: dict[str, Path]) -> Encoder:
    return load_encoder(ModelSpec(name, str(checkpoints[name]), device="cpu", config_dir=configs))


def _reference(name: str, checkpoints: dict[str, Path]) -> tuple[Any, Any]:
    model, _, preprocess = open_clip.create_model_and_transforms(
        name, pretrained=str(checkpoints[name]), pretrained_text=False
    )
    return model.eval(), preprocess


@pytest.mark.parametrize("name", MODELS)
def test_embeddings_match_open_clip_reference(
    name: str, configs: Path, checkpoints: dict[str, Path]
) -> None:
    ours = _ours(name, configs, checkpoints)
    model, preprocess = _reference(name, checkpoints)
    tokenizer = open_clip.get_tokenizer(name)
    images = _images()
    with torch.no_grad():
        image_ref = model.encode_image(torch.stack([preprocess(im) for im in images]))
        text_ref = model.encode_text(tokenizer(MIXED))
    image_ref = torch.nn.functional.normalize(image_ref, dim=-1).numpy()
    text_ref = torch.nn.functional.normalize(text_ref, dim=-1).numpy()
    np.testing.assert_allclose(ours.encode_images(images), image_ref, atol=1e-5)
    np.testing.assert_allclose(ours.encode_texts(MIXED, trim=False), text_ref, atol=1e-5)
    np.testing.assert_allclose(ours.encode_texts(MIXED), text_ref, atol=1e-5)


@pytest.mark.parametrize("name", [XLMR, NLLB])
def test_masked_hf_towers_are_trimmed_exactly(
    name: str, configs: Path, checkpoints: dict[str, Path]
) -> None:
    encoder = _ours(name, configs, checkpoints)
    assert encoder.backend.trims_exactly()
    full = encoder.encode_texts(MIXED, trim=False)
    np.testing.assert_allclose(encoder.encode_texts(MIXED, trim=True), full, atol=1e-6)
    for text, row in zip(MIXED, full, strict=True):  # each query trimmed to its own length
        np.testing.assert_allclose(encoder.encode_texts([text])[0], row, atol=1e-6)
    # and trimming really runs fewer positions: the shortest query is 3 tokens of 16
    assert encoder.backend.trimmed(encoder.tokenize(["x"])).ids.shape[1] == 3


def test_siglip_is_encoded_in_full_because_trimming_would_change_it(
    configs: Path, checkpoints: dict[str, Path]
) -> None:
    encoder = _ours(SIGLIP, configs, checkpoints)
    assert not encoder.backend.trims_exactly()
    np.testing.assert_array_equal(
        encoder.encode_texts(MIXED, trim=True), encoder.encode_texts(MIXED, trim=False)
    )
    # The tower attends to its padding and pools the last position: cutting the padding off
    # gives other features, so the encoder must not.
    tokens = encoder.tokenize(["a red circle"]).ids
    with torch.no_grad():
        full = encoder.model.encode_text(tokens)  # type: ignore[operator]
        cut = encoder.model.encode_text(tokens[:, :6])  # type: ignore[operator]
    assert (full - cut).abs().max().item() > 1e-3


def test_siglip_scores_with_its_sigmoid(configs: Path, checkpoints: dict[str, Path]) -> None:
    rule = _ours(SIGLIP, configs, checkpoints).score_rule
    assert rule.is_sigmoid and rule.logit_bias == pytest.approx(-10.0)
    assert not _ours(XLMR, configs, checkpoints).score_rule.is_sigmoid


def test_random_weights_never_fetch_the_text_towers_base_weights(configs: Path) -> None:
    # The tower's config folder holds no weights: loading with pretrained "none" must build the
    # tower at random, not ask transformers for its pretrained weights (a download, offline).
    encoder = load_encoder(ModelSpec(XLMR, "none", device="cpu", config_dir=configs))
    assert encoder.identity.weights_sha256 == "random-init-seed0"


def test_identity_names_a_local_tokenizer_by_its_files(
    configs: Path, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    encoder = _ours(XLMR, configs, checkpoints)
    assert encoder.identity.family == "open_clip"
    assert encoder.identity.tokenizer.startswith("BertTokenizer")
    # The same config names another tokenizer folder, whose vocabulary differs: another model.
    root = configs.parent
    other = tmp_path / "root"
    shutil.copytree(root, other)
    vocab = other / "tokenizer" / "vocab.txt"
    lines = vocab.read_text(encoding="utf-8").splitlines()
    lines[1000], lines[1001] = lines[1001], lines[1000]
    vocab.write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = other / "open_clip" / f"{XLMR}.json"
    config.write_text(config.read_text().replace(str(root), str(other)))
    renamed = other / "open_clip" / "clipsearch-tiny-xlmr-b.json"
    config.rename(renamed)
    changed = load_encoder(
        ModelSpec(renamed.stem, str(checkpoints[XLMR]), device="cpu", config_dir=renamed.parent)
    )
    assert changed.identity.tokenizer != encoder.identity.tokenizer
    assert changed.identity.key != encoder.identity.key


@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_a_config_whose_tokenizer_is_missing_is_a_clear_error(
    folder: str, configs: Path, tmp_path: Path
) -> None:
    from retrieval.errors import WeightsUnavailable

    tokenizer = tmp_path / "tokenizer"
    if folder == "empty":
        tokenizer.mkdir()
    lost = tmp_path / "configs"
    lost.mkdir()
    config = (configs / f"{SIGLIP}.json").read_text()
    (lost / "clipsearch-tiny-siglip-lost.json").write_text(
        config.replace(str(configs.parent / "tokenizer"), str(tokenizer))
    )
    with pytest.raises(WeightsUnavailable) as info:
        load_encoder(
            ModelSpec("clipsearch-tiny-siglip-lost", "none", device="cpu", config_dir=lost)
        )
    message = str(info.value)
    assert str(tokenizer) in message and "Traceback" not in message
    assert ("does not exist" if folder == "missing" else "save_pretrained") in message


def test_two_config_dirs_with_one_name_each_load_their_own(configs: Path, tmp_path: Path) -> None:
    # open_clip's registry is one a process: the directory asked for must win the name.
    other = tmp_path / "configs"
    other.mkdir()
    config = json.loads((configs / f"{XLMR}.json").read_text())
    config["embed_dim"] = 24
    (other / f"{XLMR}.json").write_text(json.dumps(config))
    assert load_encoder(ModelSpec(XLMR, "none", device="cpu", config_dir=other)).dim == 24
    assert load_encoder(ModelSpec(XLMR, "none", device="cpu", config_dir=configs)).dim == 16
    assert load_encoder(ModelSpec(XLMR, "none", device="cpu", config_dir=other)).dim == 24

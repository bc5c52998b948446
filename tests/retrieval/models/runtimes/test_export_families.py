"""Every family the encoder loads exports to ONNX, and ONNX Runtime gives torch's embeddings
(within 1e-5, unit vectors) for images and for full and trimmed texts, at any batch size."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from retrieval.models.encoder import load_encoder
from retrieval.models.identity import ModelSpec
from retrieval.models.runtimes.onnx_runner import OnnxRuntime
from retrieval.models.runtimes.onnx_store import export_folder, read_manifest
from tests.conftest import FamilyModel
from tests.fixtures.hf_models import write_tiny_chinese_clip
from tests.fixtures.open_clip_hf import NLLB
from tests.retrieval.models.runtimes.conftest import load

pytestmark = pytest.mark.slow  # an export of each family: a few seconds each

TOLERANCE = 1e-5
# Lengths differ, so that trimming gives each batch its own number of columns; Chinese too.
TEXTS = ["a red circle", "一只猫坐在窗台上", "a blue square next to a small green triangle", "x"]
FAMILIES = [
    "open_clip",
    "open_clip-xlmr",
    "open_clip-nllb",
    "open_clip-siglip",
    "open_clip-finetuned",
    "cn_clip",
    "hf",
    "hf-chinese_clip",
    "hf-siglip",
]


@pytest.fixture(scope="module")
def models(
    family_models: dict[str, FamilyModel], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, ModelSpec]:
    from retrieval.training.shapes_model import SHAPES_MODEL, train_shapes_model

    specs = {name: model.spec() for name, model in family_models.items()}
    xlmr = family_models["open_clip-xlmr"]
    specs["open_clip-nllb"] = FamilyModel("open_clip", NLLB, "none", xlmr.config_dir).spec()
    folder = write_tiny_chinese_clip(tmp_path_factory.mktemp("hf") / "tiny-chinese-clip")
    specs["hf-chinese_clip"] = ModelSpec(f"hf:{folder}", "", device="cpu")
    # What `clipsearch finetune` writes (a few steps: the file's format is what matters), of
    # the demo's model (a ResNet image tower).
    work = tmp_path_factory.mktemp("finetuned")
    trained = train_shapes_model(
        work, work / "tiny-finetuned.pt", steps=2, train_images=48, progress=False
    )
    specs["open_clip-finetuned"] = ModelSpec(SHAPES_MODEL, str(trained.checkpoint), "cpu")
    return specs


@pytest.mark.parametrize("family", FAMILIES)
def test_an_export_gives_torchs_embeddings(
    family: str, models: dict[str, ModelSpec], tmp_path: Path
) -> None:
    spec = models[family]
    reference = load_encoder(spec)
    exported = load(spec, tmp_path)
    assert isinstance(exported.runtimes.image, OnnxRuntime)
    assert exported.runtimes.text is exported.runtimes.image
    assert exported.identity == reference.identity

    size = reference.identity.image_size
    pixels = torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(3))
    for batch in (pixels, pixels[:1]):  # another batch size than the export traced
        np.testing.assert_allclose(
            exported.encode_image_tensors(batch),
            reference.encode_image_tensors(batch),
            atol=TOLERANCE,
        )
    for texts in (TEXTS, TEXTS[:1], TEXTS[3:]):
        for trim in (False, True):
            np.testing.assert_allclose(
                exported.encode_texts(texts, trim=trim),
                reference.encode_texts(texts, trim=trim),
                atol=TOLERANCE,
            )
    # A trimmed query really runs fewer columns in ONNX Runtime, where the family trims.
    tokens = reference.tokenize(["x"])
    if reference.backend.trims_exactly():
        assert reference.backend.trimmed(tokens).ids.shape[1] < tokens.ids.shape[1]

    manifest = read_manifest(export_folder(reference.identity, tmp_path))
    assert manifest is not None and manifest.identity == reference.identity
    for tower in manifest.towers.values():
        assert tower.graphs["fp32"].max_abs_diff <= TOLERANCE


def test_a_model_in_half_precision_is_exported_from_fp32_weights(
    models: dict[str, ModelSpec], tmp_path: Path
) -> None:
    spec = replace(models["open_clip"], precision="bf16")
    from retrieval.models.runtimes.choice import ensure_export

    bf16 = load_encoder(spec)
    ensure_export(replace(spec, cache_dir=tmp_path), bf16.backend, rebuild_corrupt=False)
    fp32 = load(models["open_clip"], tmp_path)  # the export above, not a new one
    np.testing.assert_allclose(
        fp32.encode_texts(TEXTS), load_encoder(models["open_clip"]).encode_texts(TEXTS), atol=1e-5
    )

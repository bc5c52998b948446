"""The hf family (`hf:FOLDER`) against transformers' own reference path, on tiny random folders."""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

from retrieval.errors import ConfigError, ModelMismatch, WeightsUnavailable
from retrieval.labels.scoring import ClassEmbeddings, score_block
from retrieval.models.encoder import Encoder, load_encoder
from retrieval.models.identity import CN_CLIP, HF, OPEN_CLIP, ModelSpec
from retrieval.models.weights import sha256_file
from tests.fixtures.hf_models import CONTEXT, IMAGE_SIZE, WRITERS

KINDS = list(WRITERS)
TRIMMING = ["clip", "chinese_clip"]
TEXTS = [
    "a red circle",
    "a photo of a blue square on a wooden table",
    "x",
    "红色的圆形",
    "",
    "a very long caption that goes on and on " * 12,  # longer than every context
]


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(64, 64), (120, 80), (33, 200), (31, 17)]
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def _spec(folder: Path, pretrained: str = "", **kw: Any) -> ModelSpec:
    return ModelSpec(f"hf:{folder}", pretrained, device="cpu", **kw)


def _normalised(features: Any) -> np.ndarray:
    tensor = features if isinstance(features, torch.Tensor) else features.pooler_output
    return torch.nn.functional.normalize(tensor, dim=-1).numpy()


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {kind: write(root / kind) for kind, write in WRITERS.items()}


@pytest.fixture(scope="module")
def encoders(folders: dict[str, Path]) -> dict[str, Encoder]:
    return {kind: load_encoder(_spec(folder)) for kind, folder in folders.items()}


@pytest.fixture
def copy_of(folders: dict[str, Path], tmp_path: Path) -> Iterator[Any]:
    def copy(kind: str, name: str = "copy") -> Path:
        return Path(shutil.copytree(folders[kind], tmp_path / name))

    yield copy


# --- fidelity -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_image_embeddings_match_transformers(
    kind: str, folders: dict[str, Path], encoders: dict[str, Encoder]
) -> None:
    model = AutoModel.from_pretrained(folders[kind]).eval()
    processor = AutoImageProcessor.from_pretrained(folders[kind])
    images = _images()
    with torch.no_grad():
        reference = _normalised(model.get_image_features(**processor(images, return_tensors="pt")))
    ours = encoders[kind].encode_images(images)
    assert ours.dtype == np.float32 and ours.shape == reference.shape
    np.testing.assert_allclose(ours, reference, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_text_embeddings_match_transformers(
    kind: str, folders: dict[str, Path], encoders: dict[str, Encoder]
) -> None:
    model = AutoModel.from_pretrained(folders[kind]).eval()
    tokenizer = AutoTokenizer.from_pretrained(folders[kind])
    assert encoders[kind].backend.context_length == CONTEXT[kind]  # type: ignore[attr-defined]
    tokens = tokenizer(
        TEXTS, padding="max_length", max_length=CONTEXT[kind], truncation=True, return_tensors="pt"
    )
    if kind == "siglip":
        # SigLIP's text tower was trained without a padding mask (big_vision, open_clip), so
        # neither clipsearch nor this reference gives it one.
        tokens = {"input_ids": tokens["input_ids"]}
    with torch.no_grad():
        reference = _normalised(model.get_text_features(**tokens))
    np.testing.assert_allclose(encoders[kind].encode_texts(TEXTS), reference, atol=1e-5)


@pytest.mark.parametrize("kind", TRIMMING)
def test_trimmed_text_equals_full_context(kind: str, encoders: dict[str, Encoder]) -> None:
    encoder = encoders[kind]
    assert encoder.backend.trims_exactly()
    lengths: list[int] = []
    model: Any = encoder.model
    hook = model.text_model.embeddings.register_forward_hook(
        lambda module, args, output: lengths.append(int(output.shape[1]))
    )
    try:
        short = TEXTS[:4]
        trimmed = encoder.encode_texts(short, trim=True)
        full = encoder.encode_texts(short, trim=False)
    finally:
        hook.remove()
    assert lengths[0] < lengths[1] == CONTEXT[kind]  # the trimmed run was shorter
    np.testing.assert_allclose(trimmed, full, atol=1e-6)
    for text, row in zip(short, full, strict=True):  # each text alone: its own length
        np.testing.assert_allclose(encoder.encode_texts([text])[0], row, atol=1e-6)


def test_siglip_encodes_in_full_and_scores_with_sigmoids(
    folders: dict[str, Path], encoders: dict[str, Encoder]
) -> None:
    encoder = encoders["siglip"]
    assert not encoder.backend.trims_exactly()
    rule = encoder.score_rule
    assert rule.is_sigmoid and rule.logit_bias == pytest.approx(-10.0)
    assert rule.logit_scale == pytest.approx(10.0)
    labels = ["a red circle", "a blue square", "红色的圆形"]
    classes = ClassEmbeddings(encoder.encode_texts(labels), rule.logit_scale, rule.logit_bias)
    images = _images()
    scored = score_block(encoder.encode_images(images), classes, top_k=len(labels))
    # The model's own probabilities: sigmoid of its logits, each label on its own.
    model = AutoModel.from_pretrained(folders["siglip"]).eval()
    processor = AutoImageProcessor.from_pretrained(folders["siglip"])
    tokens = AutoTokenizer.from_pretrained(folders["siglip"])(
        labels, padding="max_length", max_length=CONTEXT["siglip"], return_tensors="pt"
    )
    with torch.no_grad():
        out = model(input_ids=tokens["input_ids"], **processor(images, return_tensors="pt"))
    expected = torch.sigmoid(out.logits_per_image).numpy()
    ours = np.take_along_axis(expected, scored.labels, axis=1)
    np.testing.assert_allclose(scored.scores, ours, atol=1e-5)


# --- identity -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_identity_describes_the_model_not_the_folder(
    kind: str, folders: dict[str, Path], encoders: dict[str, Encoder]
) -> None:
    identity = encoders[kind].identity
    assert identity.family == HF
    assert identity.name.startswith(f"hf:{kind}:")
    assert identity.pretrained == "folder"
    assert identity.weights_sha256 == sha256_file(folders[kind] / "model.safetensors")
    assert identity.image_size == IMAGE_SIZE
    assert identity.tokenizer.split(":")[0].endswith(f"/{CONTEXT[kind]}")
    # The folder is only where the model was loaded from (so reading commands can load it
    # again), never part of what identifies it.
    described = {key: value for key, value in identity.to_dict().items() if key != "source"}
    assert str(folders[kind]) not in json.dumps(described)
    assert identity.source is not None
    assert identity.source.model == f"hf:{folders[kind].resolve()}"
    assert type(identity).from_dict(identity.to_dict()) == identity


def test_a_moved_or_copied_folder_is_the_same_model(
    folders: dict[str, Path], encoders: dict[str, Encoder], tmp_path: Path
) -> None:
    copy = Path(shutil.copytree(folders["clip"], tmp_path / "copied" / "another-name"))
    moved = tmp_path / "moved"
    shutil.move(str(copy), moved)
    other = load_encoder(_spec(moved))
    assert other.identity.key == encoders["clip"].identity.key
    other.identity.require_same(encoders["clip"].identity)


def test_identity_differs_between_families_and_models(encoders: dict[str, Encoder]) -> None:
    identity = encoders["chinese_clip"].identity
    keys = {encoder.identity.key for encoder in encoders.values()}
    assert len(keys) == len(encoders)
    for family in (OPEN_CLIP, CN_CLIP):
        other = replace(identity, family=family)
        assert other.key != identity.key
        with pytest.raises(ModelMismatch, match="re-index"):
            identity.require_same(other)


def test_an_open_clip_tag_means_the_folders_weights(
    folders: dict[str, Path], encoders: dict[str, Encoder]
) -> None:
    # The default CLIPSEARCH_PRETRAINED is an open_clip tag; it must not stop an hf model.
    tagged = load_encoder(_spec(folders["clip"], "laion2b_s34b_b79k"))
    assert tagged.identity == encoders["clip"].identity


def test_random_weights_are_seeded_and_another_model(
    folders: dict[str, Path], encoders: dict[str, Encoder]
) -> None:
    first, second = (load_encoder(_spec(folders["clip"], "none")) for _ in range(2))
    assert first.identity.weights_sha256 == "random-init-seed0"
    assert first.identity.key == second.identity.key != encoders["clip"].identity.key
    images = _images()
    np.testing.assert_array_equal(first.encode_images(images), second.encode_images(images))


def test_a_hub_id_loads_from_the_local_cache(
    folders: dict[str, Path], encoders: dict[str, Encoder], tmp_path: Path
) -> None:
    # The hub cache's layout: a snapshot per commit, and refs/main naming the current one.
    repo = tmp_path / "hub" / "models--clipsearch--tiny-clip"
    shutil.copytree(folders["clip"], repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    spec = ModelSpec("hf:clipsearch/tiny-clip", "", device="cpu", cache_dir=tmp_path / "hub")
    assert load_encoder(spec).identity.key == encoders["clip"].identity.key


# --- fine-tuning ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_every_parameter_belongs_to_a_tower(kind: str, encoders: dict[str, Encoder]) -> None:
    backend = encoders[kind].backend
    towers = {name: backend.tower(name) for name, _ in backend.model.named_parameters()}
    assert set(towers.values()) == {"image", "text", "shared"}
    assert towers["logit_scale"] == "shared"
    assert backend.logit_scale_parameter() is backend.model.logit_scale


def test_a_fine_tuned_checkpoint_loads_back(
    folders: dict[str, Path], encoders: dict[str, Encoder], tmp_path: Path
) -> None:
    tuned = load_encoder(_spec(folders["clip"]))
    model: Any = tuned.model
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a stand-in for a training run: weights that differ from the folder's
        weight = model.visual_projection.weight
        weight.add_(0.5 * torch.randn(weight.shape, generator=generator))
    path = tmp_path / "tuned.pt"
    state = {
        k: v.detach().to("cpu", torch.float32) for k, v in tuned.backend.checkpoint_state().items()
    }
    torch.save({"state_dict": state, "clipsearch": {}}, path)  # as finetune saves it

    loaded = load_encoder(_spec(folders["clip"], str(path)))
    images = _images()
    np.testing.assert_allclose(loaded.encode_images(images), tuned.encode_images(images), atol=1e-6)
    np.testing.assert_allclose(loaded.encode_texts(TEXTS), tuned.encode_texts(TEXTS), atol=1e-6)
    assert not np.allclose(loaded.encode_images(images), encoders["clip"].encode_images(images))
    assert loaded.identity.weights_sha256 == sha256_file(path)
    assert loaded.identity.pretrained == str(path)
    assert loaded.identity.key != encoders["clip"].identity.key


# --- errors ---------------------------------------------------------------------------------


def _refused(spec: ModelSpec) -> str:
    with pytest.raises(WeightsUnavailable) as info:
        load_encoder(spec)
    return str(info.value)


def test_an_uncached_hub_id_says_how_to_get_it(tmp_path: Path) -> None:
    message = _refused(ModelSpec("hf:org/no-such-model", "", device="cpu", cache_dir=tmp_path))
    assert "never downloads" in message and "the Hugging Face repo org/no-such-model" in message
    assert "clipsearch models fetch hf:org/no-such-model" in message
    assert "clipsearch models import FOLDER" in message


def test_a_folder_without_config_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    message = _refused(_spec(tmp_path))
    assert str(tmp_path) in message and "no config.json" in message


def test_a_config_of_another_model_type_names_the_supported_ones(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    message = _refused(_spec(tmp_path))
    assert "'bert'" in message and "clip, chinese_clip, siglip" in message


def test_a_missing_vocabulary_names_the_files(copy_of: Any) -> None:
    folder = copy_of("chinese_clip")
    (folder / "tokenizer.json").unlink()
    message = _refused(_spec(folder))
    assert str(folder) in message and "tokenizer.json" in message and "vocab.txt" in message


def test_a_tokenizer_needing_a_missing_package_names_it(copy_of: Any) -> None:
    if importlib.util.find_spec("sentencepiece") is not None:
        pytest.skip("sentencepiece is installed")
    # Real SigLIP folders carry a SentencePiece model (spiece.model) and no tokenizer.json.
    folder = copy_of("siglip")
    (folder / "tokenizer.json").unlink()
    (folder / "spiece.model").write_bytes(b"not read: the package is missing first")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="SiglipTokenizer", backend="sentencepiece")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="SentencePiece.*pip install sentencepiece"):
        load_encoder(_spec(folder))


def test_missing_weights_say_what_to_do(copy_of: Any) -> None:
    folder = copy_of("clip")
    (folder / "model.safetensors").unlink()
    message = _refused(_spec(folder))
    assert str(folder) in message and "model.safetensors" in message
    assert "CLIPSEARCH_PRETRAINED" in message


def test_a_missing_image_processor_names_its_file(copy_of: Any) -> None:
    folder = copy_of("siglip")
    (folder / "preprocessor_config.json").unlink()
    assert "preprocessor_config.json" in _refused(_spec(folder))


def test_weights_of_another_shape_are_refused(copy_of: Any) -> None:
    folder = copy_of("clip")
    config = json.loads((folder / "config.json").read_text())
    config["projection_dim"] = 8
    (folder / "config.json").write_text(json.dumps(config))
    message = _refused(_spec(folder))
    assert "another architecture" in message and "visual_projection.weight" in message


def test_weights_missing_tensors_are_refused(copy_of: Any) -> None:
    # transformers would initialise the missing tensors at random and say nothing that stops it.
    folder = copy_of("clip")
    state = load_file(folder / "model.safetensors")
    del state["text_projection.weight"]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    message = _refused(_spec(folder))
    assert "missing" in message and "text_projection.weight" in message


def test_a_checkpoint_of_another_architecture_is_refused(
    folders: dict[str, Path], encoders: dict[str, Encoder], tmp_path: Path
) -> None:
    path = tmp_path / "siglip.pt"
    torch.save({"state_dict": encoders["siglip"].backend.checkpoint_state()}, path)
    message = _refused(_spec(folders["clip"], str(path)))
    assert "another architecture" in message and str(path) in message


@pytest.mark.parametrize(
    ("pretrained", "expected"),
    [
        ("not-a-tag", "does not know that value"),
        ("/no/such/tuned.pt", "does not exist"),
    ],
)
def test_unusable_pretrained_values_list_the_accepted_ones(
    folders: dict[str, Path], pretrained: str, expected: str
) -> None:
    message = _refused(_spec(folders["clip"], pretrained))
    assert expected in message and "'folder'" in message and "'none'" in message


def test_a_missing_folder_is_called_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailable) as info:
        load_encoder(ModelSpec(f"hf:{tmp_path / 'nope'}", "", device="cpu"))
    assert "does not exist" in str(info.value) and "snapshot_download" not in str(info.value)

"""retrieval.training: the fine-tuning objectives, the schedule, the split, and short runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from retrieval.errors import ConfigError, TrainingDataError
from retrieval.models.encoder import load_encoder
from retrieval.models.identity import ModelSpec
from retrieval.models.weights import sha256_file
from retrieval.training.batches import split_samples
from retrieval.training.config import FinetuneConfig, report_path_for
from retrieval.training.data import TrainingSample
from retrieval.training.finetune import finetune, lr_at
from retrieval.training.losses import (
    choose_loss,
    class_aware_loss,
    clip_loss,
    image_pair_loss,
    sigmoid_loss,
)
from retrieval.training.shapes import generate_shapes
from tests.conftest import FamilyModel

TINY = "clipsearch-tiny"


def unit_rows(n: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, dim, generator=generator), dim=-1)


def test_class_aware_equals_clip_loss_when_every_caption_is_unique() -> None:
    images, texts = unit_rows(6, 8, 1), unit_rows(6, 8, 2)
    scale = torch.tensor(10.0)
    groups = torch.arange(6)
    expected = clip_loss(images, texts, scale)
    assert float(class_aware_loss(images, texts, groups, groups, scale)) == pytest.approx(
        float(expected), rel=1e-6
    )


def test_duplicate_captions_are_one_positive_not_negatives() -> None:
    # Images 0 and 1 share caption A, image 2 has caption B; both images match A perfectly.
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    images = torch.stack([a, a, b])
    scale = torch.tensor(5.0)
    loss = class_aware_loss(
        images, torch.stack([a, b]), torch.tensor([0, 0, 1]), torch.tensor([0, 1]), scale
    )
    # By hand: each image's row is softmax over [A, B] with logits 5 and 0; caption A's row is
    # over the three images with logits [5, 5, 0] and target [1/2, 1/2, 0]; B's is [0, 0, 5].
    image_term = -math.log(math.exp(5) / (math.exp(5) + 1))
    caption_a = -math.log(math.exp(5) / (2 * math.exp(5) + 1))
    caption_b = -math.log(math.exp(5) / (math.exp(5) + 2))
    expected = (image_term + (caption_a + caption_b) / 2) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # ClipLoss on the same batch (caption A repeated) treats image 1's caption as a negative
    # of image 0 and cannot go below log 2 for those rows, however good the features are.
    clip = clip_loss(images, torch.stack([a, a, b]), torch.tensor(100.0))
    assert float(clip) > math.log(2) * 2 / 3


def test_class_aware_loss_is_low_for_a_perfect_model_and_has_gradients() -> None:
    texts = torch.eye(3)
    images = torch.eye(3)[[0, 0, 1, 2, 2]].clone().requires_grad_(True)
    groups = torch.tensor([0, 0, 1, 2, 2])
    good = class_aware_loss(images, texts, groups, torch.arange(3), torch.tensor(50.0))
    shuffled = class_aware_loss(
        images, texts, groups[[2, 3, 0, 1, 4]], torch.arange(3), torch.tensor(50.0)
    )
    assert float(shuffled.detach()) > float(good.detach()) + 10
    good.backward()
    assert images.grad is not None


def test_image_pair_term_separates_classes_and_ignores_lone_images() -> None:
    scale = torch.tensor(20.0)
    groups = torch.tensor([0, 0, 1, 1])
    apart = torch.eye(4)[[0, 0, 1, 1]]  # each class one tight point, classes orthogonal
    mixed = torch.eye(4)[[0, 1, 0, 1]]  # each image's nearest neighbour is the other class
    assert float(image_pair_loss(apart, groups, scale)) < 0.01
    assert float(image_pair_loss(mixed, groups, scale)) > 5
    # No image has a partner of its class: nothing to pull together, and no NaN.
    lone = image_pair_loss(torch.eye(3), torch.tensor([0, 1, 2]), scale)
    assert float(lone) == 0.0
    # Weighted into the class-aware loss; a zero weight leaves it unchanged.
    texts = torch.eye(4)[:2]
    base = class_aware_loss(mixed, texts, groups, torch.arange(2), scale)
    with_pairs = class_aware_loss(mixed, texts, groups, torch.arange(2), scale, image_pairs=0.5)
    expected = float(base) + 0.5 * float(image_pair_loss(mixed, groups, scale))
    assert float(with_pairs) == pytest.approx(expected, rel=1e-5)


def test_lr_schedule_warms_up_then_decays_to_zero() -> None:
    values = [lr_at(step, 100, 10) for step in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == 1.0
    assert values[10] == pytest.approx(1.0)
    assert all(x >= y for x, y in zip(values[10:], values[11:], strict=False))
    assert values[55] == pytest.approx(0.5, abs=0.02)
    assert values[-1] < 0.001
    assert lr_at(0, 5, 0) == 1.0


def sample(label: str | None, n: int) -> TrainingSample:
    return TrainingSample(Path(f"{label}-{n}.png"), (f"a {label}",), label)


def test_split_is_stratified_and_keeps_every_class_in_training() -> None:
    samples = [sample("a", i) for i in range(50)] + [sample("b", i) for i in range(10)]
    samples += [sample("c", 0)]
    train, val = split_samples(samples, 0.2, seed=3)
    assert len(val) == round(61 * 0.2)
    assert {s.label for s in train} == {"a", "b", "c"}
    counts = {label: sum(s.label == label for s in val) for label in "abc"}
    assert counts["a"] == 10 and counts["b"] == 2 and counts["c"] == 0
    assert split_samples(samples, 0.2, seed=3) == (train, val)
    assert split_samples(samples, 0.2, seed=4) != (train, val)
    assert split_samples(samples, 0.0, seed=3) == (samples, [])


def test_auto_loss_is_class_aware_only_when_groups_repeat() -> None:
    unique = [TrainingSample(Path(f"{i}.png"), (f"caption {i}",)) for i in range(4)]
    assert choose_loss("auto", unique, sigmoid=False) == "clip"
    assert choose_loss("auto", [*unique, unique[0]], sigmoid=False) == "class-aware"
    assert choose_loss("auto", [sample("a", 0), sample("a", 1)], sigmoid=False) == "class-aware"
    assert choose_loss("clip", [sample("a", 0), sample("a", 1)], sigmoid=False) == "clip"
    # a SigLIP model trains with its own sigmoid, whatever the data
    assert choose_loss("auto", unique, sigmoid=True) == "sigmoid"
    assert choose_loss("auto", [sample("a", 0), sample("a", 1)], sigmoid=True) == "sigmoid"


def test_sigmoid_loss_is_siglips_with_unique_captions() -> None:
    from open_clip.loss import SigLipLoss

    image, text = unit_rows(6, 8, 1), unit_rows(6, 8, 2)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    groups = torch.arange(6)
    ours = sigmoid_loss(image, text, groups, groups, scale, bias)
    torch.testing.assert_close(ours, SigLipLoss()(image, text, scale, bias))


def test_sigmoid_loss_counts_a_repeated_caption_as_a_positive() -> None:
    # Images 0 and 1 share caption 0: both pairs are positives, no pair pushed apart.
    image = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]]), dim=-1)
    text = F.normalize(torch.tensor([[1.0, 0.05], [0.0, 1.0]]), dim=-1)
    scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-5.0, requires_grad=True)
    grouped = sigmoid_loss(image, text, torch.tensor([0, 0, 1]), torch.tensor([0, 1]), scale, bias)
    as_negatives = sigmoid_loss(
        image, text, torch.tensor([0, 2, 1]), torch.tensor([0, 1]), scale, bias
    )
    assert grouped.item() < 0.05 < as_negatives.item()
    grouped.backward()
    assert scale.grad is not None and bias.grad is not None


def test_bad_options_are_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="finetune loss"):
        FinetuneConfig(data=tmp_path, out=tmp_path / "m.pt", loss="triplet")
    with pytest.raises(ConfigError, match="finetune freeze"):
        FinetuneConfig(data=tmp_path, out=tmp_path / "m.pt", freeze="both")
    with pytest.raises(ConfigError, match="finetune val_fraction"):
        FinetuneConfig(data=tmp_path, out=tmp_path / "m.pt", val_fraction=1.0)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, 48, seed=5)
    return root


def config(shapes: Path, out: Path, **overrides: object) -> FinetuneConfig:
    base: dict[str, object] = {
        "data": shapes,
        "out": out,
        "model": ModelSpec(TINY, "none", device="cpu"),
        "templates": ("a {}",),
        "steps": 4,
        "batch_size": 12,
        "lr": 1e-3,
        "val_fraction": 0.25,
        "workers": 1,
    }
    base.update(overrides)
    return FinetuneConfig(**base)  # type: ignore[arg-type]


def test_checkpoint_loads_everywhere_and_report_describes_the_run(
    shapes: Path, tmp_path: Path
) -> None:
    import open_clip

    out = tmp_path / "run" / "tiny.pt"
    result = finetune(config(shapes, out))
    assert result.checkpoint == out and out.is_file()
    assert result.report_path == report_path_for(out) == tmp_path / "run" / "tiny.report.json"
    report = json.loads(result.report_path.read_text())
    assert report == result.report.to_dict()
    assert report["steps"] == 4 and report["loss"] == "class-aware"
    assert report["data"] == {
        "format": "folder",
        "samples": 48,
        "train": 36,
        "val": 12,
        "classes": 24,
        "warnings": 0,
    }
    assert report["pre_decoded"] is True
    assert report["val_loss"] > 0 and 0 <= report["val_zero_shot"]["top1"] <= 1
    assert report["val_zero_shot"]["images"] == 12
    assert report["checkpoint_sha256"] == sha256_file(out)
    assert report["args"]["steps"] == 4 and report["seconds"] > 0

    model = open_clip.create_model(TINY, pretrained=str(out))
    encoder = load_encoder(ModelSpec(TINY, str(out), device="cpu"))
    state = torch.load(out, weights_only=True)["state_dict"]
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, state[name])
        torch.testing.assert_close(encoder.model.state_dict()[name], state[name])
    assert encoder.identity.weights_sha256 == report["checkpoint_sha256"]


def test_training_lowers_the_loss(shapes: Path, tmp_path: Path) -> None:
    result = finetune(
        config(shapes, tmp_path / "m.pt", steps=40, batch_size=24, lr=2e-3, val_fraction=0.0)
    )
    # Colour alone tells most of the 24 classes apart; 40 steps learn that much.
    final = result.report.final_train_loss
    assert final is not None and final < result.report.first_train_loss - 0.4


def test_runs_are_reproducible_per_seed(shapes: Path, tmp_path: Path) -> None:
    def run(name: str, seed: int) -> dict[str, torch.Tensor]:
        result = finetune(config(shapes, tmp_path / name, steps=3, val_fraction=0.0, seed=seed))
        return torch.load(result.checkpoint, weights_only=True)["state_dict"]

    first, again, other = run("a.pt", 7), run("b.pt", 7), run("c.pt", 8)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.allclose(first[k], other[k]) for k in first)


@pytest.mark.parametrize("frozen", ["image", "text"])
def test_freezing_a_tower_keeps_its_weights(
    frozen: str, shapes: Path, tmp_path: Path, tiny_checkpoint: Path
) -> None:
    result = finetune(
        config(
            shapes,
            tmp_path / "m.pt",
            model=ModelSpec(TINY, str(tiny_checkpoint), device="cpu"),
            freeze=frozen,
        )
    )
    before = torch.load(tiny_checkpoint, weights_only=True)["state_dict"]
    after = torch.load(result.checkpoint, weights_only=True)["state_dict"]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    visual = {k for k in changed if k.startswith("visual.")}
    text = changed - visual - {"logit_scale"}
    assert result.report.start_weights == sha256_file(tiny_checkpoint)
    if frozen == "image":
        assert not visual and text
    else:
        assert visual and not text


def test_csv_streaming_accumulation_and_plain_clip_loss(shapes: Path, tmp_path: Path) -> None:
    # cache_bytes=0 decodes every batch instead of pre-decoding; same run, same numbers.
    cached = finetune(
        config(shapes / "captions.csv", tmp_path / "a.pt", accum_steps=2, batch_size=6, loss="clip")
    )
    streamed = finetune(
        config(
            shapes / "captions.csv",
            tmp_path / "b.pt",
            accum_steps=2,
            batch_size=6,
            loss="clip",
            cache_bytes=0,
        )
    )
    assert cached.report.pre_decoded is True and streamed.report.pre_decoded is False
    assert cached.report.loss == "clip" and cached.report.data.format == "csv"
    assert cached.report.val_zero_shot is None  # a caption table has no classes
    assert streamed.report.final_train_loss == pytest.approx(
        cached.report.final_train_loss, rel=1e-2
    )


def test_undecodable_images_are_skipped_and_reported(shapes: Path, tmp_path: Path) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    broken = data / "red_circle" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    result = finetune(config(data, tmp_path / "m.pt", val_fraction=0.0))
    assert result.report.data.train == 48
    assert any("broken.jpg" in w for w in result.warnings)


def test_too_little_data_is_a_training_data_error(tmp_path: Path) -> None:
    generate_shapes(tmp_path / "one", 1, seed=0)
    with pytest.raises(TrainingDataError, match="fewer than two"):
        finetune(config(tmp_path / "one", tmp_path / "m.pt", val_fraction=0.0))


@pytest.mark.parametrize("model", ["open_clip-siglip", "hf-siglip"])
def test_siglip_models_train_with_the_sigmoid_loss_and_keep_their_score_rule(
    model: str, family_models: dict[str, FamilyModel], shapes: Path, tmp_path: Path
) -> None:
    spec = family_models[model].spec()
    start = load_encoder(spec).score_rule
    result = finetune(
        config(shapes, tmp_path / "s.pt", model=spec, steps=30, batch_size=24, lr=2e-3)
    )
    report = result.report
    assert report.loss == "sigmoid"
    assert report.final_train_loss is not None
    assert report.final_train_loss < report.first_train_loss * 0.7
    tuned = load_encoder(
        ModelSpec(spec.name, str(result.checkpoint), device="cpu", config_dir=spec.config_dir)
    )
    rule = tuned.score_rule
    assert rule.is_sigmoid and rule.logit_bias != pytest.approx(start.logit_bias)
    with pytest.raises(ConfigError, match="sigmoid"):
        finetune(config(shapes, tmp_path / "c.pt", model=spec, steps=1, loss="class-aware"))


def test_the_sigmoid_loss_needs_a_sigmoid_model(shapes: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no logit bias"):
        finetune(config(shapes, tmp_path / "m.pt", steps=1, loss="sigmoid"))


def test_pretrained_tag_needing_quickgelu_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="quickgelu"):
        finetune(
            FinetuneConfig(
                data=tmp_path, out=tmp_path / "m.pt", model=ModelSpec("ViT-B-32", "openai")
            )
        )

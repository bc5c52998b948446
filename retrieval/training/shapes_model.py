"""The tiny model trained on generated coloured shapes: the offline demo's model, and the
semantic test model. One recipe, so the demo shows what the tests assert.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from retrieval.models.cache import clipsearch_cache_dir
from retrieval.models.identity import ModelSpec
from retrieval.models.weights import sha256_file
from retrieval.training.config import FinetuneConfig, FinetuneResult, report_path_for
from retrieval.training.finetune import finetune
from retrieval.training.shapes import generate_shapes

# A tiny ResNet (open_clip's ModifiedResNet, stem width 8) and a 2-layer text tower. Its
# convolutions learn shapes far faster per CPU second than the tiny ViT: measured on 2 cores,
# the ViT (clipsearch-tiny, 64 patches) took 0.30 s a step and needed about 1200 steps for
# 0.93 zero-shot; this one takes about 0.1 s a step and passes 0.95 after 400 steps.
SHAPES_MODEL = "clipsearch-tiny-rn"
# The captions the generator writes ("a red circle") are the class folder names in this
# template; training and querying with the same phrasing is what a 2-layer text tower can learn.
SHAPES_TEMPLATES = ("a {}",)
TRAIN_IMAGES = 4800
TRAIN_SEED = 0  # generator seed of the training pictures; test and demo corpora use others
STEPS = 400  # the demo and the tests use the same recipe, so the demo shows what tests assert
LEARNING_RATE = 2e-3
# Measured (seed 0, 400 steps, 240 held-out pictures): without the image-to-image term,
# zero-shot 0.975 and 85% of image-search top-5s all of the query's class; with 0.5, 0.996
# and 89%.
IMAGE_PAIRS = 0.5


@dataclass(frozen=True)
class ShapesRecipe:
    """One tiny model trained from random weights on generated shapes, in one language."""

    model: str  # a model name of any family (see retrieval.models.identity)
    language: str  # of the captions: "en" ("a red circle") or "zh" ("红色的圆形")
    templates: tuple[str, ...]  # class name -> caption, for training and zero-shot queries
    steps: int = STEPS
    lr: float = LEARNING_RATE
    image_pairs: float = IMAGE_PAIRS

    def training_data(self, work_dir: Path) -> Path:
        """English trains from the class folders, Chinese from captions.csv (its labels)."""
        if self.language == "en":
            return work_dir / "train"
        return work_dir / f"train-{self.language}" / "captions.csv"


ENGLISH = ShapesRecipe(SHAPES_MODEL, "en", SHAPES_TEMPLATES)
# Chinese-CLIP's own code (a 2-layer BERT text tower on the real Chinese vocab) and the same
# tiny ResNet; its captions are the class names themselves, so the template is "{}". Measured
# (seed 0, 240 held-out pictures, zero-shot top-1): 400 steps 0.75 with BERT's dropout of 0.1,
# 0.825 without it (the config has none), 0.875 with a text tower twice as wide; 800 steps
# without dropout 1.00. A lower (1e-3: 0.75) or higher (4e-3: 0.70) peak LR did worse.
CHINESE = ShapesRecipe("cn-clip:clipsearch-tiny-zh-rn", "zh", ("{}",), steps=800)


def trained_models_dir() -> Path:
    """Where the demo keeps the tiny models it trains (`$XDG_CACHE_HOME/clipsearch/trained`):
    one folder for every data dir, and the test suite reads the same one."""
    return clipsearch_cache_dir() / "trained"


# What under retrieval/models and retrieval/training decides a trained model: code and configs.
TRAINING_CODE = (".py", ".json")


def recipe_key(recipe: ShapesRecipe = ENGLISH) -> str:
    """Digest of everything that decides a trained tiny model: the recipe, the code that
    trains it (retrieval/models/ with its model configs, retrieval/training/ and
    retrieval/images.py) and the torch and open_clip versions. Another version of that code
    gets a model trained by its own code; a change to the index, catalog or search code
    does not retrain it."""
    import open_clip
    import torch

    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256(
        json.dumps([asdict(recipe), torch.__version__, open_clip.__version__]).encode()
    )
    trains = [root / "models", root / "training"]
    files = [
        path for folder in trains for path in folder.rglob("*") if path.suffix in TRAINING_CODE
    ]
    for path in sorted([*files, root / "images.py"]):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def shapes_model_path(recipe: ShapesRecipe = ENGLISH, folder: Path | None = None) -> Path:
    """The one name a recipe's checkpoint has, in `folder` (default: trained_models_dir())."""
    return (folder or trained_models_dir()) / f"shapes-{recipe.language}-{recipe_key(recipe)}.pt"


def shapes_config(
    data: Path,
    out: Path,
    *,
    steps: int,
    seed: int = 0,
    device: str = "cpu",
    recipe: ShapesRecipe = ENGLISH,
) -> FinetuneConfig:
    """The recipe: random init, class-aware loss over the 24 colour x shape classes."""
    return FinetuneConfig(
        data=data,
        out=out,
        model=ModelSpec(recipe.model, "none", device=device),
        templates=recipe.templates,
        steps=steps,
        batch_size=96,
        lr=recipe.lr,
        warmup=0.1,
        weight_decay=0.1,
        loss="class-aware",
        image_pairs=recipe.image_pairs,
        val_fraction=0.05,
        seed=seed,
    )


def train_shapes_model(
    work_dir: Path,
    out: Path,
    *,
    steps: int,
    seed: int = 0,
    device: str = "cpu",
    progress: bool | None = None,
    train_images: int = TRAIN_IMAGES,
    recipe: ShapesRecipe = ENGLISH,
) -> FinetuneResult:
    """Generate the training pictures under `work_dir` (once) and train the model into `out`."""
    data = recipe.training_data(work_dir)
    folder = data.parent if data.suffix == ".csv" else data
    if not (folder / "captions.csv").is_file():
        generate_shapes(folder, train_images, seed=TRAIN_SEED, language=recipe.language)
    config = shapes_config(data, out, steps=steps, seed=seed, device=device, recipe=recipe)
    return finetune(config, progress=progress)


def cached_shapes_model(
    out: Path, *, min_steps: int, seed: int = 0, recipe: ShapesRecipe = ENGLISH
) -> dict[str, Any] | None:
    """The report of a finished checkpoint at `out` made by this recipe, else None.

    It must have been trained for at least `min_steps` steps, with the recipe's other settings
    unchanged, and the file must still match its report's sha256.
    """
    report_path = report_path_for(out)
    if not (out.is_file() and report_path.is_file()):
        return None
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or not isinstance(report.get("args"), dict):
        return None
    args = report["args"]
    expected = shapes_config(Path(), out, steps=min_steps, seed=seed, recipe=recipe).to_dict()
    # Where it ran changes speed, not the recipe.
    ignored = {"data", "out", "workers", "steps", "device"}
    same = all(args.get(k) == v for k, v in expected.items() if k not in ignored)
    steps = args.get("steps")
    if not same or not isinstance(steps, int) or steps < min_steps:
        return None
    if report.get("checkpoint_sha256") != sha256_file(out):
        return None
    return report

"""Search in Chinese, end to end with meaning: a Chinese-CLIP tiny model trained by
`clipsearch finetune` on shapes captioned in Chinese (红色的圆形) finds and labels them.

`semantic_zh_checkpoint` (conftest) is trained once per session (cached between runs). Every
test here uses pictures generated with other seeds than its training pictures.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from indexer.labelling import LabelJob
from indexer.pipeline import IndexJob
from retrieval.catalog.database import Catalog
from retrieval.config import Settings, load_settings
from retrieval.labels.definitions import LabelSet
from retrieval.labels.store import LabelStore
from retrieval.models.encoder import Encoder, load_encoder
from retrieval.models.identity import ModelSpec
from retrieval.training import evaluate as ev
from retrieval.training.data import load_training_set
from retrieval.training.shapes import COLOURS, SHAPES, class_name, generate_shapes
from retrieval.training.shapes_model import CHINESE
from tests.serving import run_cli

pytestmark = pytest.mark.slow  # trains the Chinese semantic model once per session

CLASSES = [class_name(colour, shape, "zh") for colour in COLOURS for shape in SHAPES]
HELDOUT_IMAGES = 240  # 10 per class
CORPUS_IMAGES = 120  # 5 per class: "all of the top 5" is every picture of the class


@pytest.fixture(scope="module")
def zh_encoder(semantic_zh_checkpoint: Path) -> Encoder:
    return load_encoder(ModelSpec(CHINESE.model, str(semantic_zh_checkpoint), device="cpu"))


@dataclass
class Corpus:
    settings: Settings
    catalog: Catalog
    root: Path


@pytest.fixture(scope="module")
def corpus(
    tmp_path_factory: pytest.TempPathFactory, zh_encoder: Encoder, semantic_zh_checkpoint: Path
) -> Iterator[Corpus]:
    """Chinese-captioned shapes indexed with the model and labelled with a Chinese label set."""
    base = tmp_path_factory.mktemp("zh-corpus")
    root = base / "pics"
    generate_shapes(root, CORPUS_IMAGES, seed=12, language="zh")
    (root / "captions.csv").unlink()
    settings = load_settings(
        data_dir=base / "data",
        model=CHINESE.model,
        pretrained=str(semantic_zh_checkpoint),
        device="cpu",
        workers=0,
        label_on_index=False,
    )
    catalog = Catalog(settings.resolved_database_url)
    IndexJob(settings, catalog, lambda: zh_encoder, progress=False).run([root])
    definition = {"labels": CLASSES, "templates": ["{}"], "top_k": 1}
    LabelStore(catalog).put(LabelSet.from_dict(definition, name="shapes-zh"))
    LabelJob(settings, catalog, lambda: zh_encoder, progress=False).run()
    yield Corpus(settings, catalog, root)
    catalog.dispose()


def _class_of(path: str) -> str:
    colour, shape = Path(path).parent.name.split("_")
    return class_name(colour, shape, "zh")


def test_zero_shot_in_chinese_on_heldout_shapes(zh_encoder: Encoder, tmp_path: Path) -> None:
    generate_shapes(tmp_path, HELDOUT_IMAGES, seed=11, language="zh")
    dataset = load_training_set(tmp_path / "captions.csv")
    assert sorted(dataset.classes) == sorted(CLASSES)
    zero_shot, _ = ev.evaluate_zero_shot(zh_encoder, dataset, prompt="{}", templates=("{}",))
    assert zero_shot.single.images == HELDOUT_IMAGES
    assert zero_shot.single.top1 >= 0.9, zero_shot


def test_clipsearch_search_in_chinese_returns_blue_squares(corpus: Corpus) -> None:
    searched = run_cli(corpus.settings, "search", "蓝色的正方形", "-k", "5", "--json")
    assert searched.returncode == 0, searched.stderr
    hits = json.loads(searched.stdout)["results"]
    assert [_class_of(hit["path"]) for hit in hits] == ["蓝色的正方形"] * 5
    # The labels on every hit are in Chinese too, from the stored label set.
    assert {hit["labels"][0]["label"] for hit in hits} == {"蓝色的正方形"}


def test_a_chinese_label_set_labels_the_corpus_right(corpus: Corpus) -> None:
    records = corpus.catalog.records_under([str(corpus.root)])
    ids = {record.id: record.path for record in records.values()}
    labels = LabelStore(corpus.catalog).labels_for(list(ids))
    right = sum(1 for image_id, path in ids.items() if labels[image_id][0].label == _class_of(path))
    assert len(ids) == CORPUS_IMAGES
    assert right / len(ids) >= 0.9, f"{right} of {len(ids)} labelled right"

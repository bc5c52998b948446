"""End to end with meaning: the tiny model trained on shapes finds the right pictures.

`semantic_checkpoint` (conftest) is trained once per session by the product's own finetune.
Everything here runs on pictures generated with another seed than its training pictures.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from indexer.pipeline import IndexJob
from indexer.tour import run_demo
from retrieval.catalog.database import Catalog
from retrieval.config import load_settings
from retrieval.models.encoder import Encoder, load_encoder
from retrieval.models.identity import ModelSpec
from retrieval.search import Searcher
from retrieval.training import evaluate as ev
from retrieval.training.data import load_training_set
from retrieval.training.shapes import COLOURS, SHAPES, draw_shape, generate_shapes
from retrieval.training.shapes_model import SHAPES_MODEL, SHAPES_TEMPLATES, shapes_model_path

pytestmark = pytest.mark.slow  # trains the semantic model once per session

HELDOUT_SEED = 1
HELDOUT_IMAGES = 240  # 10 per class: enough for "all of the top 5 are right"


@pytest.fixture(scope="module")
def heldout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("heldout")
    generate_shapes(root, HELDOUT_IMAGES, seed=HELDOUT_SEED)
    return root


@pytest.fixture(scope="module")
def semantic_encoder(semantic_checkpoint: Path) -> Encoder:
    return load_encoder(ModelSpec(SHAPES_MODEL, str(semantic_checkpoint), device="cpu"))


def test_zero_shot_and_class_queries_on_heldout_shapes(
    semantic_encoder: Encoder, heldout: Path
) -> None:
    classes = load_training_set(heldout, templates=SHAPES_TEMPLATES)
    zero_shot, _ = ev.evaluate_zero_shot(
        semantic_encoder, classes, prompt="a {}", templates=SHAPES_TEMPLATES
    )
    assert zero_shot.single.classes == len(COLOURS) * len(SHAPES) == 24
    assert zero_shot.single.images == HELDOUT_IMAGES
    assert zero_shot.single.top1 >= 0.9

    retrieval, _ = ev.evaluate_retrieval(
        semantic_encoder, load_training_set(heldout / "captions.csv")
    )
    assert retrieval.class_queries == 24
    # For each of the 24 captions ("a red circle"), are all of its top 5 pictures that class?
    assert retrieval.all_relevant_at[5] >= 0.9
    assert retrieval.text_to_image.recall[5] >= 0.9


def test_the_random_model_fails_the_same_bar(encoder: Encoder, heldout: Path) -> None:
    # The bar above means something: the same measurement on the untrained model is near chance.
    zero_shot, _ = ev.evaluate_zero_shot(
        encoder, load_training_set(heldout), prompt="a {}", templates=SHAPES_TEMPLATES
    )
    assert zero_shot.single.top1 < 0.3


@pytest.fixture(scope="module")
def indexed(
    semantic_checkpoint: Path,
    semantic_encoder: Encoder,
    heldout: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Searcher]:
    settings = load_settings(
        data_dir=tmp_path_factory.mktemp("semantic-index"),
        model=SHAPES_MODEL,
        pretrained=str(semantic_checkpoint),
        device="cpu",
        workers=0,
        retire_grace_seconds=0,
    )
    catalog = Catalog(settings.resolved_database_url)
    report = IndexJob(settings, catalog, lambda: semantic_encoder).run([heldout])
    assert report.new == HELDOUT_IMAGES and not report.failed
    searcher = Searcher(catalog, settings.resolved_index_dir, semantic_encoder)
    yield searcher
    searcher.close()
    catalog.dispose()


def classes_of(paths: list[str]) -> list[str]:
    return [Path(path).parent.name for path in paths]


def test_text_search_for_a_blue_square_returns_blue_squares(indexed: Searcher) -> None:
    result = indexed.search_text("a blue square", k=5)
    assert classes_of([hit.path for hit in result.hits]) == ["blue_square"] * 5


def test_image_search_with_a_new_green_triangle_finds_green_triangles_first(
    indexed: Searcher, tmp_path: Path
) -> None:
    # Three new pictures (sizes, places and tilts differ): each one's best hit is a green
    # triangle, and so are nearly all of their top 5s (the tiny model is trained on text
    # pairs, so image-to-image neighbourhoods are looser than text-to-image ones).
    top5: list[str] = []
    for n in range(3):
        query = tmp_path / f"query-{n}.png"
        draw_shape("green", "triangle", random.Random(f"query {n}")).save(query)
        classes = classes_of([hit.path for hit in indexed.search_image(query, k=5).hits])
        assert classes[0] == "green_triangle", classes
        top5 += classes
    assert top5.count("green_triangle") >= 12, top5


def test_demo_reuses_a_trained_model_and_its_searches_mean_something(
    semantic_checkpoint: Path, tmp_path: Path
) -> None:
    # The session's model has the demo's name for it in the demo's cache (or a folder like it):
    # the demo finds it and skips training.
    assert semantic_checkpoint == shapes_model_path(folder=semantic_checkpoint.parent)
    lines: list[str] = []
    base = load_settings(
        model=SHAPES_MODEL, pretrained=str(tmp_path / "absent.pt"), device="cpu", workers=0
    )
    # 72 pictures: three of each class, so a top 3 can be all red circles.
    run_demo(
        tmp_path / "demo", 72, base=base, echo=lines.append, models_dir=semantic_checkpoint.parent
    )
    text = "\n".join(lines)
    assert "not available offline" in text and "using the tiny model trained earlier" in text
    assert "training" not in text
    top = lines.index('top 3 for "a red circle":')
    assert all("red_circle/" in line for line in lines[top + 1 : top + 4])
    assert all("label: red circle" in line for line in lines[top + 1 : top + 4])
    summary = next(line for line in lines if line.startswith("zero-shot labels"))
    right = int(summary.split(": ", 1)[1].split(" of ")[0])
    assert right >= 0.9 * 72, summary

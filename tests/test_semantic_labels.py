"""Zero-shot labels with meaning: the shapes model labels a held-out corpus by colour and shape.

`semantic_checkpoint` (conftest) is trained once per session by the product's own finetune, on
pictures of another seed than these.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from indexer.pipeline import IndexJob
from retrieval.catalog.database import Catalog
from retrieval.config import load_settings
from retrieval.filters import SearchFilters, ids_passing
from retrieval.labels.definitions import LabelSet
from retrieval.labels.store import LabelStore
from retrieval.models.encoder import load_encoder
from retrieval.models.identity import ModelSpec
from retrieval.search import Searcher
from retrieval.training.shapes import COLOURS, SHAPES, generate_shapes
from retrieval.training.shapes_model import SHAPES_MODEL, SHAPES_TEMPLATES

pytestmark = pytest.mark.slow  # trains the semantic model once per session

HELDOUT_SEED = 2
HELDOUT_IMAGES = 240  # 10 per class
CLASSES = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]


@dataclass
class Labelled:
    searcher: Searcher
    store: LabelStore
    catalog: Catalog
    root: Path


def true_class(path: str) -> str:
    return Path(path).parent.name.replace("_", " ")


@pytest.fixture(scope="module")
def labelled(
    semantic_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Labelled]:
    encoder = load_encoder(ModelSpec(SHAPES_MODEL, str(semantic_checkpoint), device="cpu"))
    root = tmp_path_factory.mktemp("heldout-labels")
    generate_shapes(root, HELDOUT_IMAGES, seed=HELDOUT_SEED)
    settings = load_settings(
        data_dir=tmp_path_factory.mktemp("semantic-labels"),
        model=SHAPES_MODEL,
        pretrained=str(semantic_checkpoint),
        device="cpu",
        workers=0,
    )
    catalog = Catalog(settings.resolved_database_url)
    catalog.upgrade()
    store = LabelStore(catalog)
    store.put(
        LabelSet.from_dict(
            {"name": "shapes", "labels": CLASSES, "templates": list(SHAPES_TEMPLATES)}
        )
    )
    report = IndexJob(settings, catalog, lambda: encoder, progress=False).run([root])
    assert report.new == HELDOUT_IMAGES and report.labelled == {"shapes": HELDOUT_IMAGES}
    searcher = Searcher(catalog, settings.resolved_index_dir, encoder, label_store=store)
    yield Labelled(searcher, store, catalog, root)
    searcher.close()
    catalog.dispose()


def test_corpus_labels_name_the_right_colour_and_shape(labelled: Labelled) -> None:
    records = labelled.catalog.records_under([str(labelled.root)])
    labels = labelled.store.labels_for([r.id for r in records.values()])
    right = sum(
        1
        for path, record in records.items()
        if labels.get(record.id) and labels[record.id][0].label == true_class(path)
    )
    accuracy = right / len(records)
    print(f"\ncorpus labels: top label right for {right} of {len(records)} ({accuracy:.3f})")
    assert len(records) == HELDOUT_IMAGES
    assert accuracy >= 0.9
    counts = labelled.store.counts("shapes")
    assert sum(counts.counts.values()) == HELDOUT_IMAGES and counts.unlabelled == 0


@pytest.mark.parametrize("label", ["blue square", "red circle", "yellow star"])
def test_a_label_filtered_search_returns_only_images_with_that_label(
    labelled: Labelled, label: str
) -> None:
    for min_score in (0.0, 0.5):
        filters = SearchFilters(labels=(label,), label_min_score=min_score)
        ids = ids_passing(labelled.catalog, filters, labelled.store)
        assert ids is not None and len(ids) >= 5
        # The query asks for something else: only the filter decides what may come back.
        hits = labelled.searcher.search_text("a green triangle", k=len(ids) + 5, allowed_ids=ids)
        assert len(hits.hits) == len(ids)
        for hit in hits.hits:
            scores = [x.score for x in hit.labels if x.label == label]
            assert scores and scores[0] >= min_score, hit.path
        if min_score:
            # A confident label is the right one: these pictures really show that class.
            really = sum(true_class(hit.path) == label for hit in hits.hits) / len(hits.hits)
            print(f"\n{label}: {len(hits.hits)} images with p >= {min_score}, {really:.2f} right")
            assert really >= 0.9

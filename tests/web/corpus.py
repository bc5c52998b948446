"""The corpus the browser tests search, served by a real `clipsearch serve` with an API key.

240 generated pictures of coloured shapes (10 per class, the held-out seed of
tests/test_semantic.py) indexed with the semantic test model and labelled by
`clipsearch labels add` + `clipsearch label`, so a query for "a blue square" has right answers
(and labels) the page must show. Built once a session (the `corpus` fixture in conftest.py):
it takes a while, and no test changes it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from indexer.pipeline import IndexJob
from retrieval.catalog.database import Catalog
from retrieval.config import load_settings
from retrieval.models.encoder import load_encoder
from retrieval.models.identity import ModelSpec
from retrieval.training.shapes import COLOURS, SHAPES, generate_shapes
from retrieval.training.shapes_model import SHAPES_MODEL, SHAPES_TEMPLATES
from tests.serving import REPO, running_server, serve_env
from tests.web.conftest import OpenPage
from tests.web.search_page import SearchPage

CORPUS_IMAGES = 240
CORPUS_SEED = 1  # held out from the model's training pictures (seed 0)
READ_KEY = "web-read-key"
DEFAULT_K = 24  # api/web/query.js
LABEL_SET = "shapes"
LABELS = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]


@dataclass(frozen=True)
class Corpus:
    root: Path
    base_url: str

    def url(self, path: str = "/") -> str:
        return self.base_url + path


@contextmanager
def serve_corpus(checkpoint: Path, work: Path) -> Iterator[Corpus]:
    photos = work / "photos"
    generate_shapes(photos, CORPUS_IMAGES, seed=CORPUS_SEED)
    settings = load_settings(
        data_dir=work / "data",
        model=SHAPES_MODEL,
        pretrained=str(checkpoint),
        device="cpu",
        workers=0,
    )
    encoder = load_encoder(ModelSpec(SHAPES_MODEL, str(checkpoint), device="cpu"))
    catalog = Catalog(settings.resolved_database_url)
    try:
        report = IndexJob(settings, catalog, lambda: encoder, progress=False).run([photos])
    finally:
        catalog.dispose()
    assert report.new == CORPUS_IMAGES and not report.failed
    model_settings = {
        "CLIPSEARCH_DATA_DIR": str(work / "data"),
        "CLIPSEARCH_MODEL": SHAPES_MODEL,
        "CLIPSEARCH_PRETRAINED": str(checkpoint),
        "CLIPSEARCH_DEVICE": "cpu",
    }
    label_set = work / "shapes.json"
    # Up to 3 labels an image, each with a probability of at least 0.2: what a user would set
    # up, and what makes a label filter keep some pictures and drop others.
    definition = {"labels": LABELS, "templates": list(SHAPES_TEMPLATES), "top_k": 3}
    label_set.write_text(json.dumps({"name": LABEL_SET, **definition, "threshold": 0.2}))
    for command in (["labels", "add", str(label_set)], ["label", "--no-progress"]):
        subprocess.run(
            [sys.executable, "-m", "indexer", *command],
            cwd=REPO,
            env=serve_env(model_settings),
            check=True,
            timeout=300,
        )
    serve_settings = {**model_settings, "CLIPSEARCH_API_KEYS": READ_KEY}
    with running_server(serve_settings, work / "serve.log") as server:
        yield Corpus(photos.resolve(), server.base_url)


def open_search(open_page: OpenPage, corpus: Corpus, path: str = "/", **kw: str) -> SearchPage:
    return SearchPage(open_page(corpus.url(path), key=READ_KEY, **kw))

"""`clipsearch demo`: a self-contained tour that works on a machine with no internet."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from retrieval.catalog.database import Catalog
from retrieval.config import Settings
from retrieval.errors import WeightsUnavailable
from retrieval.labels.definitions import LabelSet
from retrieval.labels.store import LabelStore
from retrieval.models.encoder import Encoder, load_encoder, model_spec, resolve_device
from retrieval.models.identity import ModelSpec
from retrieval.search import Searcher
from retrieval.training.shapes import COLOURS, SHAPES
from retrieval.training.shapes_model import SHAPES_TEMPLATES

DEMO_QUERIES = ("a red circle", "a blue square", "a green triangle")
DEMO_LABEL_SET = "shapes"


def _trained_tiny_encoder(
    directory: Path, device: str, echo: Callable[[str], None], models_dir: Path | None
) -> Encoder:
    """The tiny model trained on generated shapes: from the trained-models cache, or trained now
    (its training pictures go to the demo dir)."""
    from retrieval.training.shapes_model import (
        SHAPES_MODEL,
        STEPS,
        TRAIN_IMAGES,
        cached_shapes_model,
        shapes_model_path,
        train_shapes_model,
    )

    checkpoint = shapes_model_path(folder=models_dir)
    if cached_shapes_model(checkpoint, min_steps=STEPS) is not None:
        echo(f"using the tiny model trained earlier ({checkpoint})")
    else:
        echo(
            f"training the tiny model on {TRAIN_IMAGES} generated pictures ({STEPS} steps, "
            f"under a minute on 2 CPU cores; done once, cached in {checkpoint.parent})"
        )
        result = train_shapes_model(
            directory / "model",
            checkpoint,
            steps=STEPS,
            device=resolve_device(device),
            progress=True,
        )
        zero_shot = result.report.val_zero_shot
        echo(
            f"trained in {result.report.seconds:.0f}s; zero-shot accuracy on held-out "
            f"pictures {zero_shot.top1:.2f}"
            if zero_shot
            else "trained"
        )
    return load_encoder(ModelSpec(SHAPES_MODEL, str(checkpoint), device=device))


def _demo_encoder(
    directory: Path, base: Settings, echo: Callable[[str], None], models_dir: Path | None
) -> Encoder:
    try:
        return load_encoder(model_spec(base))
    except WeightsUnavailable:
        echo(
            f"Weights {base.model}/{base.pretrained} are not available offline; falling back to "
            "the built-in tiny model, trained here on generated coloured shapes."
        )
        return _trained_tiny_encoder(directory, base.device, echo, models_dir)


def run_demo(
    directory: Path,
    count: int,
    *,
    base: Settings,
    echo: Callable[[str], None],
    models_dir: Path | None = None,
) -> None:
    """Generate `count` pictures in `directory`, index and label them, and show a few searches.

    Without weights for `base`'s model it trains the tiny shapes model once, into `models_dir`
    (default: the trained-models cache, which the test suite reuses).
    """
    from indexer.pipeline import IndexJob
    from retrieval.training.shapes import generate_shapes

    directory = directory.resolve()
    images = directory / "images"
    if not (images / "captions.csv").exists():
        echo(f"generating {count} pictures of coloured shapes in {images}")
        # Seed 1: the tiny model is trained on seed-0 pictures, so these are new to it.
        generate_shapes(images, count, seed=1)
    encoder = _demo_encoder(directory, base, echo, models_dir)
    # One state folder per model, so switching models never trips the model check.
    data_dir = directory / f"state-{encoder.identity.key}"
    settings = base.model_copy(
        update={
            "data_dir": data_dir,
            "database_url": None,
            "index_dir": None,
            "model": encoder.identity.name,
            "pretrained": encoder.identity.pretrained,
        }
    )
    catalog = Catalog(settings.resolved_database_url)
    catalog.upgrade()
    labels = LabelStore(catalog)
    # A zero-shot label set over the 24 classes: the index job labels what it adds.
    labels.put(
        LabelSet.from_dict(
            {
                "name": DEMO_LABEL_SET,
                "labels": [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES],
                "templates": list(SHAPES_TEMPLATES),
            }
        )
    )
    report = IndexJob(settings, catalog, lambda: encoder, progress=None).run([images])
    echo(
        f"indexed {images}: {report.new} new, {report.unchanged} unchanged, "
        f"{len(report.failed)} failed, generation {report.generation} "
        f"(state in {data_dir})"
    )
    searcher = Searcher(catalog, settings.resolved_index_dir, encoder, label_store=labels)
    try:
        for query in DEMO_QUERIES:
            result = searcher.search_text(query, k=3)
            echo(f'top 3 for "{query}":')
            for hit in result.hits:
                best = hit.labels[0] if hit.labels else None
                label = f"  label: {best.label} ({best.score:.2f})" if best else ""
                echo(f"  {hit.score:7.4f}  {Path(hit.path).relative_to(images)}{label}")
    finally:
        searcher.close()
    counts = labels.counts(DEMO_LABEL_SET)
    right = _labelled_right(catalog, labels, images)
    echo(
        f'zero-shot labels ("{DEMO_LABEL_SET}" set): {right} of {sum(counts.counts.values())} '
        f"pictures carry their own colour and shape as their best label; "
        f"{counts.unlabelled} below every threshold"
    )
    echo(
        "Try it yourself:\n"
        f"  clipsearch search --data-dir {data_dir} --model {encoder.identity.name} "
        f'--pretrained {encoder.identity.pretrained} "a red circle"'
    )


def _labelled_right(catalog: Catalog, labels: LabelStore, images: Path) -> int:
    """How many pictures have their own class (the folder name) as their best demo label."""
    records = catalog.records_under([str(images)])
    best = labels.labels_for([record.id for record in records.values()])
    right = 0
    for path, record in records.items():
        own = [label for label in best.get(record.id, []) if label.set == DEMO_LABEL_SET]
        right += bool(own) and own[0].label == Path(path).parent.name.replace("_", " ")
    return right

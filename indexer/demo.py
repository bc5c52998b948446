"""`clipsearch demo`: a self-contained tour that works on a machine with no internet."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from retrieval.catalog import Catalog
from retrieval.config import Settings
from retrieval.encoder import Encoder, ModelSpec, load_encoder
from retrieval.errors import WeightsUnavailable
from retrieval.search import Searcher

DEMO_QUERIES = ("a red circle", "a blue square", "a green triangle")
TINY_MODEL = "clipsearch-tiny"


def _demo_encoder(base: Settings, echo: Callable[[str], None]) -> Encoder:
    spec = ModelSpec(
        base.model,
        base.pretrained,
        device=base.device,
        precision=base.precision,
        config_dir=base.model_config_dir,
        cache_dir=base.model_cache_dir,
    )
    try:
        return load_encoder(spec)
    except WeightsUnavailable:
        echo(
            f"Weights {base.model}/{base.pretrained} are not available offline; using the "
            f"built-in tiny model with RANDOM weights, so the results below carry no meaning "
            "(they only show the pipeline working)."
        )
        return load_encoder(ModelSpec(TINY_MODEL, "none", device=base.device))


def run_demo(directory: Path, count: int, *, base: Settings, echo: Callable[[str], None]) -> None:
    from indexer.pipeline import IndexJob
    from retrieval.demo import generate_shapes

    directory = directory.resolve()
    images = directory / "images"
    if not (images / "captions.csv").exists():
        echo(f"generating {count} pictures of coloured shapes in {images}")
        generate_shapes(images, count, seed=0)
    encoder = _demo_encoder(base, echo)
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
    report = IndexJob(settings, catalog, lambda: encoder, progress=None).run([images])
    echo(
        f"indexed {images}: {report.new} new, {report.unchanged} unchanged, "
        f"{len(report.failed)} failed, generation {report.generation} "
        f"(state in {data_dir})"
    )
    searcher = Searcher(catalog, settings.resolved_index_dir, encoder)
    try:
        for query in DEMO_QUERIES:
            result = searcher.search_text(query, k=3)
            echo(f'top 3 for "{query}":')
            for hit in result.hits:
                echo(f"  {hit.score:7.4f}  {Path(hit.path).relative_to(images)}")
    finally:
        searcher.close()
    echo(
        "Try it yourself:\n"
        f"  clipsearch search --data-dir {data_dir} --model {encoder.identity.name} "
        f'--pretrained {encoder.identity.pretrained} "a red circle"'
    )

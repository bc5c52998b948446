"""`clipsearch eval --fidelity`: the settings' runtime against torch fp32, on the index's model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from indexer.cli.reading import (
    catalog_may_exist,
    existing_index_model,
    model_loader,
    open_existing_catalog,
)
from retrieval.config import Settings
from retrieval.errors import ConfigError, EmptyIndex, ImageError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from retrieval.catalog.database import Catalog
    from retrieval.models.encoder import Encoder
    from retrieval.training.fidelity import FidelityReport

SAMPLE_IMAGES = 64  # indexed images decoded again for the image cosine


def fidelity_report(
    settings: Settings,
    *,
    zero_shot_set: Path | None,
    data_format: str,
    prompt: str,
    templates: Sequence[str],
    queries_file: Path | None,
    k: int,
) -> FidelityReport:
    from retrieval.training.data import load_training_set
    from retrieval.training.fidelity import DEFAULT_QUERIES, measure_fidelity

    queries = list(DEFAULT_QUERIES)
    if queries_file is not None:
        try:
            lines = queries_file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError("--queries", f"cannot read {queries_file}: {exc}") from None
        queries = [line.strip() for line in lines if line.strip()]
        if not queries:
            raise ConfigError("--queries", f"{queries_file} holds no query")
    choice = existing_index_model(settings)
    measured = model_loader(choice)()
    reference_settings = choice.settings.model_copy(
        update={"runtime": "torch", "precision": "fp32", "device": "cpu"}
    )
    reference = model_loader(replace(choice, settings=reference_settings))()
    stored, pixels = _live_index(settings, reference)
    zero_shot = None
    if zero_shot_set is not None:
        limit = settings.max_image_pixels
        dataset = load_training_set(
            zero_shot_set, fmt=data_format, templates=(prompt,), max_pixels=limit
        )
        zero_shot = (str(zero_shot_set), dataset, prompt, templates)
    if stored is None and zero_shot is None:
        raise ConfigError(
            "eval --fidelity",
            "needs an index (for the top-k overlap of its searches) or --zero-shot SET",
        )
    return measure_fidelity(
        measured,
        reference,
        queries=queries,
        pixels=pixels,
        stored=stored,
        k=k,
        zero_shot=zero_shot,
    )


def _live_index(
    settings: Settings, encoder: Encoder
) -> tuple[np.ndarray | None, torch.Tensor | None]:
    """The live index's vectors and a sample of its images (preprocessed); None, None where
    there is no index."""
    if not catalog_may_exist(settings):
        return None, None
    from retrieval.index.ann_quality import live_embeddings

    try:
        catalog = open_existing_catalog(settings)
    except EmptyIndex:  # no catalog at the URL: nothing indexed
        return None, None
    try:
        try:
            stored = live_embeddings(catalog, settings.resolved_index_dir)
        except EmptyIndex:
            return None, None
        return stored, _sample_pixels(catalog, encoder, settings.max_image_pixels)
    finally:
        catalog.dispose()


def _sample_pixels(catalog: Catalog, encoder: Encoder, max_pixels: int) -> torch.Tensor | None:
    import torch

    from retrieval.images import decode_image

    tensors = []
    for shard in catalog.shards():
        for record in catalog.shard_members(shard.id):
            try:
                image = decode_image(record.path, max_pixels=max_pixels).image
            except ImageError:
                continue  # moved or changed since: the sample just has one fewer
            tensors.append(encoder.preprocess(image))
            if len(tensors) == SAMPLE_IMAGES:
                return torch.stack(tensors)
    return torch.stack(tensors) if tensors else None


def echo_fidelity(report: FidelityReport) -> None:
    typer.echo(f"fidelity of {report.runtime} against {report.reference}")
    typer.echo(
        f"  cosine of embeddings ({report.texts} texts, {report.images} images): "
        f"min {report.cosine_min:.6f}, median {report.cosine_median:.6f}"
    )
    if report.overlap_mean is not None:
        typer.echo(
            f"  top-{report.k} overlap on the live index ({report.queries} queries): "
            f"mean {report.overlap_mean:.4f}, min {report.overlap_min:.4f}"
        )
    if report.zero_shot is not None:
        shot = report.zero_shot
        typer.echo(
            f"  zero-shot on {shot.data} ({shot.images} images, template ensemble): top-1 "
            f"{shot.top1:.4f} ({shot.top1 - shot.reference_top1:+.4f}), top-5 {shot.top5:.4f} "
            f"({shot.top5 - shot.reference_top5:+.4f})"
        )

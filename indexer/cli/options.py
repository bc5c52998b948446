"""Options that several commands share, and the objects they build from the settings."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from retrieval.config import Settings

if TYPE_CHECKING:
    from retrieval.catalog.database import Catalog
    from retrieval.models.encoder import Encoder

DataDirOpt = Annotated[
    Path | None, typer.Option("--data-dir", help="CLIPSEARCH_DATA_DIR: where state lives.")
]


DbOpt = Annotated[
    str | None,
    typer.Option("--database-url", help="CLIPSEARCH_DATABASE_URL (sqlite:/// or postgresql://)."),
]


IndexDirOpt = Annotated[
    Path | None, typer.Option("--index-dir", help="CLIPSEARCH_INDEX_DIR: FAISS shard files.")
]


ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="CLIPSEARCH_MODEL: an open_clip name (ViT-B-32), cn-clip:NAME or hf:FOLDER.",
    ),
]


PretrainedOpt = Annotated[
    str | None,
    typer.Option("--pretrained", help="CLIPSEARCH_PRETRAINED: pretrained tag or checkpoint path."),
]


DeviceOpt = Annotated[
    str | None, typer.Option("--device", help="CLIPSEARCH_DEVICE: auto, cpu, cuda or cuda:N.")
]


JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")]


# The options `index` and `schedule` share (each one overrides its setting for this run).
KindOpt = Annotated[
    str | None,
    typer.Option(help="CLIPSEARCH_INDEX_KIND for new shards: auto, flat, hnsw, ivf, ivfpq."),
]


BatchSizeOpt = Annotated[int | None, typer.Option(help="CLIPSEARCH_BATCH_SIZE.")]


WorkersOpt = Annotated[
    int | None, typer.Option(help="CLIPSEARCH_WORKERS: decoder processes (0 = inline).")
]


ShardSizeOpt = Annotated[
    int | None, typer.Option(help="CLIPSEARCH_SHARD_SIZE: vectors per shard and commit.")
]


ProgressOpt = Annotated[
    bool | None,
    typer.Option("--progress/--no-progress", help="Progress bars (default: on a terminal)."),
]


def open_catalog(settings: Settings) -> Catalog:
    """The catalog the settings name (not migrated: commands that write call `upgrade`)."""
    from retrieval.catalog.database import Catalog

    return Catalog(settings.resolved_database_url)


def encoder_factory(settings: Settings) -> Callable[[], Encoder]:
    """Loads the settings' model when called: a run with nothing to encode never loads it."""

    def build() -> Encoder:
        from retrieval.models.encoder import encoder_from_settings

        return encoder_from_settings(settings)

    return build

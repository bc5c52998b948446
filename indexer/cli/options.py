"""Options that several commands share, and the objects they build from the settings."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from retrieval.config import Settings

if TYPE_CHECKING:
    from retrieval.catalog.database import Catalog
    from retrieval.models.encoder import Encoder

# Defaults that depend on another setting, said in words.
_DERIVED_DEFAULTS = {
    "database_url": "sqlite:///<data dir>/catalog.db",
    "index_dir": "<data dir>/index",
}


def setting_default(field: str) -> str:
    """What an unset setting means, for --help: the value retrieval/config.py gives it here."""
    if field in _DERIVED_DEFAULTS:
        return _DERIVED_DEFAULTS[field]
    value = Settings.model_fields[field].get_default(call_default_factory=True)
    if isinstance(value, Path) and value.is_relative_to(Path.home()):
        return f"~/{value.relative_to(Path.home())}"
    return str(value)


def setting_help(variable: str, text: str, default: str | None = None) -> str:
    """An option's help: its variable, what it is, and its default (the setting's own)."""
    field = variable.removeprefix("CLIPSEARCH_").lower()
    return f"{variable}: {text} (default: {default or setting_default(field)})."


DataDirOpt = Annotated[
    Path | None,
    typer.Option("--data-dir", help=setting_help("CLIPSEARCH_DATA_DIR", "where state lives")),
]


DbOpt = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        help=setting_help("CLIPSEARCH_DATABASE_URL", "the catalog, sqlite:/// or postgresql://"),
    ),
]


IndexDirOpt = Annotated[
    Path | None,
    typer.Option("--index-dir", help=setting_help("CLIPSEARCH_INDEX_DIR", "FAISS shard files")),
]


ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        help=setting_help(
            "CLIPSEARCH_MODEL",
            "an open_clip name (ViT-B-32), cn-clip:NAME or hf:FOLDER",
            f"the index's model, else {setting_default('model')}",
        ),
    ),
]


# finetune reads no index: its model is the setting's.
StartModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        help=setting_help(
            "CLIPSEARCH_MODEL", "an open_clip name (ViT-B-32), cn-clip:NAME or hf:FOLDER"
        ),
    ),
]


PretrainedOpt = Annotated[
    str | None,
    typer.Option(
        "--pretrained",
        help=setting_help(
            "CLIPSEARCH_PRETRAINED",
            "pretrained tag or checkpoint path",
            f"the index's weights, else {setting_default('pretrained')}",
        ),
    ),
]


DeviceOpt = Annotated[
    str | None,
    typer.Option("--device", help=setting_help("CLIPSEARCH_DEVICE", "auto, cpu, cuda or cuda:N")),
]


JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")]


# The options `index` and `schedule` share (each one overrides its setting for this run).
KindOpt = Annotated[
    str | None,
    typer.Option(
        help=setting_help(
            "CLIPSEARCH_INDEX_KIND", "kind of new shards: auto, flat, hnsw, ivf, ivfpq"
        )
    ),
]


BatchSizeOpt = Annotated[
    int | None,
    typer.Option(help=setting_help("CLIPSEARCH_BATCH_SIZE", "images per forward pass")),
]


WorkersOpt = Annotated[
    int | None,
    typer.Option(
        help=setting_help(
            "CLIPSEARCH_WORKERS",
            "decoder processes, 0 decodes inline",
            f"{setting_default('workers')}: the CPU cores, at most 4",
        )
    ),
]


EngineOpt = Annotated[
    str | None,
    typer.Option(
        "--engine",
        help=setting_help(
            "CLIPSEARCH_ENGINE",
            "what decodes and encodes: local (this machine's cores or GPU) or ray (a Ray "
            "cluster: decoding tasks and one model per worker; needs clipsearch[ray]). "
            "Scanning, ids and every commit stay here either way",
        ),
    ),
]


RayAddressOpt = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        help=setting_help(
            "CLIPSEARCH_RAY_ADDRESS",
            "with --engine ray, the cluster to use: the head's host:port (6379 unless "
            "given), ray://host:port, or auto (the one running here); empty starts a Ray "
            "cluster on this machine for the job. Its nodes must see the image folders and "
            "the index dir at the same paths",
            "empty",
        ),
    ),
]


ShardSizeOpt = Annotated[
    int | None,
    typer.Option(help=setting_help("CLIPSEARCH_SHARD_SIZE", "vectors per shard and commit")),
]


ProgressOpt = Annotated[
    bool | None,
    typer.Option("--progress/--no-progress", help="Progress bars (default: on a terminal)."),
]


def model_flags(
    data_dir: Path | None,
    database_url: str | None,
    index_dir: Path | None,
    model: str | None,
    pretrained: str | None,
    device: str | None,
) -> dict[str, Any]:
    """The where and which-model flags most commands take, as `load_settings` keywords (None:
    not given, so the environment or the index's own model decides)."""
    return {
        "data_dir": data_dir,
        "database_url": database_url,
        "index_dir": index_dir,
        "model": model,
        "pretrained": pretrained,
        "device": device,
    }


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

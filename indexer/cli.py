"""The `clipsearch` command. Domain errors become one-line messages and exit codes here."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from retrieval.config import Settings, load_settings
from retrieval.errors import (
    BadQuery,
    ClipsearchError,
    ConfigError,
    CorruptShard,
    ImageError,
    IndexLocked,
    ModelMismatch,
    NotFound,
    WeightsUnavailable,
)

EXIT_CODES: dict[type[ClipsearchError], int] = {
    ConfigError: 2,
    BadQuery: 2,
    ImageError: 2,
    IndexLocked: 3,
    ModelMismatch: 4,
    WeightsUnavailable: 5,
    CorruptShard: 6,
    NotFound: 7,
}

HELP = """Self-hosted CLIP image search.

Index image folders with `clipsearch index DIR`, then query them with
`clipsearch search "a red car"`. Every option can also be set with a CLIPSEARCH_*
environment variable (flags win). Exit codes: 0 ok (bad images are reported, not fatal),
1 unexpected error, 2 bad setting, usage or input, 3 another indexer is running,
4 model differs from the index's, 5 model weights unavailable, 6 corrupt shard,
7 not found.
"""

app = typer.Typer(help=HELP, no_args_is_help=True, pretty_exceptions_enable=False)
db_app = typer.Typer(help="Catalog database: migrations.", no_args_is_help=True)
app.add_typer(db_app, name="db")

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
    str | None, typer.Option("--model", help="CLIPSEARCH_MODEL: open_clip architecture name.")
]
PretrainedOpt = Annotated[
    str | None,
    typer.Option("--pretrained", help="CLIPSEARCH_PRETRAINED: pretrained tag or checkpoint path."),
]
DeviceOpt = Annotated[
    str | None, typer.Option("--device", help="CLIPSEARCH_DEVICE: auto, cpu, cuda or cuda:N.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")]


def _settings(**overrides: Any) -> Settings:
    return load_settings(**overrides)


def _catalog(settings: Settings) -> Any:
    from retrieval.catalog import Catalog

    return Catalog(settings.resolved_database_url)


def _encoder_factory(settings: Settings) -> Any:
    def build() -> Any:
        from retrieval.encoder import ModelSpec, load_encoder

        return load_encoder(
            ModelSpec(
                name=settings.model,
                pretrained=settings.pretrained,
                device=settings.device,
                precision=settings.precision,
                config_dir=settings.model_config_dir,
                cache_dir=settings.model_cache_dir,
            )
        )

    return build


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, default=str))


@app.command()
def index(
    roots: Annotated[
        list[Path] | None,
        typer.Argument(help="Image folders to index (default: CLIPSEARCH_ROOTS)."),
    ] = None,
    kind: Annotated[
        str | None,
        typer.Option(help="CLIPSEARCH_INDEX_KIND for new shards: auto, flat, hnsw, ivf, ivfpq."),
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="CLIPSEARCH_BATCH_SIZE.")] = None,
    workers: Annotated[
        int | None, typer.Option(help="CLIPSEARCH_WORKERS: decoder processes (0 = inline).")
    ] = None,
    shard_size: Annotated[
        int | None, typer.Option(help="CLIPSEARCH_SHARD_SIZE: vectors per shard and commit.")
    ] = None,
    progress: Annotated[
        bool | None,
        typer.Option("--progress/--no-progress", help="Progress bars (default: on a terminal)."),
    ] = None,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
    index_dir: IndexDirOpt = None,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Index new, changed, moved and deleted images under ROOTS (incremental, crash-safe)."""
    from indexer.pipeline import IndexJob

    settings = _settings(
        data_dir=data_dir,
        database_url=database_url,
        index_dir=index_dir,
        model=model,
        pretrained=pretrained,
        device=device,
        index_kind=kind,
        batch_size=batch_size,
        workers=workers,
        shard_size=shard_size,
    )
    chosen_roots = [str(r) for r in (roots or settings.roots)]
    job = IndexJob(settings, _catalog(settings), _encoder_factory(settings), progress=progress)
    report = job.run(chosen_roots)
    if as_json:
        _print_json(report.to_dict())
        return
    typer.echo(
        f"generation {report.generation}: {report.new} new, {report.changed} changed, "
        f"{report.moved} moved, {report.copied} copied, {report.deleted} deleted, "
        f"{report.unchanged} unchanged, {len(report.failed)} failed "
        f"in {report.seconds:.1f}s"
        + (f" ({report.images_per_second:.1f} images/s encoded)" if report.encoded else "")
    )
    for failure in report.failed:
        typer.echo(f"  failed  {failure.reason:<18} {failure.path}  ({failure.detail})")


@app.command()
def compact(
    kind: Annotated[
        str, typer.Option(help="Index kind for the merged shards: auto, flat, hnsw, ivf, ivfpq.")
    ] = "auto",
    merge_all: Annotated[bool, typer.Option("--all", help="Rewrite every shard.")] = False,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
    index_dir: IndexDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Merge small shards and drop deleted vectors, from stored embeddings (no re-encoding)."""
    from indexer.jobs import compact_index

    settings = _settings(
        data_dir=data_dir, database_url=database_url, index_dir=index_dir, index_kind=kind
    )
    report = compact_index(
        _catalog(settings),
        settings.resolved_index_dir,
        kind=settings.index_kind,
        shard_size=settings.shard_size,
        merge_all=merge_all,
        grace_seconds=settings.retire_grace_seconds,
    )
    if as_json:
        _print_json(report.to_dict())
        return
    typer.echo(
        f"generation {report.generation}: {report.shards_before} shards -> {report.shards_after}, "
        f"dropped {report.dropped_vectors} deleted vectors, {report.live_vectors} vectors rewritten"
    )


@app.command()
def search(
    query: Annotated[str | None, typer.Argument(help="Text to search for.")] = None,
    image: Annotated[
        Path | None, typer.Option("--image", help="Search by this image instead of text.")
    ] = None,
    k: Annotated[int, typer.Option("-k", help="Number of results.")] = 10,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
    index_dir: IndexDirOpt = None,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Search the index from the shell by text or by an example image."""
    from retrieval.search import Searcher, SearchOptions

    if (query is None) == (image is None):
        raise ConfigError("query", "give either a text QUERY or --image PATH")
    settings = _settings(
        data_dir=data_dir,
        database_url=database_url,
        index_dir=index_dir,
        model=model,
        pretrained=pretrained,
        device=device,
    )
    catalog = _catalog(settings)
    catalog.upgrade()
    searcher = Searcher(
        catalog,
        settings.resolved_index_dir,
        _encoder_factory(settings)(),
        SearchOptions(
            ef_search=settings.hnsw_ef_search,
            nprobe=settings.ivf_nprobe,
            jpeg_draft=settings.jpeg_draft,
        ),
    )
    try:
        if image is not None:
            result = searcher.search_image(image, k, max_pixels=settings.max_image_pixels)
        else:
            assert query is not None
            result = searcher.search_text(query, k)
    finally:
        searcher.close()
    if as_json:
        _print_json(result.to_dict())
        return
    if not result.hits:
        typer.echo("no results (is anything indexed? run `clipsearch index DIR`)")
    for hit in result.hits:
        typer.echo(f"{hit.score:8.4f}  {hit.id:>8}  {hit.path}")


@app.command()
def status(
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
    index_dir: IndexDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show the index generation, shard and image counts, model, and recent failures."""
    settings = _settings(data_dir=data_dir, database_url=database_url, index_dir=index_dir)
    catalog = _catalog(settings)
    catalog.upgrade()
    state = catalog.state()
    shards = catalog.shards()
    counts = catalog.counts()
    info = {
        "generation": state.generation,
        "model": state.model,
        "shards": [{"id": s.id, "kind": s.kind, "count": s.count} for s in shards],
        "images": counts,
        "database": settings.resolved_database_url,
        "index_dir": str(settings.resolved_index_dir),
    }
    if as_json:
        _print_json(info)
        return
    model_name = f"{state.model['name']} / {state.model['pretrained']}" if state.model else "none"
    typer.echo(f"generation {state.generation}, model {model_name}")
    typer.echo(
        f"images: {counts.get('active', 0)} active, {counts.get('deleted', 0)} deleted, "
        f"{counts.get('error', 0)} failed; {len(shards)} shards "
        f"({sum(s.count for s in shards)} vectors)"
    )


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="CLIPSEARCH_HOST: address to bind.")] = None,
    port: Annotated[int | None, typer.Option(help="CLIPSEARCH_PORT: port to bind.")] = None,
    workers: Annotated[
        int, typer.Option("--workers", help="uvicorn worker processes (each loads the model).")
    ] = 1,
) -> None:
    """Run the HTTP API (uvicorn, factory api.app:create_app); settings come from CLIPSEARCH_*."""
    import uvicorn

    settings = _settings(host=host, port=port)  # validates the environment before forking
    uvicorn.run(
        "api.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=workers,
        log_level="info",
        timeout_graceful_shutdown=10,
    )


@db_app.command("upgrade")
def db_upgrade(data_dir: DataDirOpt = None, database_url: DbOpt = None) -> None:
    """Create or migrate the catalog schema to the newest version (safe to repeat)."""
    from retrieval.migrate import current_revision

    settings = _settings(data_dir=data_dir, database_url=database_url)
    catalog = _catalog(settings)
    catalog.upgrade()
    typer.echo(f"catalog at revision {current_revision(catalog.engine)}")


@app.command()
def demo(
    directory: Annotated[
        Path, typer.Option("--dir", help="Where to put the demo pictures and index.")
    ] = Path("demo-data"),
    count: Annotated[int, typer.Option(help="How many pictures to generate.")] = 240,
) -> None:
    """Generate a small picture folder, index it, and run a few searches (works offline)."""
    from indexer.demo import run_demo

    run_demo(directory, count, base=_settings(), echo=typer.echo)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except ClipsearchError as exc:
        code = next((c for t, c in EXIT_CODES.items() if isinstance(exc, t)), 1)
        typer.echo(f"error: {exc}", err=True)
        sys.exit(code)
    except KeyboardInterrupt:
        typer.echo("interrupted; nothing uncommitted was published", err=True)
        sys.exit(130)

"""`clipsearch index` and `compact`: the writer's commands (`schedule` repeats `index`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from indexer.cli.integrity import echo_corrupt_shards
from indexer.cli.options import (
    BatchSizeOpt,
    DataDirOpt,
    DbOpt,
    DeviceOpt,
    EngineOpt,
    IndexDirOpt,
    JsonOpt,
    KindOpt,
    ModelOpt,
    PretrainedOpt,
    ProgressOpt,
    RayAddressOpt,
    ShardSizeOpt,
    WorkersOpt,
    model_flags,
    open_catalog,
)
from indexer.cli.output import print_json, utc_text
from indexer.cli.reading import index_model, model_loader
from retrieval.config import Settings, load_settings
from retrieval.errors import ConfigError
from retrieval.models.device import DEVICE_SETTING, check_device

if TYPE_CHECKING:
    from indexer.pipeline import IndexReport
    from retrieval.catalog.tables import IndexJobRow


RootsArg = Annotated[
    list[Path] | None,
    typer.Argument(help="Image folders to index (default: CLIPSEARCH_ROOTS)."),
]
SinceLastRunOpt = Annotated[
    bool,
    typer.Option(
        "--since-last-run",
        help="For nightly jobs: require a previous index run in this catalog and report "
        "the changes since it. Every run is incremental anyway (it diffs the files against "
        "the catalog); this refuses an empty catalog (exit 2), so a job pointed at the "
        "wrong database or a lost volume does not silently re-encode everything.",
    ),
]
RebuildCatalogOpt = Annotated[
    bool,
    typer.Option(
        "--rebuild-catalog",
        help="Only after the catalog was lost (an index refused with exit 8 because the "
        "catalog holds no shard while the index dir does): move the old shards and "
        "index.json to INDEX_DIR/set-aside/<time>-<id>/ (nothing is deleted) and index every "
        "image again into a new index. Does nothing extra when the catalog owns the index dir.",
    ),
]
CompactKindOpt = Annotated[
    str,
    typer.Option(
        help="Index kind for the merged shards: auto, flat, hnsw, ivf, ivfpq; ivfpq-large folds "
        "every shard into a few large IVF-PQ shards (trained once, then only added to)."
    ),
]
MergeAllOpt = Annotated[bool, typer.Option("--all", help="Rewrite every shard.")]
RetrainOpt = Annotated[
    bool,
    typer.Option(
        "--retrain",
        help="With --kind ivfpq-large: train a new template on the whole corpus and rewrite "
        "every shard with it (a full rebuild; the report says when it is advised).",
    ),
]


def image_roots(arguments: list[Path] | None, settings: Settings) -> list[str]:
    """The folders to index: the ROOTS arguments, else CLIPSEARCH_ROOTS. ConfigError naming
    where a folder came from when there is none or one is missing, before anything is opened."""
    setting = "ROOTS" if arguments else "CLIPSEARCH_ROOTS"
    roots = arguments or settings.roots
    if not roots:
        raise ConfigError(setting, "no image folders given (pass ROOT arguments or set it)")
    for root in roots:
        if not root.exists():
            raise ConfigError(setting, f"{root} does not exist")
        if not root.is_dir():
            raise ConfigError(setting, f"{root} is not a directory")
    return [str(root) for root in roots]


def index_summary(report: IndexReport) -> str:
    return (
        f"generation {report.generation}: {report.new} new, {report.changed} changed, "
        f"{report.moved} moved, {report.copied} copied, {report.deleted} deleted, "
        f"{report.unchanged} unchanged, {len(report.failed)} failed "
        f"in {report.seconds:.1f}s"
        + (
            f" ({report.images_per_second:.1f} images/s encoded{_on_engine(report)})"
            if report.encoded
            else ""
        )
    )


def _on_engine(report: IndexReport) -> str:
    if report.engine == "local":
        return ""
    actors = "actor" if report.encoders == 1 else "actors"
    return f" by {report.encoders} {report.engine} encode {actors}"


def echo_failures(report: IndexReport) -> None:
    for failure in report.failed:
        typer.echo(f"  failed  {failure.reason:<18} {failure.path}  ({failure.detail})")


def _job_summary(job: IndexJobRow) -> dict[str, Any]:
    return {
        "job": job.id,
        "status": job.status,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "generation": job.generation,
        "roots": job.roots,
    }


def index(
    roots: RootsArg = None,
    kind: KindOpt = None,
    batch_size: BatchSizeOpt = None,
    workers: WorkersOpt = None,
    shard_size: ShardSizeOpt = None,
    engine: EngineOpt = None,
    ray_address: RayAddressOpt = None,
    progress: ProgressOpt = None,
    since_last_run: SinceLastRunOpt = False,
    rebuild_catalog: RebuildCatalogOpt = False,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
    index_dir: IndexDirOpt = None,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Index new, changed, moved and deleted images under ROOTS (incremental, crash-safe)."""
    from indexer.binding import claim_problem
    from retrieval.catalog.schema import read_schema

    settings = load_settings(
        **model_flags(data_dir, database_url, index_dir, model, pretrained, device),
        index_kind=kind,
        batch_size=batch_size,
        workers=workers,
        shard_size=shard_size,
        engine=engine,
        ray_address=ray_address,
    )
    chosen_roots = image_roots(roots, settings)
    if settings.engine == "ray":
        # In seconds, before the catalog and the model: ray missing, or no cluster there.
        from indexer.engines.ray import check_reachable, import_ray

        import_ray()
        check_reachable(
            settings.ray_address, "--ray-address" if ray_address else "CLIPSEARCH_RAY_ADDRESS"
        )
    catalog = open_catalog(settings)
    previous = None
    if since_last_run and read_schema(catalog).holds_catalog:
        catalog.upgrade()
        previous = catalog.last_finished_job("index")
    if since_last_run and previous is None:
        # A lost catalog is the likelier story when the index dir holds an index: say so.
        problem = claim_problem(catalog, settings.resolved_index_dir)
        if problem is not None:
            raise problem
        raise typer.BadParameter(
            f"the catalog {catalog.shown_url} has no previous index run. Check "
            "CLIPSEARCH_DATABASE_URL; for the very first run, leave this flag out (a first "
            "run encodes every image).",
            param_hint="'--since-last-run'",
        )
    # An index keeps its model unless one is named; a named one that cannot be the index's is
    # refused now, before the scan and the model load.
    choice = index_model(settings, catalog)
    settings = choice.settings
    check_device(settings.device, "--device" if device else DEVICE_SETTING)
    from indexer.pipeline import IndexJob  # torch: after the checks that need none

    job = IndexJob(
        settings,
        catalog,
        model_loader(choice),
        progress=progress,
        rebuild_catalog=rebuild_catalog,
    )
    report = job.run(chosen_roots)
    if as_json:
        since = {"since": _job_summary(previous)} if previous is not None else {}
        print_json({**report.to_dict(), **since})
        return
    if report.set_aside:
        typer.echo(
            f"rebuilt the catalog: the previous index is set aside in {report.set_aside} "
            "(delete it when no longer needed)"
        )
    if previous is not None:
        typer.echo(
            f"since job {previous.id} ({previous.status}, started {utc_text(previous.started_at)}):"
        )
    typer.echo(index_summary(report))
    echo_failures(report)
    if report.photo_info_read:
        typer.echo(
            f"  read capture dates and cameras of {report.photo_info_read} images indexed "
            "before they were kept (headers only)"
        )
    for set_name, count in report.labelled.items():
        if count:
            typer.echo(f"  labelled {count} images with label set {set_name}")
    echo_corrupt_shards(report.corrupt_shards)


def compact(
    kind: CompactKindOpt = "auto",
    merge_all: MergeAllOpt = False,
    retrain: RetrainOpt = False,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
    index_dir: IndexDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Merge small shards and drop deleted vectors, from stored embeddings (no re-encoding)."""
    from indexer.compact import compact_index
    from indexer.compact_large import LargeOptions
    from retrieval.index.faiss_gpu import resolve_faiss_gpu

    settings = load_settings(
        data_dir=data_dir, database_url=database_url, index_dir=index_dir, index_kind=kind
    )
    report = compact_index(
        open_catalog(settings),
        settings.resolved_index_dir,
        kind=settings.index_kind,
        shard_size=settings.shard_size,
        merge_all=merge_all,
        grace_seconds=settings.retire_grace_seconds,
        use_gpu=resolve_faiss_gpu(settings.faiss_gpu, settings.device),
        large=LargeOptions(
            shard_size=settings.large_shard_size,
            nlist=settings.large_nlist,
            pq_m=settings.large_pq_m,
            retrain=retrain,
        ),
    )
    if as_json:
        print_json(report.to_dict())
        return
    typer.echo(
        f"generation {report.generation}: {report.shards_before} shards -> {report.shards_after}, "
        f"dropped {report.dropped_vectors} deleted vectors, {report.live_vectors} vectors rewritten"
    )
    if report.large is not None and report.large.trained_id:
        large = report.large
        trained = "trained now" if large.trained_now else "no training"
        typer.echo(
            f"  ivfpq-large template {large.trained_id} ({trained}; trained for "
            f"{large.corpus_at_training} vectors, on a sample of {large.trained_on}): added "
            f"{large.added_vectors}, carried {large.carried_vectors}; read "
            f"{large.bytes_read / 2**30:.2f} GiB, wrote {large.bytes_written / 2**30:.2f} GiB; "
            f"{large.large_vectors} vectors in large shards ({large.growth:.1f}x)"
        )
        if large.retrain_advised:
            typer.echo(f"  retrain advised: {large.advice}")
    if report.corrupt:
        typer.echo("left out of the compaction (their vectors are never rewritten):", err=True)
        echo_corrupt_shards(report.corrupt)

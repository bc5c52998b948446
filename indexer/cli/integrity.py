"""`clipsearch verify` and `repair`: find corrupt shard files, and replace the shards they break."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from indexer.cli.options import (
    DataDirOpt,
    DbOpt,
    DeviceOpt,
    IndexDirOpt,
    JsonOpt,
    ModelOpt,
    PretrainedOpt,
    ProgressOpt,
    model_flags,
    open_catalog,
)
from indexer.cli.output import EXIT_CODES, print_json
from indexer.cli.reading import index_model, model_loader, open_existing_catalog
from retrieval.config import load_settings
from retrieval.errors import CorruptShard

if TYPE_CHECKING:
    from indexer.repair import RepairReport
    from indexer.verify import VerifyReport

REPAIR_HINT = "clipsearch repair"
# What `verify` exits with when it finds anything wrong: the code of CorruptShard.
CORRUPT_EXIT = EXIT_CODES[CorruptShard]

VERIFY_HELP = (
    "Check every shard of the index, byte for byte, and print what is wrong.\n\n"
    "Reads every file of every active shard (no cached result is trusted) and checks: its "
    "sha256 against shard.json, shard.json against the catalog, the array headers, that ids "
    "ascend and match the catalog's images, that every stored vector is of unit length, and "
    "that the FAISS index opens and scores sanely. It also reports shards the service stopped "
    "serving because they returned an impossible score.\n\n"
    f"Exit status 0 when everything is sound, {CORRUPT_EXIT} when anything is wrong (run "
    "`clipsearch repair`). Safe while the API and an indexer run: it only reads."
)

REPAIR_HELP = (
    "Replace corrupt shards with sound ones, recovering every vector that can be trusted.\n\n"
    "For each corrupt shard (as `clipsearch verify` finds them), each image's vector comes "
    "from its shard's embeddings.npy if that file passes its checksum, else from index.faiss "
    "if that passes and keeps exact vectors, else the image file is encoded again if it still "
    "has the bytes that were indexed. Images with none of these are reported as unrecoverable "
    "and recorded as failed (reason vector_lost): the next `clipsearch index` retries them if "
    "their file changes or comes back.\n\n"
    "Each repaired shard is committed like a compaction (a new shard, the corrupt one retired), "
    "so the API serves it at its next reload and a repair killed half way loses nothing. "
    "Encoding needs the index's model; rebuilding from stored vectors does not load it. "
    "Use --dry-run first to see what would be recovered."
)

ShardOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--shard", help="Repair only this shard (repeatable; default: every corrupt one)."
    ),
]
DryRunOpt = Annotated[
    bool, typer.Option("--dry-run", help="Check and report what would be recovered; write nothing.")
]


def echo_corrupt_shards(corrupt: dict[str, str], *, err: bool = True) -> None:
    """Name each corrupt shard, what is wrong, and the command that repairs it."""
    if not corrupt:
        return
    typer.echo(
        f"DEGRADED: {len(corrupt)} corrupt shard(s), not served; repair with `{REPAIR_HINT}`:",
        err=err,
    )
    for shard_id, problem in sorted(corrupt.items()):
        typer.echo(f"  shard {shard_id}: {problem}", err=err)


def verify(
    progress: ProgressOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
    index_dir: IndexDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Check every shard of the index and print what is wrong (exit 6 if anything is)."""
    from indexer.verify import verify_index

    settings = load_settings(data_dir=data_dir, database_url=database_url, index_dir=index_dir)
    catalog = open_existing_catalog(settings)
    report = verify_index(catalog, settings.resolved_index_dir, progress=progress)
    if as_json:
        print_json(report.to_dict())
    else:
        _echo_verify(report)
    if not report.ok:
        raise typer.Exit(CORRUPT_EXIT)


def _echo_verify(report: VerifyReport) -> None:
    size = report.bytes / 2**20
    summary = f"checked {report.shards} shards ({size:.1f} MiB) in {report.seconds:.1f}s"
    if report.ok:
        typer.echo(f"{summary}: all sound")
    else:
        typer.echo(f"{summary}: {len(report.corrupt)} corrupt")
    for shard_id, problems in sorted(report.corrupt.items()):
        typer.echo(f"corrupt shard {shard_id}:")
        for name, problem in problems.items():
            typer.echo(f"  {name}: {problem}")
    for problem in report.catalog_problems:
        typer.echo(f"catalog: {problem}")
    if report.orphans:
        typer.echo(
            f"{len(report.orphans)} shard directories without a catalog row (left by interrupted "
            "jobs; the next index or compact removes them)"
        )
    if report.corrupt:
        typer.echo(f"run `{REPAIR_HINT}` to replace the corrupt shards")


def repair(
    shards: ShardOpt = None,
    dry_run: DryRunOpt = False,
    progress: ProgressOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
    index_dir: IndexDirOpt = None,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Replace corrupt shards with sound ones, recovering every vector that can be trusted."""
    from indexer.repair import RepairJob

    settings = load_settings(
        **model_flags(data_dir, database_url, index_dir, model, pretrained, device),
    )
    catalog = open_catalog(settings)
    # Images encoded again must get the index's own model (recorded in the catalog), not
    # whatever the environment names: a mismatch is refused before any weights load.
    choice = index_model(settings, catalog)
    job = RepairJob(choice.settings, catalog, model_loader(choice), progress=progress)
    report = job.run(shards or None, dry_run=dry_run)
    if as_json:
        print_json(report.to_dict())
        return
    _echo_repair(report)


def _echo_repair(report: RepairReport) -> None:
    if not report.repaired:
        typer.echo(f"all {report.healthy} shards are sound; nothing to repair")
        return
    verb = "would replace" if report.dry_run else "replaced"
    for shard in report.repaired:
        problems = "; ".join(f"{name}: {why}" for name, why in shard.problems.items())
        typer.echo(f"shard {shard.shard_id} ({problems})")
        sources = ", ".join(f"{count} from {source}" for source, count in shard.recovered.items())
        target = f" by shard {shard.new_shard}" if shard.new_shard else ""
        typer.echo(
            f"  {verb}{target}: {sources or 'no vector recovered'}; "
            f"{shard.dropped_deleted} deleted images dropped, {len(shard.lost)} unrecoverable"
        )
        for image in shard.lost:
            typer.echo(f"  unrecoverable  {image.id:>8}  {image.path}  ({image.reason})")
    if report.dry_run:
        typer.echo("dry run: nothing was written")
    else:
        typer.echo(f"generation {report.generation}; {report.healthy} shards were already sound")

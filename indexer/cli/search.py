"""`clipsearch search` and `status`: reading the index from the shell."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from indexer.cli.integrity import REPAIR_HINT, echo_corrupt_shards
from indexer.cli.options import (
    DataDirOpt,
    DbOpt,
    DeviceOpt,
    IndexDirOpt,
    JsonOpt,
    ModelOpt,
    PretrainedOpt,
    model_flags,
)
from indexer.cli.output import print_json
from indexer.cli.reading import open_existing_catalog, open_for_reading, require_images
from retrieval.config import Settings, load_settings
from retrieval.errors import ConfigError
from retrieval.models.device import DEVICE_SETTING, check_device
from retrieval.models.identity import RANDOM_WEIGHTS_WARNING, recorded_random_weights

if TYPE_CHECKING:
    from retrieval.search import SearchResult

QueryArg = Annotated[str | None, typer.Argument(help="Text to search for.")]
ImageOpt = Annotated[
    Path | None,
    typer.Option("--image", help="Search by this image instead of text (default: the text QUERY)."),
]
KOpt = Annotated[int, typer.Option("-k", help="Number of results.")]
LabelNamesOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--label",
        help="Only images carrying this zero-shot label (repeatable; default: no label filter).",
    ),
]
LabelsModeOpt = Annotated[str, typer.Option(help="With several --label: any (one of them) or all.")]
LabelMinScoreOpt = Annotated[
    float, typer.Option(help="Smallest probability a --label counts with.")
]
LabelSetOpt = Annotated[
    str | None, typer.Option(help="Match --label in this label set only (default: all).")
]


def _moment(text: str) -> dt.datetime:
    """An ISO 8601 date, or date and time; without an offset it is UTC, as in the API."""
    try:
        moment = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise typer.BadParameter(
            f"not a date or time: {text!r} (e.g. 2024-06-01 or 2024-06-01T18:30:00+02:00)"
        ) from None
    return moment.replace(tzinfo=dt.UTC) if moment.tzinfo is None else moment.astimezone(dt.UTC)


TakenAfterOpt = Annotated[
    dt.datetime | None,
    typer.Option(
        parser=_moment,
        metavar="WHEN",
        help="Only photos taken at or after WHEN (2024-06-01, or 2024-06-01T18:30:00+02:00; no "
        "offset: UTC): EXIF DateTimeOriginal, else the file's time (default: no bound).",
    ),
]
TakenBeforeOpt = Annotated[
    dt.datetime | None,
    typer.Option(
        parser=_moment, metavar="WHEN", help="Only photos taken before WHEN (default: no bound)."
    ),
]
CameraOpt = Annotated[
    str | None,
    typer.Option(
        help='Only photos from this camera: its model, or make and model ("iPhone 15 Pro", '
        '"Apple iPhone 15 Pro"), ignoring case (default: any camera).'
    ),
]


def search(
    query: QueryArg = None,
    image: ImageOpt = None,
    k: KOpt = 10,
    label_names: LabelNamesOpt = None,
    labels_mode: LabelsModeOpt = "any",
    label_min_score: LabelMinScoreOpt = 0.0,
    label_set: LabelSetOpt = None,
    taken_after: TakenAfterOpt = None,
    taken_before: TakenBeforeOpt = None,
    camera: CameraOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
    index_dir: IndexDirOpt = None,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Search the index from the shell by text or by an example image."""
    if (query is None) == (image is None):
        raise ConfigError("query", "give either a text QUERY or --image PATH")
    # Everything that needs no model first: the data dir, an empty index, the model's identity.
    reading = open_for_reading(
        need_images=False,
        **model_flags(data_dir, database_url, index_dir, model, pretrained, device),
    )
    settings = reading.settings
    # An unknown label or a bad query image is a bad argument (exit 2), told before the model.
    ids, label_store = None, None
    photo_filter = taken_after or taken_before or camera
    if label_names or label_set or labels_mode != "any" or label_min_score or photo_filter:
        from retrieval.filters import SearchFilters, ids_passing
        from retrieval.labels.store import LabelStore

        filters = SearchFilters(
            labels=tuple(label_names or ()),
            labels_mode=labels_mode,
            label_min_score=label_min_score,
            label_set=label_set,
            taken_after=taken_after,
            taken_before=taken_before,
            camera=camera,
        )
        label_store = LabelStore(reading.catalog)
        ids = ids_passing(reading.catalog, filters, label_store)
    if image is not None:
        from retrieval.images import read_header

        read_header(image, max_pixels=settings.max_image_pixels)
    require_images(reading.catalog)
    check_device(settings.device, "--device" if device else DEVICE_SETTING)
    from retrieval.search import Searcher  # torch and FAISS: after every cheap check

    searcher = Searcher.from_settings(
        reading.catalog, settings, reading.encoder_factory()(), label_store=label_store
    )
    if searcher.encoder is not None and searcher.encoder.identity.random_weights:
        typer.echo(f"warning: {RANDOM_WEIGHTS_WARNING}", err=True)
    try:
        if image is not None:
            result = searcher.search_image(image, k, allowed_ids=ids)
        else:
            assert query is not None
            result = searcher.search_text(query, k, allowed_ids=ids)
        corrupt = searcher.snapshot().shards.corrupt_shards
    finally:
        searcher.close()
    echo_corrupt_shards(corrupt)  # on stderr: the results miss those shards' images
    if as_json:
        print_json(result.to_dict())
        return
    echo_hits(result)


def echo_hits(result: SearchResult) -> None:
    """A header, then score, id, path and best labels of each hit: the order the README gives."""
    if not result.hits:
        typer.echo("no results (no image matches the filters)")
        return
    labelled = any(hit.labels for hit in result.hits)
    typer.echo(f"{'score':>8}  {'id':>8}  path" + ("  [labels]" if labelled else ""))
    for hit in result.hits:
        labels = ", ".join(f"{x.label} {x.score:.2f}" for x in hit.labels[:3])
        suffix = f"  [{labels}]" if labels else ""
        typer.echo(f"{hit.score:8.4f}  {hit.id:>8}  {hit.path}{suffix}")


def places(settings: Settings) -> dict[str, str]:
    """Where the index lives: the data dir, the catalog's URL (password masked), the index dir."""
    from retrieval.catalog.copy import display_url

    return {
        "data_dir": str(settings.data_dir),
        "database": display_url(settings.resolved_database_url),
        "index_dir": str(settings.resolved_index_dir),
    }


def echo_places(where: dict[str, str]) -> None:
    for label, key in (
        ("data dir", "data_dir"),
        ("database", "database"),
        ("index dir", "index_dir"),
    ):
        missing = key != "database" and not Path(where[key]).is_dir()
        typer.echo(f"{label + ':':<11}{where[key]}" + ("  (does not exist)" if missing else ""))


def status(
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
    index_dir: IndexDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show the index generation, shard and image counts, model, corrupt shards, and failures.

    Each shard's files are hashed unless a verified mark vouches for them (see `verify`).
    """
    from indexer.compact_large import large_status
    from indexer.verify import corrupt_shards

    settings = load_settings(data_dir=data_dir, database_url=database_url, index_dir=index_dir)
    where = places(settings)
    if not as_json:  # first: where it looked is what a wrong setting needs to be seen
        echo_places(where)
    # No catalog (exit 9, or 8 beside an index) or one at another schema revision (exit 11).
    catalog = open_existing_catalog(settings)
    # A lost, reset or other index's catalog would read as an empty index: name it (exit 8).
    from indexer.binding import claim_problem

    problem = claim_problem(catalog, settings.resolved_index_dir, writing=False)
    if problem is not None:
        raise problem
    state = catalog.state()
    shards = catalog.shards()
    counts = catalog.counts()
    corrupt = corrupt_shards(catalog, settings.resolved_index_dir)
    large = large_status(settings.resolved_index_dir, shards)
    info = {
        "generation": state.generation,
        "model": state.model,
        "shards": [
            {"id": s.id, "kind": s.kind, "count": s.count, "corrupt": corrupt.get(s.id)}
            for s in shards
        ],
        "images": counts,
        "degraded": bool(corrupt),
        "corrupt_shards": corrupt,
        "repair": REPAIR_HINT if corrupt else None,
        "random_weights": recorded_random_weights(state.model),
        "large_index": large,
        **where,
    }
    if as_json:
        print_json(info)
        return
    model_name = f"{state.model['name']} / {state.model['pretrained']}" if state.model else "none"
    typer.echo(f"generation {state.generation}, model {model_name}")
    if info["random_weights"]:
        typer.echo(f"warning: {RANDOM_WEIGHTS_WARNING}")
    typer.echo(
        f"images: {counts.get('active', 0)} active, {counts.get('deleted', 0)} deleted, "
        f"{counts.get('error', 0)} failed; {len(shards)} shards "
        f"({sum(s.count for s in shards)} vectors)"
    )
    if large is not None and "problem" in large:
        typer.echo(f"ivfpq-large template {large['trained_id']}: {large['problem']}")
    elif large is not None:
        typer.echo(
            f"ivfpq-large: {large['large_shards']} shards, {large['large_vectors']} vectors, "
            f"{large['growth']:.1f}x the {large['corpus_at_training']} its template "
            f"{large['trained_id']} was trained for"
            + (f"; retrain advised: {large['advice']}" if large["retrain_advised"] else "")
        )
    echo_corrupt_shards(corrupt, err=False)

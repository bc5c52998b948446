"""`clipsearch labels` (label set definitions) and `label` (labelling the corpus)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
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
    setting_help,
)
from indexer.cli.output import echo_table, print_json
from indexer.cli.reading import open_existing_catalog, open_for_reading
from retrieval.config import Settings, load_settings
from retrieval.errors import ConfigError

if TYPE_CHECKING:
    from retrieval.labels.store import LabelStore

labels_app = typer.Typer(
    help="Zero-shot label sets: add (or change) from a file, list, show, delete.",
    no_args_is_help=True,
)


def _label_store(settings: Settings) -> LabelStore:
    from retrieval.labels.store import LabelStore

    return LabelStore(open_existing_catalog(settings))


@labels_app.command("add")
def labels_add(
    file: Annotated[
        Path,
        typer.Argument(
            help="A YAML or JSON label set: name, labels (names, or objects with synonyms, "
            "prompts, threshold, min_cosine), templates (openai, simple, photo, zh, zh-photo, "
            "zh-simple, a list, or a file of one template per line), top_k, threshold, "
            "min_cosine, store_cosine."
        ),
    ],
    name: Annotated[
        str | None, typer.Option("--name", help="Set name (default: the file's, or its stem).")
    ] = None,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add a label set, or change one: a changed definition becomes a new version, and the next
    `clipsearch label` (or `clipsearch index`) relabels the corpus with it."""
    from retrieval.labels.definitions import load_label_set_file

    settings = load_settings(data_dir=data_dir, database_url=database_url)
    definition = load_label_set_file(file, name=name)
    # The same bound as a set put over the API: no stored set costs more to encode.
    definition.require_prompts_within(
        settings.label_set_max_prompts, "CLIPSEARCH_LABEL_SET_MAX_PROMPTS"
    )
    stored, outcome = _label_store(settings).put(definition)
    if as_json:
        print_json({"outcome": outcome, **stored.to_dict()})
        return
    typer.echo(
        f"{outcome} label set {stored.name}: version {stored.version}, "
        f"{len(stored.definition.labels)} labels"
        + ("" if outcome == "unchanged" else "; run `clipsearch label` to label the corpus")
    )


@labels_app.command("list")
def labels_list(
    data_dir: DataDirOpt = None, database_url: DbOpt = None, as_json: JsonOpt = False
) -> None:
    """List the label sets: version, the version labelled in the corpus, label count."""
    settings = load_settings(data_dir=data_dir, database_url=database_url)
    stored = _label_store(settings).all()
    if as_json:
        print_json({"label_sets": [s.to_dict() for s in stored]})
        return
    if not stored:
        typer.echo("no label sets (add one with `clipsearch labels add FILE`)")
        return
    rows = [["name", "version", "labelled", "labels", "templates"]]
    for s in stored:
        templates = s.definition.templates
        rows.append(
            [
                s.name,
                str(s.version),
                "-" if s.labelled_version is None else str(s.labelled_version),
                str(len(s.definition.labels)),
                templates if isinstance(templates, str) else f"{len(templates)} own",
            ]
        )
    echo_table(rows)


@labels_app.command("show")
def labels_show(
    name: Annotated[str, typer.Argument(help="Label set name.")],
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a label set's definition and how many images carry each label."""
    settings = load_settings(data_dir=data_dir, database_url=database_url)
    store = _label_store(settings)
    stored = store.get(name)
    counts = store.counts(name)
    if as_json:
        print_json({**stored.to_dict(), "counts": counts.to_dict()})
        return
    definition = stored.definition
    labelled = "never" if counts.version is None else f"version {counts.version}"
    typer.echo(
        f"label set {stored.name}: version {stored.version}, corpus labelled with {labelled}; "
        f"top {definition.top_k} stored, threshold {definition.threshold}"
        + (f", min cosine {definition.min_cosine}" if definition.min_cosine is not None else "")
    )
    rows = [["label", "images", "settings"]]
    for label in definition.labels:
        options = label.options()
        rows.append(
            [
                label.name,
                str(counts.counts.get(label.name, 0)),
                json.dumps(options) if options else "",
            ]
        )
    rows.append(["(unlabelled)", str(counts.unlabelled), ""])
    echo_table(rows)


@labels_app.command("delete")
def labels_delete(
    name: Annotated[str, typer.Argument(help="Label set name.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
) -> None:
    """Delete a label set with all its versions and every label stored under it."""
    settings = load_settings(data_dir=data_dir, database_url=database_url)
    store = _label_store(settings)
    store.get(name)  # NotFound (exit 7) before asking
    if not yes:
        if not sys.stdin.isatty():
            raise ConfigError("--yes", "deleting a label set needs --yes when not on a terminal")
        typer.confirm(f"Delete label set {name} and all its labels?", abort=True)
    store.delete(name)
    typer.echo(f"deleted label set {name}")


def label(
    set_names: Annotated[
        list[str] | None,
        typer.Option("--set", help="Label with this set only (repeatable; default: all)."),
    ] = None,
    block_size: Annotated[
        int | None,
        typer.Option(
            help=setting_help(
                "CLIPSEARCH_LABEL_BLOCK_SIZE", "vectors scored at once, which bounds memory"
            )
        ),
    ] = None,
    progress: ProgressOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
    index_dir: IndexDirOpt = None,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Label the corpus with every label set (or --set NAME), from the stored embeddings.

    No image is decoded: stored vectors are scored against each set's class embeddings in
    blocks. Only images not yet labelled under a set's newest version are scored; an edited
    set relabels everything beside the served labels and switches over in one commit. The
    model is loaded only to encode the labels' prompts, once per set version (then cached).
    """
    # The index's model unless one is named; a data dir that does not exist or a model that is
    # not the index's is refused before any weights are loaded (or torch imported).
    reading = open_for_reading(
        need_images=False,
        **model_flags(data_dir, database_url, index_dir, model, pretrained, device),
        label_block_size=block_size,
    )
    from indexer.labelling import LabelJob

    job = LabelJob(reading.settings, reading.catalog, reading.encoder_factory(), progress=progress)
    report = job.run(set_names)
    if as_json:
        print_json(report.to_dict())
        return
    if not report.sets:
        typer.echo("no label sets (add one with `clipsearch labels add FILE`)")
    for entry in report.sets:
        if entry.skipped:
            typer.echo(f"{entry.set}: skipped ({entry.skipped})")
            continue
        typer.echo(
            f"{entry.set} version {entry.version}: {entry.images} images labelled in "
            f"{entry.shards} shards ({entry.images - entry.labelled} under every threshold) "
            f"in {entry.seconds:.1f}s" + ("; now served" if entry.published else "")
        )
        if entry.corrupt_shards:
            typer.echo(
                f"  not labelled, corrupt: {', '.join(entry.corrupt_shards)} "
                "(`clipsearch repair` replaces them and labels the new shards)",
                err=True,
            )

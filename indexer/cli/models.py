"""`clipsearch models`: the recommended models, and getting their weights onto a machine."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from indexer.cli.options import JsonOpt, ProgressOpt
from indexer.cli.output import echo_table, print_json
from retrieval.config import load_settings

MODELS_HELP = (
    "The recommended models (family, languages, dimension, download size, CPU speed, where the "
    "weights come from, whether they are here), and getting their weights: `fetch` downloads "
    "them where there is internet, `import` installs weights carried over by hand."
)

models_app = typer.Typer(help=MODELS_HELP)

NameArg = Annotated[
    str,
    typer.Argument(
        help="A recommended model (`clipsearch models`), or any CLIPSEARCH_MODEL value "
        "(an open_clip name with --pretrained TAG, cn-clip:NAME, hf:ORG/NAME)."
    ),
]
PretrainedOpt = Annotated[
    str | None,
    typer.Option(
        "--pretrained",
        help="The weights' tag, for a model that is not a recommended one (default: the "
        "recommended model's).",
    ),
]


@models_app.callback(invoke_without_command=True)
def models(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """The recommended models; `fetch` and `import` get their weights."""
    if ctx.invoked_subcommand is None:
        models_list(as_json)


@models_app.command("list")
def models_list(as_json: JsonOpt = False) -> None:
    """List the recommended models and whether their weights are here."""
    from retrieval.models.cache import weights_here
    from retrieval.models.recommended import recommended_models, table_note

    cache_dir = load_settings().model_cache_dir
    rows = []
    for row in recommended_models():
        needs = [need.repo for need in row.needs]
        here = weights_here(row.family, row.weights.repo, row.weights.files, needs, cache_dir)
        rows.append((row, here))
    if as_json:
        print_json(
            {
                "models": [{**row.to_dict(), "here": here} for row, here in rows],
                "about": table_note(),
            }
        )
        return
    table = [["name", "family", "languages", "dim", "download", "CPU text/images", "here"]]
    for row, here in rows:
        speed = (
            f"{row.speed.text_query_ms:g} ms / {row.speed.images_per_s:g}/s"
            if row.speed
            else "not measured"
        )
        table.append(
            [
                row.name,
                row.family,
                row.languages,
                str(row.dim),
                f"~{row.fp32_bytes / 1e6:,.0f} MB",
                speed,
                "yes" if here else "no",
            ]
        )
    echo_table(table)
    typer.echo("")
    for row, _ in rows:
        weights = f" {row.weights.files[0]}" if row.weights.files else " (folder)"
        also = f"; also {', '.join(n.repo for n in row.needs)}" if row.needs else ""
        typer.echo(
            f"{row.name}: CLIPSEARCH_MODEL={row.model} CLIPSEARCH_PRETRAINED={row.pretrained!r}; "
            f"weights: {row.weights.repo}{weights}{also}"
        )
    typer.echo("")
    typer.echo(
        "download: fp32 weights, parameters x 4 bytes. CPU: text-query p50 and images/s on a "
        "2-core Xeon, measured by bench/model_families.py. Get weights: clipsearch models fetch "
        "NAME (with internet), clipsearch models import FILE_OR_FOLDER (without)."
    )


@models_app.command("fetch")
def models_fetch(
    name: NameArg,
    pretrained: PretrainedOpt = None,
    progress: ProgressOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Download a model's weights (and the tokenizer or text-tower repos it reads) into the cache
    the service reads: CLIPSEARCH_MODEL_CACHE_DIR, else the Hugging Face cache."""
    from retrieval.models.fetch import fetch, weights_source

    settings = load_settings()
    source = weights_source(name, pretrained, settings.model_config_dir)
    shown = sys.stderr.isatty() if progress is None else progress
    report = fetch(source, settings.model_cache_dir, progress=shown)
    if as_json:
        print_json(report.to_dict())
        return
    for file in report.files:
        checksum = f", sha256 {file.sha256}" if file.sha256 else ""
        typer.echo(f"fetched {file.path} ({file.size:,} bytes{checksum})")
    typer.echo(
        f"ready: CLIPSEARCH_MODEL={source.model}"
        + (f" CLIPSEARCH_PRETRAINED={source.pretrained}" if source.pretrained else "")
    )
    typer.echo("to use them on a machine without internet, copy these folders there:")
    for folder in report.folders:
        typer.echo(f"  {folder}")
    typer.echo("and run there: clipsearch models import FOLDER (once for each folder)")


@models_app.command("import")
def models_import(
    path: Annotated[
        Path,
        typer.Argument(
            help="A weights file (.pt, .bin, .safetensors), a Hugging Face model folder "
            "(config.json, weights, tokenizer), or a hub cache folder models--ORG--NAME "
            "(what `models fetch` prints).",
        ),
    ],
    name: Annotated[
        str | None,
        typer.Option(
            "--name",
            help="Which model the weights are: a recommended model, a CLIPSEARCH_MODEL value "
            "(with --pretrained), or hf:ORG/NAME for a folder. Not needed for a hub cache "
            "folder or a Chinese-CLIP release file (default: told by the folder or file).",
        ),
    ] = None,
    pretrained: PretrainedOpt = None,
    sha256: Annotated[
        str | None,
        typer.Option(
            "--sha256",
            help="The file's sha256 as the hub shows it; a different file is refused (default: "
            "the sha256 the recommended table or the hub cache records, where one does).",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check weights carried over by hand (sha256, size, tensors against the architecture) and
    install them where the service finds them; nothing is installed when a check fails."""
    from retrieval.models.install import install

    settings = load_settings()
    installed = install(
        path,
        name=name,
        pretrained=pretrained,
        sha256=sha256,
        cache_dir=settings.model_cache_dir,
        config_dir=settings.model_config_dir,
    )
    if as_json:
        print_json(installed.to_dict())
        return
    typer.echo(f"installed {path} as {installed.target}")
    for check in installed.checks:
        typer.echo(f"  checked: {check}")
    for warning in installed.warnings:
        typer.echo(f"  not checked: {warning}", err=True)
    if installed.models:
        typer.echo(f"for: {', '.join(installed.models)}")

"""`clipsearch export`: the model's towers as ONNX graphs, verified against torch and cached."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Annotated, Any

import typer

from indexer.cli.options import (
    DataDirOpt,
    DbOpt,
    JsonOpt,
    ModelOpt,
    PretrainedOpt,
    setting_help,
)
from indexer.cli.output import print_json
from indexer.cli.reading import existing_index_model, model_loader
from retrieval.config import load_settings
from retrieval.models.recorded import spec_of

EXPORT_HELP = (
    "Export the model's image and text towers to ONNX, for CLIPSEARCH_RUNTIME=onnx (or auto).\n\n"
    "Both graphs take any batch size, and the text graph any length, so trimmed queries stay "
    "cheap. Each is verified against torch before it is kept (unit embeddings within 1e-5) and "
    "cached by model identity under the model cache, beside a manifest that records the "
    "identity: a server started with CLIPSEARCH_RUNTIME=onnx uses it instead of exporting "
    "again, and an export of other weights is never used. The model is the index's unless "
    "one is named. A cached export is checked (each file's sha256) and kept; --force, or a "
    "corrupt one, builds it again."
)


def export(
    quantize: Annotated[
        str | None,
        typer.Option(
            help=setting_help(
                "CLIPSEARCH_QUANTIZE", "none, or int8 to add dynamic int8 graphs (MatMul, Gemm)"
            )
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Build it again even when a sound one is cached.")
    ] = False,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    from retrieval.models.runtimes.choice import ensure_export
    from retrieval.models.runtimes.onnx_store import read_manifest
    from retrieval.models.runtimes.packages import EXPORT_PACKAGES, require_packages, require_torch

    settings = load_settings(
        model=model,
        pretrained=pretrained,
        data_dir=data_dir,
        database_url=database_url,
        quantize=quantize,
    )
    require_torch("clipsearch export", "exporting a model to ONNX")
    require_packages(EXPORT_PACKAGES, "clipsearch export", "exporting a model to ONNX")
    # The model is loaded in torch, fp32 on the CPU: an export is made from fp32 weights.
    choice = existing_index_model(settings)
    torch_settings = choice.settings.model_copy(
        update={"runtime": "torch", "device": "cpu", "precision": "fp32"}
    )
    encoder = model_loader(replace(choice, settings=torch_settings))()
    spec = spec_of(choice.settings.model_copy(update={"device": "cpu", "precision": "fp32"}))
    started = time.perf_counter()

    def say(line: str) -> None:
        if not as_json:
            typer.echo(line, err=True)

    result = ensure_export(spec, encoder.backend, rebuild_corrupt=True, force=force, progress=say)
    manifest = read_manifest(result.folder)
    assert manifest is not None
    summary: dict[str, Any] = {
        "folder": str(result.folder),
        "built": result.built,
        "seconds": round(time.perf_counter() - started, 1),
        "model": manifest.identity.to_dict(),
        "towers": {
            tower: {
                weights: {
                    "file": graph.file,
                    "mb": round(
                        sum(
                            record["bytes"]
                            for name, record in manifest.files.items()
                            if name.startswith(graph.file)
                        )
                        / 1e6,
                        1,
                    ),
                    "max_abs_diff": graph.max_abs_diff,
                    "cosine_min": graph.cosine_min,
                }
                for weights, graph in export.graphs.items()
            }
            for tower, export in manifest.towers.items()
        },
    }
    if as_json:
        print_json(summary)
        return
    verb = "exported" if result.built else "already exported (cached, checked)"
    typer.echo(f"{manifest.identity.describe()}: {verb} in {summary['seconds']} s")
    typer.echo(f"folder: {result.folder}")
    for tower, graphs in summary["towers"].items():
        for weights, graph in graphs.items():
            typer.echo(
                f"  {tower:5} {weights:4} {graph['file']:16} {graph['mb']:8.1f} MB  "
                f"max diff to torch {graph['max_abs_diff']:.1e}, "
                f"cosine min {graph['cosine_min']:.6f}"
            )
    typer.echo("run it with CLIPSEARCH_RUNTIME=onnx (or auto)")

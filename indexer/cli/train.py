"""`clipsearch finetune` and `eval`: training a model and measuring it."""

from __future__ import annotations

from dataclasses import replace
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
    StartModelOpt,
    model_flags,
    setting_default,
)
from indexer.cli.output import echo_table, print_json, print_warnings
from indexer.cli.reading import existing_index_model, model_loader, open_existing_catalog
from retrieval.config import load_settings
from retrieval.errors import ConfigError

if TYPE_CHECKING:
    from retrieval.index.ann_quality import AnnReport
    from retrieval.training.config import FinetuneResult
    from retrieval.training.evaluate import (
        EvaluationReport,
        RetrievalEvaluation,
        ZeroShotEvaluation,
    )

FormatOpt = Annotated[str, typer.Option("--format", help="auto, csv, jsonl, folder or labelme.")]

# --------------------------------------------------------------------------------------------
# finetune

DataArg = Annotated[
    Path,
    typer.Argument(
        help="Training data: a .csv/.jsonl of image,caption pairs (paths relative to the "
        "file; optional label column), a class folder root/<class>/*.jpg, or a folder of "
        "labelme .json files (each rectangle becomes a crop of its label)."
    ),
]
OutOpt = Annotated[
    Path,
    typer.Option(
        "--out",
        "-o",
        help="Checkpoint to write (.pt); <name>.report.json is written beside it. Use it "
        "anywhere as --pretrained PATH (or CLIPSEARCH_PRETRAINED).",
    ),
]
CaptionTemplatesOpt = Annotated[
    str,
    typer.Option(
        help="Captions for class folders and labelme labels: a set (openai, simple, photo, zh, "
        "zh-photo, zh-simple), a file with one template per line, or literal templates with {} "
        "joined by '|'. Each use of a sample draws one."
    ),
]
EpochsOpt = Annotated[float, typer.Option(help="Passes over the training split.")]
StepsOpt = Annotated[
    int | None, typer.Option(help="Optimizer steps; overrides --epochs (default: from --epochs).")
]
ContrastiveBatchOpt = Annotated[
    int, typer.Option(help="Contrastive batch: the pairs that see each other as negatives.")
]
AccumOpt = Annotated[
    int,
    typer.Option(
        help="Gradient accumulation: micro-batches per optimizer step (each micro-batch "
        "keeps its own negatives)."
    ),
]
LrOpt = Annotated[
    float,
    typer.Option(help="Peak learning rate: ~1e-5 for a pretrained model, ~1e-3 from scratch."),
]
WarmupOpt = Annotated[
    float, typer.Option(help="Fraction of steps with linear warmup; cosine decay after.")
]
WeightDecayOpt = Annotated[float, typer.Option(help="AdamW decay on weight matrices.")]
LossOpt = Annotated[
    str,
    typer.Option(
        help="clip: open_clip's ClipLoss. class-aware: each image against the batch's "
        "distinct captions, same class (or same caption) counted as one positive. sigmoid: "
        "SigLIP's pairwise loss, for SigLIP models (the only one they accept). auto: sigmoid "
        "for SigLIP models, else class-aware when captions or classes repeat in the training "
        "data, else clip."
    ),
]
ImagePairsOpt = Annotated[
    float,
    typer.Option(
        help="class-aware and sigmoid: weight of an image-to-image term (same class = positive) "
        "that tightens each class for search by example; 0 turns it off."
    ),
]
FreezeOpt = Annotated[str, typer.Option(help="Keep one tower as loaded: none, image or text.")]
ValFractionOpt = Annotated[
    float, typer.Option(help="Held-out fraction (stratified by class) for the report.")
]
SeedOpt = Annotated[int, typer.Option(help="Seeds init (random), split, order and captions.")]
AmpOpt = Annotated[
    bool, typer.Option("--amp/--no-amp", help="Mixed precision on CUDA (no-op on CPU).")
]
PatchDropoutOpt = Annotated[
    float, typer.Option(help="Fraction of ViT patches dropped while training (FLIP).")
]
TrainProgressOpt = Annotated[
    bool | None,
    typer.Option("--progress/--no-progress", help="Progress bar (default: on a terminal)."),
]
StartWeightsOpt = Annotated[
    str | None,
    typer.Option(
        "--pretrained",
        help="Starting weights: a tag, a checkpoint path, or none for random init (default: "
        f"CLIPSEARCH_PRETRAINED, else {setting_default('pretrained')}).",
    ),
]


def finetune(
    data: DataArg,
    out: OutOpt,
    data_format: FormatOpt = "auto",
    templates: CaptionTemplatesOpt = "photo",
    epochs: EpochsOpt = 1.0,
    steps: StepsOpt = None,
    batch_size: ContrastiveBatchOpt = 64,
    accum: AccumOpt = 1,
    lr: LrOpt = 1e-5,
    warmup: WarmupOpt = 0.1,
    weight_decay: WeightDecayOpt = 0.1,
    loss: LossOpt = "auto",
    image_pairs: ImagePairsOpt = 0.0,
    freeze: FreezeOpt = "none",
    val_fraction: ValFractionOpt = 0.1,
    seed: SeedOpt = 0,
    amp: AmpOpt = True,
    patch_dropout: PatchDropoutOpt = 0.0,
    progress: TrainProgressOpt = None,
    model: StartModelOpt = None,
    pretrained: StartWeightsOpt = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Fine-tune the CLIP model contrastively and write a checkpoint plus a JSON report."""
    from retrieval.models.runtimes.packages import require_torch

    require_torch("clipsearch finetune", "fine-tuning")
    from retrieval.models.encoder import model_spec
    from retrieval.models.prompts import resolve_templates
    from retrieval.training.config import FinetuneConfig
    from retrieval.training.finetune import finetune as run_finetune

    settings = load_settings(model=model, pretrained=pretrained, device=device)
    config = FinetuneConfig(
        data=data,
        out=out,
        model=replace(model_spec(settings), precision="fp32"),
        data_format=data_format,
        templates=resolve_templates(templates, "--templates"),
        epochs=epochs,
        steps=steps,
        batch_size=batch_size,
        accum_steps=accum,
        lr=lr,
        warmup=warmup,
        weight_decay=weight_decay,
        loss=loss,
        image_pairs=image_pairs,
        freeze=freeze,
        val_fraction=val_fraction,
        seed=seed,
        amp=amp,
        patch_dropout=patch_dropout,
        max_pixels=settings.max_image_pixels,
        workers=max(1, settings.workers),
    )
    result = run_finetune(config, progress=progress)
    if as_json:
        print_json(result.report.to_dict())
        return
    echo_finetune(result)


def echo_finetune(result: FinetuneResult) -> None:
    report = result.report
    typer.echo(
        f"wrote {result.checkpoint} ({report.steps} steps, {report.epochs} epochs, "
        f"{report.loss} loss, {report.seconds:.1f}s)"
    )
    zero_shot = report.val_zero_shot
    typer.echo(
        f"  train loss {report.final_train_loss}, val loss {report.val_loss}"
        + (f", val zero-shot top-1 {zero_shot.top1:.3f}" if zero_shot else "")
    )
    typer.echo(f"  report {result.report_path}")
    if result.warnings:
        typer.echo(f"{len(result.warnings)} samples or annotations skipped:", err=True)
        print_warnings(result.warnings)


# --------------------------------------------------------------------------------------------
# eval

RetrievalSetOpt = Annotated[
    Path | None,
    typer.Option(
        "--retrieval",
        help="Captioned set (.csv/.jsonl, class folder or labelme): text->image and "
        "image->text R@1/5/10 and mean rank (default: not measured).",
    ),
]
ZeroShotSetOpt = Annotated[
    Path | None,
    typer.Option(
        "--zero-shot",
        help="Set with classes (class folder, labelme, or a table with a label column): "
        "top-1/top-5 accuracy, single prompt and template ensemble side by side (default: not "
        "measured).",
    ),
]
AnnOpt = Annotated[
    bool,
    typer.Option(
        "--ann",
        help="Recall@k of each index kind (flat, hnsw, ivf, ivfpq), built from the live "
        "index's stored embeddings, against exact search; with query latency.",
    ),
]
PromptOpt = Annotated[
    str,
    typer.Option(
        help="The single zero-shot prompt, {} being the class name; also the caption of "
        "class-folder and labelme images in --retrieval."
    ),
]
EnsembleOpt = Annotated[
    str,
    typer.Option(
        help="The zero-shot ensemble: openai, simple, photo, zh, a file, or 'a {}|the {}'."
    ),
]
FidelityOpt = Annotated[
    bool,
    typer.Option(
        "--fidelity",
        help="What the runtime the settings name (CLIPSEARCH_RUNTIME, CLIPSEARCH_QUANTIZE, "
        "CLIPSEARCH_PRECISION) costs against torch fp32 on the same model: cosine of embeddings "
        "(min, median), top-k overlap of searches on the live index, and with --zero-shot the "
        "change in accuracy (default: not measured).",
    ),
]
QueriesOpt = Annotated[
    Path | None,
    typer.Option(
        "--queries",
        help="For --fidelity: a file of query texts, one a line (default: 24 everyday ones).",
    ),
]
AnnKOpt = Annotated[int, typer.Option("-k", help="k for ANN recall and the --fidelity overlap.")]
AnnQueriesOpt = Annotated[int, typer.Option(help="Stored vectors held out as ANN queries.")]


def evaluate(
    retrieval_set: RetrievalSetOpt = None,
    zero_shot_set: ZeroShotSetOpt = None,
    ann: AnnOpt = False,
    fidelity: FidelityOpt = False,
    queries: QueriesOpt = None,
    prompt: PromptOpt = "a photo of a {}.",
    templates: EnsembleOpt = "openai",
    data_format: FormatOpt = "auto",
    k: AnnKOpt = 10,
    ann_queries: AnnQueriesOpt = 200,
    data_dir: DataDirOpt = None,
    database_url: DbOpt = None,
    index_dir: IndexDirOpt = None,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Measure retrieval, zero-shot accuracy and ANN recall; a table, or --json."""
    from retrieval.index.ann_quality import ann_quality, live_embeddings
    from retrieval.models.prompts import resolve_templates
    from retrieval.training.evaluate import EvaluationReport, EvaluationSets, evaluate_sets

    if fidelity:
        if retrieval_set is not None or ann:
            raise ConfigError("eval", "--fidelity goes with --zero-shot alone")
        from retrieval.models.runtimes.packages import require_torch

        require_torch("eval", "--fidelity (it compares each runtime with torch fp32)")
        from indexer.cli.fidelity import echo_fidelity, fidelity_report

        measured = fidelity_report(
            load_settings(
                **model_flags(data_dir, database_url, index_dir, model, pretrained, device),
            ),
            zero_shot_set=zero_shot_set,
            data_format=data_format,
            prompt=resolve_templates(prompt, "--prompt")[0],
            templates=resolve_templates(templates, "--templates"),
            queries_file=queries,
            k=k,
        )
        if as_json:
            print_json(measured.to_dict())
        else:
            echo_fidelity(measured)
        return
    if retrieval_set is None and zero_shot_set is None and not ann:
        raise ConfigError(
            "eval", "give --retrieval PATH, --zero-shot PATH, --ann and/or --fidelity"
        )
    settings = load_settings(
        **model_flags(data_dir, database_url, index_dir, model, pretrained, device),
    )
    sets = EvaluationSets(
        retrieval=retrieval_set,
        zero_shot=zero_shot_set,
        data_format=data_format,
        prompt=resolve_templates(prompt, "--prompt")[0],
        templates=resolve_templates(templates, "--templates"),
        max_pixels=settings.max_image_pixels,
    )
    report = EvaluationReport()
    if retrieval_set is not None or zero_shot_set is not None:
        # The index's model, when there is an index and no model is named.
        choice = existing_index_model(settings)
        report = evaluate_sets(model_loader(choice)(), sets)
    if ann:
        catalog = open_existing_catalog(settings)
        report.ann = ann_quality(
            live_embeddings(catalog, settings.resolved_index_dir),
            k=k,
            queries=ann_queries,
            ef_search=settings.hnsw_ef_search,
            nprobe=settings.ivf_nprobe,
        )
    if as_json:
        print_json(report.to_dict())
        return
    echo_evaluation(report)
    if report.warnings:
        typer.echo(f"{len(report.warnings)} samples skipped:", err=True)
        print_warnings(report.warnings)


def echo_evaluation(report: EvaluationReport) -> None:
    if report.retrieval is not None:
        echo_retrieval(report.retrieval)
    if report.zero_shot is not None:
        echo_zero_shot(report.zero_shot)
    if report.ann is not None:
        echo_ann(report.ann)


def echo_retrieval(result: RetrievalEvaluation) -> None:
    typer.echo(f"retrieval on {result.data} ({result.images} images, {result.captions} captions)")
    metrics = result.metrics
    rows = [["direction", "R@1", "R@5", "R@10", "mean rank", "median rank"]]
    for name, direction in (
        ("text to image", metrics.text_to_image),
        ("image to text", metrics.image_to_text),
    ):
        rows.append(
            [
                name,
                *(f"{direction.recall[k]:.3f}" for k in (1, 5, 10)),
                f"{direction.mean_rank:.2f}",
                f"{direction.median_rank:g}",
            ]
        )
    echo_table(rows)
    if metrics.class_queries:
        typer.echo(
            f"  captions with >= 5 images: {metrics.class_queries}; top-5 all relevant "
            f"{metrics.all_relevant_at[5]:.3f}, precision@5 {metrics.precision_at[5]:.3f}"
        )


def echo_zero_shot(result: ZeroShotEvaluation) -> None:
    report = result.metrics
    typer.echo(
        f"zero-shot on {result.data} ({report.single.images} images, "
        f"{report.single.classes} classes)"
    )
    rows = [["prompts", "top-1", "top-5"]]
    for label, accuracy in (
        (f"single: {report.prompt}", report.single),
        (f"ensemble of {report.templates} templates", report.ensemble),
    ):
        rows.append([label, f"{accuracy.top1:.3f}", f"{accuracy.top5:.3f}"])
    echo_table(rows)


def echo_ann(report: AnnReport) -> None:
    typer.echo(
        f"ANN quality of the live index: {report.vectors} vectors, {report.queries} held-out "
        f"queries, recall@{report.k} against exact search (efSearch {report.ef_search}, "
        f"nprobe {report.nprobe})"
    )
    rows = [["kind", "built as", f"recall@{report.k}", "p50 ms", "p95 ms", "build s"]]
    for kind in report.kinds:
        rows.append(
            [
                kind.kind,
                kind.built,
                f"{kind.recall:.3f}",
                f"{kind.latency_ms_p50:.3f}",
                f"{kind.latency_ms_p95:.3f}",
                f"{kind.build_seconds:.2f}",
            ]
        )
    echo_table(rows)

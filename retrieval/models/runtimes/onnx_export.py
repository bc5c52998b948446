"""Exporting a loaded model's towers to ONNX, and verifying each graph against torch.

Both towers take a dynamic batch; the text tower also a dynamic length, so that a query
trimmed to its real tokens runs trimmed work in ONNX Runtime as in torch. torch's exporter
(torch.export, then onnxscript) writes each graph with its weights in a `.data` file beside it.
A graph is kept only when its unit embeddings are within `FP32_TOLERANCE` of torch fp32's on
sample images and on full and trimmed sample texts.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrieval.errors import ExportUnusable
from retrieval.models.backend import ModelBackend, TokenBatch
from retrieval.models.runtimes.onnx_runner import open_session
from retrieval.models.runtimes.onnx_store import (
    ExportManifest,
    TowerExport,
    TowerGraph,
    file_records,
    runtime_versions,
    write_manifest,
)

log = logging.getLogger(__name__)

FP32_TOLERANCE = 1e-5  # max abs difference of unit embeddings, ONNX Runtime fp32 against torch
# Sample texts of several lengths and scripts: trimming gives each batch another length.
SAMPLE_TEXTS = (
    "a photo of a dog",
    "a red circle",
    "一只猫坐在窗台上",
    "a long caption about a blue square next to a small green triangle on a wooden table",
)
SAMPLE_IMAGES = 3
CPU = ["CPUExecutionProvider"]


@dataclass(frozen=True)
class Samples:
    """What each graph is verified on: images, and token batches each run in full and trimmed
    (torch trims inside `encode_text`; a graph is given the trimmed columns)."""

    pixels: torch.Tensor
    texts: list[TokenBatch]

    def text_runs(self, backend: ModelBackend) -> list[tuple[TokenBatch, bool]]:
        return [(tokens, trim) for tokens in self.texts for trim in (False, True)]


def sample_inputs(backend: ModelBackend) -> Samples:
    generator = torch.Generator().manual_seed(0)
    size = backend.identity.image_size
    pixels = torch.randn(SAMPLE_IMAGES, 3, size, size, generator=generator)
    texts = [backend.tokenize(list(SAMPLE_TEXTS))]
    texts += [backend.tokenize([text]) for text in SAMPLE_TEXTS[:2]]
    return Samples(pixels, texts)


def unit(features: np.ndarray | torch.Tensor) -> np.ndarray:
    rows = np.asarray(features, dtype=np.float64)
    return rows / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class Agreement:
    max_abs_diff: float
    cosine_min: float

    @classmethod
    def of(cls, pairs: list[tuple[np.ndarray, np.ndarray]]) -> Agreement:
        diffs, cosines = [], []
        for ours, reference in pairs:
            a, b = unit(ours), unit(reference)
            diffs.append(float(np.abs(a - b).max()))
            cosines.append(float((a * b).sum(axis=-1).min()))
        return cls(max(diffs), min(cosines))


def _feed(inputs: tuple[str, ...], tokens: TokenBatch) -> dict[str, np.ndarray]:
    feed = {"ids": tokens.ids.numpy().astype(np.int64)}
    if "mask" in inputs:
        assert tokens.mask is not None
        feed["mask"] = tokens.mask.numpy().astype(np.int64)
    return feed


@torch.inference_mode()
def torch_references(backend: ModelBackend, samples: Samples) -> dict[str, list[np.ndarray]]:
    """The torch fp32 features of the samples (the backend must be fp32 on the CPU)."""
    image = [backend.encode_image(samples.pixels).float().numpy()]
    image.append(backend.encode_image(samples.pixels[:1]).float().numpy())
    text = [
        backend.encode_text(tokens, trim=trim).float().numpy()
        for tokens, trim in samples.text_runs(backend)
    ]
    return {"image": image, "text": text}


def graph_agreement(
    backend: ModelBackend,
    session: Any,
    tower: str,
    inputs: tuple[str, ...],
    samples: Samples,
    references: dict[str, list[np.ndarray]],
) -> Agreement:
    """How far a graph's unit embeddings are from torch's on the samples."""
    if tower == "image":
        outputs = [
            session.run(None, {"pixels": samples.pixels.numpy()})[0],
            session.run(None, {"pixels": samples.pixels[:1].numpy()})[0],
        ]
    else:
        outputs = [
            session.run(None, _feed(inputs, backend.trimmed(tokens) if trim else tokens))[0]
            for tokens, trim in samples.text_runs(backend)
        ]
    return Agreement.of(list(zip(outputs, references[tower], strict=True)))


class _BelowError(logging.Filter):
    """Drops the records below ERROR that are logged on the logger it is added to."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[io.StringIO]:
    """torch's exporter prints its progress and warns about every traced quirk; kept for an
    error message instead."""
    captured = io.StringIO()
    names = ("torch.onnx", "onnxscript", "onnx_ir", "torch.export")
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    # onnxruntime's quantizer logs its advice on the root logger itself.
    root_advice = _BelowError()
    logging.getLogger().addFilter(root_advice)
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(captured),
        contextlib.redirect_stderr(captured),
    ):
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield captured
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)
            logging.getLogger().removeFilter(root_advice)


def _export_graph(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    names: tuple[str, ...],
    dynamic: tuple[dict[int, Any], ...],
    path: Path,
) -> None:
    with _quiet_exporter() as captured, torch.no_grad():
        try:
            torch.onnx.export(
                module.eval(),
                args,
                str(path),
                dynamo=True,
                input_names=list(names),
                output_names=["features"],
                dynamic_shapes=dynamic,
                external_data=True,
            )
        except Exception as exc:  # noqa: BLE001 - the exporter fails in many ways; one message
            first = " ".join(str(exc).split())[:400]
            raise ExportUnusable(
                str(path.parent),
                f"torch could not export {path.stem} ({type(exc).__name__}: {first})",
                "Use CLIPSEARCH_RUNTIME=torch for this model.",
            ) from None
    if not path.is_file():
        raise ExportUnusable(
            str(path.parent),
            f"torch wrote no {path.name} ({captured.getvalue()[-300:]})",
            "Use CLIPSEARCH_RUNTIME=torch for this model.",
        )


def export_model(
    backend: ModelBackend,
    out: Path,
    *,
    quantize: bool = False,
    progress: Callable[[str], None] | None = None,
) -> ExportManifest:
    """Export both towers of `backend` (fp32, on the CPU) into the empty folder `out`, verify
    them against torch, and write the manifest; ExportUnusable when a graph is not within
    FP32_TOLERANCE. With `quantize`, also the int8 graphs (`quantize_export`)."""
    say = progress or (lambda _: None)
    started = time.perf_counter()
    towers = backend.export_towers()
    samples = sample_inputs(backend)
    references = torch_references(backend, samples)
    batch = torch.export.Dim("batch", min=1, max=65_536)
    context = int(samples.texts[0].ids.shape[1])
    length = torch.export.Dim("length", min=1, max=context)
    pixels = samples.pixels[:2]
    tokens = samples.texts[0].columns(context)
    text_args: tuple[torch.Tensor, ...] = (tokens.ids[:2],)
    text_inputs: tuple[str, ...] = ("ids",)
    if towers.text_mask:
        assert tokens.mask is not None
        text_args, text_inputs = (tokens.ids[:2], tokens.mask[:2]), ("ids", "mask")
    text_dynamic = tuple({0: batch, 1: length} for _ in text_args)
    plans = {
        "image": (towers.image, (pixels,), ("pixels",), ({0: batch},)),
        "text": (towers.text, text_args, text_inputs, text_dynamic),
    }
    exported: dict[str, TowerExport] = {}
    for tower, (module, args, names, dynamic) in plans.items():
        say(f"exporting the {tower} tower")
        path = out / f"{tower}.onnx"
        _export_graph(module, args, names, dynamic, path)
        session = open_session(path, CPU, 0)
        agreement = graph_agreement(backend, session, tower, names, samples, references)
        if agreement.max_abs_diff > FP32_TOLERANCE:
            raise ExportUnusable(
                str(out),
                f"the exported {tower} tower differs from torch by {agreement.max_abs_diff:.2e} "
                f"(unit embeddings, at most {FP32_TOLERANCE:.0e} allowed)",
                "Use CLIPSEARCH_RUNTIME=torch for this model.",
            )
        say(f"{tower} tower verified: max difference {agreement.max_abs_diff:.1e}")
        exported[tower] = TowerExport(
            names, {"fp32": TowerGraph(path.name, agreement.max_abs_diff, agreement.cosine_min)}
        )
    from retrieval.models.exported.backend import PORTABLE
    from retrieval.models.exported.describe import portable_parts

    manifest = ExportManifest(
        identity=backend.identity,
        versions=runtime_versions(),
        towers=exported,
        files=file_records(out),
        context_length=context,
        seconds=time.perf_counter() - started,
        extra={PORTABLE: portable_parts(backend, out)},
    )
    if quantize:
        manifest = quantize_export(backend, out, manifest, samples, references, say)
    write_manifest(out, manifest)
    return manifest


def quantize_export(
    backend: ModelBackend,
    folder: Path,
    manifest: ExportManifest,
    samples: Samples | None = None,
    references: dict[str, list[np.ndarray]] | None = None,
    say: Callable[[str], None] = lambda _: None,
) -> ExportManifest:
    """Add int8 graphs (ONNX Runtime's dynamic quantization of the MatMul and Gemm weights) to
    an export, with their measured distance from torch fp32; returns the new manifest (the
    caller writes it)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    samples = samples or sample_inputs(backend)
    references = references or torch_references(backend, samples)
    for tower, export in manifest.towers.items():
        say(f"quantizing the {tower} tower to int8")
        source = folder / export.graphs["fp32"].file
        target = folder / f"{tower}.int8.onnx"
        with _quiet_exporter():
            quantize_dynamic(
                str(source),
                str(target),
                op_types_to_quantize=["MatMul", "Gemm"],
                weight_type=QuantType.QInt8,
                use_external_data_format=True,
            )
        session = open_session(target, CPU, 0)
        agreement = graph_agreement(backend, session, tower, export.inputs, samples, references)
        say(f"{tower} tower int8: cosine to torch fp32 at least {agreement.cosine_min:.4f}")
        manifest = manifest.with_graph(
            tower, "int8", TowerGraph(target.name, agreement.max_abs_diff, agreement.cosine_min)
        )
    return _with_files(folder, manifest)


def _with_files(folder: Path, manifest: ExportManifest) -> ExportManifest:
    from dataclasses import replace

    return replace(manifest, files=file_records(folder))


def build_folder(folder: Path) -> Path:
    """An empty folder beside `folder` to build an export in (published with one rename)."""
    build = folder.parent / f".build-{folder.name}-{os.getpid()}"
    if build.exists():
        shutil.rmtree(build)
    build.mkdir(parents=True)
    return build


def half_graph(source: Path, target: Path) -> None:
    """Write an fp16 copy of an fp32 graph (float32 inputs and outputs, fp16 inside), its
    weights in `<target>.data` beside it."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(source))  # with its external weights
    half = convert_float_to_float16(model, keep_io_types=True)
    onnx.save(
        half,
        str(target),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=f"{target.name}.data",
    )


def half_export(backend: ModelBackend, folder: Path, manifest: ExportManifest) -> ExportManifest:
    """Add fp16 graphs to an export, each verified on the CPU against torch fp32 (unit
    embeddings, cosine at least FP16_COSINE_MIN); returns the new manifest (the caller writes
    it). ExportUnusable when a tower's half-precision copy is further off than that."""
    from dataclasses import replace

    from retrieval.models.runtimes.gpu import FP16_COSINE_MIN
    from retrieval.models.runtimes.onnx_store import TowerGraph, file_records

    samples = sample_inputs(backend)
    references = torch_references(backend, samples)
    for tower, export in manifest.towers.items():
        target = folder / f"{tower}.fp16.onnx"
        half_graph(folder / export.graphs["fp32"].file, target)
        session = open_session(target, CPU, 0, fp16=True)
        agreement = graph_agreement(backend, session, tower, export.inputs, samples, references)
        if agreement.cosine_min < FP16_COSINE_MIN:
            raise ExportUnusable(
                str(folder),
                f"the fp16 {tower} tower is at cosine {agreement.cosine_min:.5f} from torch fp32 "
                f"(at least {FP16_COSINE_MIN} needed)",
                "Use CLIPSEARCH_PRECISION=fp32 or CLIPSEARCH_RUNTIME=torch for this model.",
            )
        manifest = manifest.with_graph(
            tower, "fp16", TowerGraph(target.name, agreement.max_abs_diff, agreement.cosine_min)
        )
    return replace(manifest, files=file_records(folder))

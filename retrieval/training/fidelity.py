"""`clipsearch eval --fidelity`: what a runtime (ONNX Runtime, int8 weights, bf16) costs against
torch fp32, on the same model.

Three figures: the cosine of the two runtimes' unit embeddings (min and median, over query
texts and images), the overlap of the top-k results each gets for the same queries on the live
index, and the change in zero-shot accuracy on a labelled set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from retrieval.models.encoder import Encoder
from retrieval.training.data import TrainingSet
from retrieval.training.evaluate import embed_set_images, evaluate_zero_shot

# Everyday photo searches (and a few in Chinese), for when no queries are given.
DEFAULT_QUERIES = (
    "a dog playing on the beach",
    "a cat sleeping on a sofa",
    "a red car parked on the street",
    "a birthday cake with candles",
    "mountains covered in snow",
    "a child riding a bicycle",
    "a plate of pasta",
    "a sunset over the sea",
    "people at a wedding",
    "a city skyline at night",
    "a bowl of fruit on a table",
    "a man hiking in the forest",
    "an old church",
    "a screenshot of a document",
    "a baby smiling",
    "fireworks in the sky",
    "a horse in a field",
    "a cup of coffee",
    "a boat on a lake",
    "a group photo of friends",
    "海边的日落",
    "一只猫",
    "生日蛋糕",
    "雪山",
)


@dataclass(frozen=True)
class ZeroShotDelta:
    data: str
    images: int
    reference_top1: float
    top1: float
    reference_top5: float
    top5: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "data": self.data,
            "images": self.images,
            "reference_top1": round(self.reference_top1, 4),
            "top1": round(self.top1, 4),
            "delta_top1": round(self.top1 - self.reference_top1, 4),
            "reference_top5": round(self.reference_top5, 4),
            "top5": round(self.top5, 4),
            "delta_top5": round(self.top5 - self.reference_top5, 4),
        }


@dataclass(frozen=True)
class FidelityReport:
    reference: str  # how the reference ran (torch fp32)
    runtime: str  # how the measured runtimes ran
    texts: int
    images: int
    cosine_min: float
    cosine_median: float
    k: int
    queries: int  # searched on the live index (0: no index)
    overlap_mean: float | None
    overlap_min: float | None
    zero_shot: ZeroShotDelta | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "runtime": self.runtime,
            "texts": self.texts,
            "images": self.images,
            "cosine_min": round(self.cosine_min, 6),
            "cosine_median": round(self.cosine_median, 6),
            f"top{self.k}_overlap": None
            if self.overlap_mean is None
            else {
                "queries": self.queries,
                "mean": round(self.overlap_mean, 4),
                "min": round(float(self.overlap_min or 0.0), 4),
            },
            "zero_shot": self.zero_shot.to_dict() if self.zero_shot else None,
        }


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row pair of two sets of unit vectors."""
    return np.asarray((a.astype(np.float64) * b.astype(np.float64)).sum(axis=1))


def top_k_overlap(
    stored: np.ndarray, reference: np.ndarray, measured: np.ndarray, k: int
) -> np.ndarray:
    """For each query (a row of `reference` and `measured`), the share of the reference's
    top-k stored vectors that the measured query also ranks in its top k (exact search)."""
    k = min(k, len(stored))

    def top(queries: np.ndarray) -> np.ndarray:
        scores = queries.astype(np.float32) @ stored.T
        return np.argpartition(-scores, k - 1, axis=1)[:, :k]

    ours, theirs = top(measured), top(reference)
    return np.array([len(set(a) & set(b)) / k for a, b in zip(ours, theirs, strict=True)])


def measure_fidelity(
    measured: Encoder,
    reference: Encoder,
    *,
    queries: Sequence[str] = DEFAULT_QUERIES,
    pixels: torch.Tensor | None = None,
    stored: np.ndarray | None = None,
    k: int = 10,
    zero_shot: tuple[str, TrainingSet, str, Sequence[str]] | None = None,
) -> FidelityReport:
    """Compare `measured` with `reference` (the same model in torch fp32) on the queries, the
    preprocessed images `pixels`, the live index's `stored` vectors and a labelled set
    (`zero_shot`: its name, the set, the single prompt and the templates)."""
    if measured.identity.key != reference.identity.key:
        raise ValueError("fidelity compares two runtimes of one model")
    query_ours, query_ref = measured.encode_texts(queries), reference.encode_texts(queries)
    cosines = [row_cosines(query_ours, query_ref)]
    images = 0
    if pixels is not None and len(pixels):
        ours_images = measured.encode_image_tensors(pixels)
        cosines.append(row_cosines(ours_images, reference.encode_image_tensors(pixels)))
        images += len(pixels)
    delta = None
    if zero_shot is not None:
        name, dataset, prompt, templates = zero_shot
        ours_set = embed_set_images(measured, dataset)
        ref_set = embed_set_images(reference, dataset)
        cosines.append(row_cosines(ours_set.embeddings, ref_set.embeddings))
        images += len(ref_set.sample_indices)
        ours, _ = evaluate_zero_shot(
            measured, dataset, prompt=prompt, templates=templates, embedded=ours_set
        )
        ref, _ = evaluate_zero_shot(
            reference, dataset, prompt=prompt, templates=templates, embedded=ref_set
        )
        delta = ZeroShotDelta(
            name,
            len(ref_set.sample_indices),
            ref.ensemble.top1,
            ours.ensemble.top1,
            ref.ensemble.top5,
            ours.ensemble.top5,
        )
    overlap = None
    if stored is not None and len(stored):
        overlap = top_k_overlap(stored, query_ref, query_ours, k)
    every = np.concatenate(cosines)
    return FidelityReport(
        reference=reference.runtimes.describe(),
        runtime=measured.runtimes.describe(),
        texts=len(queries),
        images=images,
        cosine_min=float(every.min()),
        cosine_median=float(np.median(every)),
        k=k,
        queries=len(queries) if overlap is not None else 0,
        overlap_mean=float(overlap.mean()) if overlap is not None else None,
        overlap_min=float(overlap.min()) if overlap is not None else None,
        zero_shot=delta,
    )

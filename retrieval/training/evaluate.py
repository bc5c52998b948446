"""Model quality: caption retrieval and zero-shot classification (ANN recall of an index is
`retrieval.index.ann_quality`).

The metric functions work on embeddings, so tests can hand-make cases whose answer is known;
the `evaluate_*` functions embed a `TrainingSet` with an `Encoder` first.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import ImageError, TrainingDataError
from retrieval.index.ann_quality import AnnReport
from retrieval.models.encoder import Encoder
from retrieval.models.identity import ModelIdentity
from retrieval.models.prompts import class_text_embeddings, render
from retrieval.training.data import (
    DEFAULT_MAX_PIXELS,
    TrainingSet,
    load_sample_image,
    load_training_set,
)

RECALL_KS = (1, 5, 10)
_BLOCK = 1024  # query rows scored at once: bounds a (block x corpus) float32 score matrix


# --------------------------------------------------------------------------------------------
# Retrieval


@dataclass(frozen=True)
class DirectionMetrics:
    """Ranking quality of one direction (text->image or image->text)."""

    queries: int
    recall: dict[int, float]  # R@K: fraction of queries with a relevant item in the top K
    mean_rank: float  # 1-based rank of the best-placed relevant item, averaged
    median_rank: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "queries": self.queries,
            **{f"R@{k}": round(v, 4) for k, v in self.recall.items()},
            "mean_rank": round(self.mean_rank, 3),
            "median_rank": self.median_rank,
        }


@dataclass(frozen=True)
class RetrievalMetrics:
    text_to_image: DirectionMetrics
    image_to_text: DirectionMetrics
    # Over text queries with at least K relevant images: the fraction whose top K are all
    # relevant, and the mean precision@K. With repeated captions ("a red circle" for every red
    # circle) R@K is easy, and this is the number that says the top of the list is right.
    all_relevant_at: dict[int, float]
    precision_at: dict[int, float]
    class_queries: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "text_to_image": self.text_to_image.to_dict(),
            "image_to_text": self.image_to_text.to_dict(),
            "class_queries": self.class_queries,
            **{f"all_relevant@{k}": round(v, 4) for k, v in self.all_relevant_at.items()},
            **{f"precision@{k}": round(v, 4) for k, v in self.precision_at.items()},
        }


def _direction(
    queries: np.ndarray,
    corpus: np.ndarray,
    relevant: list[np.ndarray],
    ks: Sequence[int],
    purity_k: int | None = None,
) -> tuple[DirectionMetrics, tuple[float, float, int]]:
    """Ranks of the first relevant item; optionally all-relevant and precision at purity_k."""
    ranks = np.empty(len(queries), dtype=np.int64)
    all_ok: list[bool] = []
    precision: list[float] = []
    for start in range(0, len(queries), _BLOCK):
        scores = queries[start : start + _BLOCK] @ corpus.T
        for row, query in enumerate(range(start, min(start + _BLOCK, len(queries)))):
            wanted = relevant[query]
            best = scores[row, wanted].max()
            ranks[query] = 1 + int(np.count_nonzero(scores[row] > best))
            if purity_k is not None and len(wanted) >= purity_k:
                top = np.argpartition(-scores[row], purity_k - 1)[:purity_k]
                hits = np.isin(top, wanted).sum()
                all_ok.append(bool(hits == purity_k))
                precision.append(hits / purity_k)
    metrics = DirectionMetrics(
        queries=len(queries),
        recall={k: float(np.mean(ranks <= k)) for k in ks},
        mean_rank=float(ranks.mean()),
        median_rank=float(np.median(ranks)),
    )
    purity = (
        float(np.mean(all_ok)) if all_ok else float("nan"),
        float(np.mean(precision)) if precision else float("nan"),
        len(all_ok),
    )
    return metrics, purity


def _group(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Distinct keys (sorted) and, for each, its values."""
    order = np.argsort(keys, kind="stable")
    distinct, starts = np.unique(keys[order], return_index=True)
    return distinct, np.split(values[order], starts[1:])


def retrieval_metrics(
    image_embeddings: np.ndarray,
    text_embeddings: np.ndarray,
    pairs: Sequence[tuple[int, int]],
    *,
    ks: Sequence[int] = RECALL_KS,
    purity_k: int = 5,
) -> RetrievalMetrics:
    """Text->image and image->text ranking from unit vectors and (image, text) positive pairs.

    Texts are the distinct captions. An image is relevant to every caption it is paired with,
    so a caption shared by many images has many relevant images; ranks count only items that
    score strictly higher than the best relevant one.
    """
    if not len(pairs):
        raise ValueError("no (image, text) pairs")
    images = np.ascontiguousarray(image_embeddings, dtype=np.float32)
    texts = np.ascontiguousarray(text_embeddings, dtype=np.float32)
    pair_array = np.unique(np.asarray(pairs, dtype=np.int64).reshape(-1, 2), axis=0)
    text_ids, by_text = _group(pair_array[:, 1], pair_array[:, 0])
    image_ids, by_image = _group(pair_array[:, 0], pair_array[:, 1])
    t2i, (all_ok, precision, counted) = _direction(
        texts[text_ids], images, by_text, ks, purity_k=purity_k
    )
    i2t, _ = _direction(images[image_ids], texts, by_image, ks)
    return RetrievalMetrics(
        text_to_image=t2i,
        image_to_text=i2t,
        all_relevant_at={purity_k: all_ok},
        precision_at={purity_k: precision},
        class_queries=counted,
    )


# --------------------------------------------------------------------------------------------
# Zero-shot classification


@dataclass(frozen=True)
class ZeroShotAccuracy:
    images: int
    classes: int
    top1: float
    top5: float  # top-min(5, classes)

    def to_dict(self) -> dict[str, Any]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def zero_shot_accuracy(
    image_embeddings: np.ndarray, labels: np.ndarray, class_embeddings: np.ndarray
) -> ZeroShotAccuracy:
    """Top-1 and top-5 accuracy of nearest-class-embedding prediction; labels index the classes."""
    truth = np.asarray(labels, dtype=np.int64)
    if truth.size == 0:
        raise ValueError("no images")
    scores = (
        np.asarray(image_embeddings, dtype=np.float32)
        @ np.asarray(class_embeddings, dtype=np.float32).T
    )
    top_k = min(5, scores.shape[1])
    true_scores = scores[np.arange(truth.size), truth]
    # Rank of the true class: how many classes score strictly higher.
    above = np.count_nonzero(scores > true_scores[:, None], axis=1)
    return ZeroShotAccuracy(
        images=int(truth.size),
        classes=int(scores.shape[1]),
        top1=float(np.mean(above < 1)),
        top5=float(np.mean(above < top_k)),
    )


# --------------------------------------------------------------------------------------------
# Embedding a set


@dataclass
class EmbeddedSet:
    """Unit vectors of a set's usable samples, in sample order, plus what was skipped."""

    embeddings: np.ndarray
    sample_indices: list[int]
    warnings: list[str] = field(default_factory=list)


def embed_set_images(
    encoder: Encoder,
    dataset: TrainingSet,
    *,
    batch_size: int = 64,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int = 4,
) -> EmbeddedSet:
    """Decode (in threads) and embed every sample image; undecodable ones become warnings."""
    kept: list[int] = []
    chunks: list[np.ndarray] = []
    warnings: list[str] = []

    def load(index: int) -> tuple[int, Any]:
        try:
            return index, encoder.preprocess(
                load_sample_image(dataset.samples[index], max_pixels=max_pixels)
            )
        except ImageError as exc:
            return index, exc

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(dataset.samples), batch_size):
            indices = range(start, min(start + batch_size, len(dataset.samples)))
            tensors = []
            for index, item in pool.map(load, indices):
                if isinstance(item, ImageError):
                    warnings.append(f"{dataset.samples[index].image}: {item.reason}; skipped")
                    continue
                kept.append(index)
                tensors.append(item)
            if tensors:
                # The backend's own batch: torch tensors, or an export's numpy arrays.
                chunks.append(encoder.encode_image_tensors(encoder.backend.stack(tensors)))
    embeddings = np.concatenate(chunks) if chunks else np.zeros((0, encoder.dim), np.float32)
    return EmbeddedSet(embeddings, kept, warnings)


def evaluate_retrieval(
    encoder: Encoder, dataset: TrainingSet, *, embedded: EmbeddedSet | None = None
) -> tuple[RetrievalMetrics, EmbeddedSet]:
    """Retrieval on a captioned set, with each sample's canonical caption as its text."""
    embedded = embedded or embed_set_images(encoder, dataset)
    if not embedded.sample_indices:
        raise TrainingDataError(str(dataset.source), "no image of this set could be decoded")
    captions = sorted({dataset.samples[i].caption for i in embedded.sample_indices})
    caption_id = {caption: n for n, caption in enumerate(captions)}
    text_embeddings = encoder.encode_texts_batched(captions)
    # The same image file listed twice (several captions) is one corpus item.
    image_key: dict[tuple[Any, ...], int] = {}
    rows: list[int] = []
    pairs: list[tuple[int, int]] = []
    for row, index in enumerate(embedded.sample_indices):
        sample = dataset.samples[index]
        key = (str(sample.image), sample.box)
        if key not in image_key:
            image_key[key] = len(rows)
            rows.append(row)
        pairs.append((image_key[key], caption_id[sample.caption]))
    metrics = retrieval_metrics(embedded.embeddings[rows], text_embeddings, pairs)
    return metrics, embedded


@dataclass(frozen=True)
class ZeroShotReport:
    prompt: str
    templates: int
    single: ZeroShotAccuracy
    ensemble: ZeroShotAccuracy

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "templates": self.templates,
            "single_prompt": self.single.to_dict(),
            "template_ensemble": self.ensemble.to_dict(),
        }


def evaluate_zero_shot(
    encoder: Encoder,
    dataset: TrainingSet,
    *,
    prompt: str,
    templates: Sequence[str],
    embedded: EmbeddedSet | None = None,
) -> tuple[ZeroShotReport, EmbeddedSet]:
    """Classify every sample among the set's classes: one prompt, and the template ensemble."""
    if not dataset.has_classes:
        raise TrainingDataError(
            str(dataset.source),
            "zero-shot evaluation needs classes (an image folder, labelme, or a label column)",
        )
    embedded = embedded or embed_set_images(encoder, dataset)
    if not embedded.sample_indices:
        raise TrainingDataError(str(dataset.source), "no image of this set could be decoded")
    classes = dataset.classes
    index = {name: n for n, name in enumerate(classes)}
    labels = np.array(
        [index[dataset.samples[i].label or ""] for i in embedded.sample_indices], dtype=np.int64
    )
    encode = encoder.encode_texts_batched
    single = zero_shot_accuracy(
        embedded.embeddings, labels, encode([render(prompt, name) for name in classes])
    )
    ensemble = zero_shot_accuracy(
        embedded.embeddings, labels, class_text_embeddings(encode, classes, templates)
    )
    return ZeroShotReport(prompt, len(templates), single, ensemble), embedded


# --------------------------------------------------------------------------------------------
# One evaluation run (`clipsearch eval`)


@dataclass(frozen=True)
class RetrievalEvaluation:
    data: str
    images: int
    captions: int
    metrics: RetrievalMetrics

    def to_dict(self) -> dict[str, Any]:
        return {
            "data": self.data,
            "images": self.images,
            "captions": self.captions,
            "metrics": self.metrics.to_dict(),
        }


@dataclass(frozen=True)
class ZeroShotEvaluation:
    data: str
    metrics: ZeroShotReport

    def to_dict(self) -> dict[str, Any]:
        return {"data": self.data, "metrics": self.metrics.to_dict()}


@dataclass
class EvaluationReport:
    """What one `clipsearch eval` measured; each part is None when it was not asked for."""

    model: ModelIdentity | None = None
    retrieval: RetrievalEvaluation | None = None
    zero_shot: ZeroShotEvaluation | None = None
    ann: AnnReport | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        if self.model is not None:
            data["model"] = self.model.to_dict()
        if self.retrieval is not None:
            data["retrieval"] = self.retrieval.to_dict()
        if self.zero_shot is not None:
            data["zero_shot"] = self.zero_shot.to_dict()
        if self.ann is not None:
            data["ann"] = self.ann.to_dict()
        data["warnings"] = self.warnings
        return data


@dataclass(frozen=True)
class EvaluationSets:
    """The labelled sets to measure a model on, and how to read and prompt them."""

    retrieval: Path | None = None
    zero_shot: Path | None = None
    data_format: str = "auto"
    prompt: str = "a photo of a {}."  # the single zero-shot prompt; class-folder captions
    templates: tuple[str, ...] = ()  # the zero-shot ensemble
    max_pixels: int = DEFAULT_MAX_PIXELS


def evaluate_sets(encoder: Encoder, sets: EvaluationSets) -> EvaluationReport:
    """Retrieval and zero-shot metrics of `encoder` on the given sets (each read and embedded
    once, even when one set serves both)."""
    report = EvaluationReport(model=encoder.identity)
    loaded: dict[Path, TrainingSet] = {}
    embedded: dict[Path, EmbeddedSet] = {}
    for path in (sets.retrieval, sets.zero_shot):
        if path is None or path in loaded:
            continue
        # Class folders get the single prompt as caption for retrieval; zero-shot renders its
        # templates itself.
        loaded[path] = load_training_set(
            path, fmt=sets.data_format, templates=(sets.prompt,), max_pixels=sets.max_pixels
        )
        report.warnings += loaded[path].warnings
        embedded[path] = embed_set_images(encoder, loaded[path], max_pixels=sets.max_pixels)
        report.warnings += embedded[path].warnings
    if sets.retrieval is not None:
        dataset = loaded[sets.retrieval]
        metrics, used = evaluate_retrieval(encoder, dataset, embedded=embedded[sets.retrieval])
        report.retrieval = RetrievalEvaluation(
            data=str(sets.retrieval),
            images=len(used.sample_indices),
            captions=len({dataset.samples[i].caption for i in used.sample_indices}),
            metrics=metrics,
        )
    if sets.zero_shot is not None:
        zero_shot, _ = evaluate_zero_shot(
            encoder,
            loaded[sets.zero_shot],
            prompt=sets.prompt,
            templates=sets.templates,
            embedded=embedded[sets.zero_shot],
        )
        report.zero_shot = ZeroShotEvaluation(data=str(sets.zero_shot), metrics=zero_shot)
    return report

"""Model and index quality: caption retrieval, zero-shot classification, ANN recall.

The metric functions work on embeddings, so tests can hand-make cases whose answer is known;
the `evaluate_*` functions embed a `TrainingSet` with an `Encoder` first.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.catalog import Catalog
from retrieval.encoder import Encoder
from retrieval.errors import EmptyIndex, ImageError, TrainingDataError
from retrieval.prompts import class_text_embeddings, render
from retrieval.shards import INDEX_KINDS, IndexParams, ShardSet, iter_live_vectors, write_shard
from retrieval.training_data import DEFAULT_MAX_PIXELS, TrainingSet, load_sample_image

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

    import torch

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
                chunks.append(encoder.encode_image_tensors(torch.stack(tensors)))
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
# ANN quality


@dataclass(frozen=True)
class AnnKindResult:
    kind: str  # as asked
    built: str  # what choose_params made of it for this many vectors (tiny sets give flat)
    params: dict[str, Any]
    recall: float
    build_seconds: float
    latency_ms_p50: float
    latency_ms_p95: float

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("recall", "build_seconds", "latency_ms_p50", "latency_ms_p95"):
            data[key] = round(data[key], 4)
        return data


@dataclass(frozen=True)
class AnnReport:
    vectors: int
    queries: int
    k: int
    ef_search: int
    nprobe: int
    kinds: list[AnnKindResult]

    def to_dict(self) -> dict[str, Any]:
        return {
            "vectors": self.vectors,
            "queries": self.queries,
            "k": self.k,
            "ef_search": self.ef_search,
            "nprobe": self.nprobe,
            "kinds": [kind.to_dict() for kind in self.kinds],
        }


def live_embeddings(catalog: Catalog, index_dir: Path) -> np.ndarray:
    """The stored (float16 -> float32) vectors of the current generation, tombstones excluded."""
    shard_ids = [row.id for row in catalog.shards()]
    deleted = catalog.tombstoned_ids()
    with ShardSet.open(index_dir, shard_ids, deleted_ids=deleted) as shards:
        parts = [
            np.asarray(vectors, dtype=np.float32)
            for _, vectors in iter_live_vectors(shards.shards, deleted)
        ]
    if not parts or not sum(len(p) for p in parts):
        raise EmptyIndex("the index has no live vectors to evaluate")
    return np.concatenate(parts)


def ann_quality(
    vectors: np.ndarray,
    *,
    kinds: Sequence[str] = INDEX_KINDS,
    k: int = 10,
    queries: int = 200,
    ef_search: int = 128,
    nprobe: int = 32,
    seed: int = 0,
) -> AnnReport:
    """Recall@k of each index kind against exact search, and single-query latency.

    `queries` rows are held out as queries and the rest indexed, so no query finds itself.
    Each kind is written and searched through the product's own shard code (IVF-PQ results
    are re-scored from the stored embeddings, as in serving).
    """
    data = np.ascontiguousarray(vectors, dtype=np.float32)
    if data.ndim != 2 or len(data) < 2:
        raise EmptyIndex("ANN evaluation needs at least two vectors")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data))
    n_queries = max(1, min(queries, len(data) // 2))
    q, base = data[order[:n_queries]], data[order[n_queries:]]
    k = min(k, len(base))
    ids = np.arange(len(base), dtype=np.int64)
    # Ground truth from the float16 values a shard stores, as serving scores them.
    stored = base.astype(np.float16).astype(np.float32)
    truth = np.argsort(-(q @ stored.T), axis=1, kind="stable")[:, :k]
    results = []
    with tempfile.TemporaryDirectory(prefix="clipsearch-ann-") as tmp:
        for kind in kinds:
            started = time.perf_counter()
            manifest = write_shard(
                Path(tmp),
                f"eval-{kind}",
                ids=ids,
                embeddings=base,
                params=IndexParams(kind=kind),
                model={"evaluation": True},
            )
            build = time.perf_counter() - started
            with ShardSet.open(Path(tmp), [manifest.shard_id], threads=1) as shard_set:
                found = np.empty((n_queries, k), dtype=np.int64)
                latencies = []
                shard_set.search(q[:1], k, ef_search=ef_search, nprobe=nprobe)  # warm-up
                for row in range(n_queries):
                    started = time.perf_counter()
                    _, labels = shard_set.search(
                        q[row : row + 1], k, ef_search=ef_search, nprobe=nprobe
                    )
                    latencies.append((time.perf_counter() - started) * 1000)
                    found[row] = labels[0]
            hits = sum(len(np.intersect1d(found[r], truth[r])) for r in range(n_queries))
            results.append(
                AnnKindResult(
                    kind=kind,
                    built=manifest.kind,
                    params=manifest.params,
                    recall=hits / (n_queries * k),
                    build_seconds=build,
                    latency_ms_p50=float(np.percentile(latencies, 50)),
                    latency_ms_p95=float(np.percentile(latencies, 95)),
                )
            )
    return AnnReport(
        vectors=len(base),
        queries=n_queries,
        k=k,
        ef_search=ef_search,
        nprobe=nprobe,
        kinds=results,
    )

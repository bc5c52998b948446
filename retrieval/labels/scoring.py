"""Scoring vectors against a label set: class embeddings, and the labels of a block of images.

Each label becomes one class embedding: the mean of its prompts' text embeddings (its name and
synonyms rendered through the set's templates, or its own prompts), renormalised. An image's
labels are the probabilities the model itself would give: for CLIP, the softmax over all
classes of its scaled cosines; for SigLIP, trained with a sigmoid loss, an independent
sigmoid(scale * cosine + bias) per class (so they need not sum to one).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from retrieval.labels.definitions import LabelSet
from retrieval.models.backend import ScoreRule
from retrieval.models.prompts import prompt_group_embeddings


@dataclass(frozen=True)
class ClassEmbeddings:
    """Unit class vectors (C, d) float32 and the model's score rule: the logit scale that turns
    cosines into logits, and for sigmoid (SigLIP) models the logit bias."""

    vectors: np.ndarray
    logit_scale: float
    logit_bias: float | None = None  # None: softmax over the classes

    @property
    def count(self) -> int:
        return int(self.vectors.shape[0])


def class_embeddings(
    encode_texts: Callable[[list[str]], np.ndarray], label_set: LabelSet, rule: ScoreRule
) -> ClassEmbeddings:
    """Encode every label's prompts and average them per label (see prompt_group_embeddings)."""
    vectors = prompt_group_embeddings(encode_texts, label_set.prompt_groups())
    return ClassEmbeddings(vectors, float(rule.logit_scale), rule.logit_bias)


@dataclass(frozen=True)
class BlockLabels:
    """The stored labels of a block of images: per image up to k labels, best first.

    `labels`, `scores` and `cosines` are (n, k); `keep` says which entries passed their
    thresholds. Kept entries come first in each row, so a row's kept labels are its prefix.
    """

    labels: np.ndarray  # int64 label indices
    scores: np.ndarray  # float32 probabilities
    cosines: np.ndarray  # float32
    keep: np.ndarray  # bool


def score_block(
    vectors: np.ndarray,
    classes: ClassEmbeddings,
    top_k: int,
    min_probability: np.ndarray | None = None,
    min_cosine: np.ndarray | None = None,
) -> BlockLabels:
    """The top-k labels of each row of `vectors` (unit rows, float16 or float32).

    Probabilities follow the model's rule (softmax over all classes of logit_scale * cosine, or
    the sigmoid with bias), computed exactly; labels under their thresholds are dropped and the
    survivors keep their order.
    """
    k = min(top_k, classes.count)
    if sys.modules.get("torch") is not None:  # the torch runtime's process: its kernels, as before
        labels, scores, cos = _top_torch(vectors, classes, k)
    else:  # an export's (CLIPSEARCH_RUNTIME=onnx): no torch to import
        labels, scores, cos = _top_numpy(vectors, classes, k)
    keep = np.ones(labels.shape, dtype=bool)
    if min_probability is not None:
        keep &= scores >= min_probability[labels]
    if min_cosine is not None:
        keep &= cos >= min_cosine[labels]
    if not keep.all():
        # Move the survivors to the front of each row, in their order (a stable sort).
        order = np.argsort(~keep, axis=1, kind="stable")
        labels, scores, cos, keep = (
            np.take_along_axis(a, order, axis=1) for a in (labels, scores, cos, keep)
        )
    return BlockLabels(labels, scores, cos, keep)


def _top_torch(
    vectors: np.ndarray, classes: ClassEmbeddings, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import torch

    scale = classes.logit_scale
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(vectors)).float()
        # The scale goes into the (small) class matrix, not the (n, C) product.
        logits = x @ (torch.from_numpy(classes.vectors) * scale).T
        top_logits, top_idx = torch.topk(logits, k, dim=1)
        if classes.logit_bias is not None:
            # Sigmoid models score each class on its own: the ranking is the logits' ranking.
            probs = torch.sigmoid(top_logits + classes.logit_bias)
        else:
            # Softmax denominators shifted by each row's maximum, in place: the (n, C) matrix
            # is the largest thing a block holds, so no second copy of it is made.
            best = top_logits[:, :1]
            total = logits.sub_(best).exp_().sum(dim=1, keepdim=True)
            probs = torch.exp(top_logits - best) / total
    return (
        top_idx.numpy().astype(np.int64),
        probs.numpy().astype(np.float32),
        (top_logits / scale).numpy().astype(np.float32),
    )


def _top_numpy(
    vectors: np.ndarray, classes: ClassEmbeddings, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`_top_torch` in numpy (float32 throughout; equal to it up to float rounding)."""
    scale = np.float32(classes.logit_scale)
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    logits = x @ (classes.vectors.astype(np.float32) * scale).T
    if k < logits.shape[1]:
        part = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(logits.shape[1]), logits.shape)
    part_logits = np.take_along_axis(logits, part, axis=1)
    order = np.argsort(-part_logits, axis=1, kind="stable")
    top_idx = np.take_along_axis(part, order, axis=1)
    top_logits = np.take_along_axis(part_logits, order, axis=1)
    if classes.logit_bias is not None:
        probs = 1.0 / (1.0 + np.exp(-(top_logits + np.float32(classes.logit_bias))))
    else:
        best = top_logits[:, :1]
        logits -= best
        np.exp(logits, out=logits)
        total = logits.sum(axis=1, keepdims=True)
        probs = np.exp(top_logits - best) / total
    return (
        top_idx.astype(np.int64),
        probs.astype(np.float32),
        (top_logits / scale).astype(np.float32),
    )


def rank_labels(vector: np.ndarray, classes: ClassEmbeddings) -> list[tuple[int, float, float]]:
    """Every label for one image vector: (label index, probability, cosine), best first."""
    block = score_block(vector.reshape(1, -1), classes, classes.count)
    return [
        (int(label), float(score), float(cosine))
        for label, score, cosine in zip(
            block.labels[0], block.scores[0], block.cosines[0], strict=True
        )
    ]

"""retrieval.training.evaluate: metrics on hand-made embeddings whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.index.ann_quality import ann_quality
from retrieval.models.prompts import class_text_embeddings
from retrieval.training.evaluate import retrieval_metrics, zero_shot_accuracy


def unit(*rows: list[float]) -> np.ndarray:
    x = np.array(rows, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_retrieval_ranks_with_unique_captions() -> None:
    images = unit([1, 0, 0], [0, 1, 0], [0, 0, 1])
    # Text 1 lies nearer image 2 than its own image 1: rank 2 both ways for that pair.
    texts = unit([1, 0, 0], [0, 0.6, 0.8], [0, 0, 1])
    metrics = retrieval_metrics(images, texts, [(0, 0), (1, 1), (2, 2)], ks=(1, 2), purity_k=1)
    t2i, i2t = metrics.text_to_image, metrics.image_to_text
    assert t2i.queries == 3 and i2t.queries == 3
    assert t2i.recall == {1: pytest.approx(2 / 3), 2: 1.0}
    assert t2i.mean_rank == pytest.approx(4 / 3) and t2i.median_rank == 1
    # Image 2 scores text 1 (0.8) below text 2 (1.0): fine; image 1 scores text 1 at 0.6, top.
    assert i2t.recall == {1: 1.0, 2: 1.0}
    assert metrics.all_relevant_at == {1: pytest.approx(2 / 3)}


def test_repeated_captions_count_any_relevant_image_and_purity() -> None:
    # Classes a (images 0, 1, 4) and b (images 2, 3); image 4 of class a looks like b.
    images = unit([1, 0], [1, 0.1], [0, 1], [0.6, 0.8], [0.5, 0.87])
    texts = unit([1, 0], [0, 1])  # "a", "b"
    pairs = [(0, 0), (1, 0), (4, 0), (2, 1), (3, 1)]
    metrics = retrieval_metrics(images, texts, pairs, ks=(1,), purity_k=2)
    assert metrics.text_to_image.recall == {1: 1.0}  # each text's best image is relevant
    # "a" -> images 0, 1 (both relevant); "b" -> image 2, then image 4 (class a).
    assert metrics.all_relevant_at == {2: 0.5}
    assert metrics.precision_at == {2: 0.75}
    assert metrics.class_queries == 2
    # Image 4 ranks its caption "a" second.
    assert metrics.image_to_text.recall == {1: pytest.approx(0.8)}
    assert metrics.image_to_text.mean_rank == pytest.approx(1.2)


def test_retrieval_needs_pairs() -> None:
    with pytest.raises(ValueError):
        retrieval_metrics(unit([1, 0]), unit([1, 0]), [])


def test_zero_shot_top1_and_top5() -> None:
    classes = np.eye(6, dtype=np.float32)
    # Image i is nearest class i, except image 5, whose true class is only third nearest.
    images = np.eye(6, dtype=np.float32) + 0.01
    images[5] = unit([0.9, 0.8, 0, 0, 0, 0.7])[0]
    labels = np.arange(6)
    result = zero_shot_accuracy(images, labels, classes)
    assert result.images == 6 and result.classes == 6
    assert result.top1 == pytest.approx(5 / 6)
    assert result.top5 == 1.0
    two = zero_shot_accuracy(images[:2], labels[:2], classes[:2])
    assert two.top5 == 1.0  # top-k is capped at the number of classes


def test_class_text_embeddings_average_templates_and_renormalise() -> None:
    table = {
        "a x": [1.0, 0.0],
        "the x": [0.0, 1.0],
        "a y": [1.0, 0.0],
        "the y": [1.0, 0.0],
    }

    def encode(texts: list[str]) -> np.ndarray:
        return np.array([table[t] for t in texts], dtype=np.float32)

    vectors = class_text_embeddings(encode, ["x", "y"], ["a {}", "the {}"])
    np.testing.assert_allclose(vectors, np.array([[2**-0.5, 2**-0.5], [1.0, 0.0]]), atol=1e-6)


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, dim))
    x = centres[rng.integers(0, 20, n)] + 0.5 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_ann_quality_flat_is_exact_and_small_sets_degrade_kinds() -> None:
    report = ann_quality(clustered(1100, 32, seed=3), queries=50, k=10)
    assert report.vectors == 1050 and report.queries == 50 and report.k == 10
    by_kind = {r.kind: r for r in report.kinds}
    assert list(by_kind) == ["flat", "hnsw", "ivf", "ivfpq"]
    assert by_kind["flat"].recall == 1.0
    assert by_kind["hnsw"].built == "hnsw" and by_kind["hnsw"].recall >= 0.9
    # 1050 vectors train 26 lists; PQ would need 39 * 256 points, so ivfpq is built as ivf.
    assert by_kind["ivf"].built == "ivf" and by_kind["ivf"].params["nlist"] == 26
    assert by_kind["ivfpq"].built == "ivf"
    assert all(0 <= r.recall <= 1 and r.latency_ms_p50 > 0 for r in report.kinds)


def test_ann_quality_tiny_index_builds_flat_for_every_kind() -> None:
    report = ann_quality(clustered(40, 8, seed=1), queries=200, k=10)
    assert report.queries == 20 and report.vectors == 20
    assert {r.built for r in report.kinds} == {"flat", "hnsw"}
    assert all(r.recall == 1.0 for r in report.kinds if r.built == "flat")

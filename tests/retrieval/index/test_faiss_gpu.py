"""GPU search logic, run on the CPU: the device copies here are CPU clones that refuse selectors.

A FAISS GPU index silently ignores an IDSelector, so the shard set must never rely on one there.
`SelectorBlindCopies` places a CPU clone of each shard's index behind a proxy that raises if a
search passes a selector, and counts the searches, so these tests show that tombstones are
dropped by over-fetching, that filtered searches stay on the CPU, and that every fallback gives
the CPU's answer. No GPU is needed; the real copy (`FaissGpu`) differs only in `copy_index`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest

from retrieval.config import load_settings
from retrieval.errors import ConfigError
from retrieval.index.faiss_gpu import (
    DevicePlacement,
    device_number,
    gpu_available,
    placement_from_settings,
    resolve_faiss_gpu,
)
from retrieval.index.shard_set import ShardSet
from tests.retrieval.index.test_shards import (
    assert_same_results,
    brute_force,
    ids_for,
    unit_vectors,
    write,
)

N = 3000


class SelectorBlind:
    """Stands in for a GPU index: searches a CPU clone, refuses selectors, counts calls."""

    def __init__(self, index: faiss.Index, lock: Any, *, fail: bool = False) -> None:
        self.index = index
        self.lock = lock
        self.ntotal = index.ntotal
        self.searches = 0
        self.fail = fail

    def search(self, x: np.ndarray, k: int, params: Any = None) -> tuple[np.ndarray, np.ndarray]:
        assert self.lock.locked(), "a device search must hold the device lock"
        if params is not None and params.sel is not None:
            raise AssertionError("a selector was passed to a device index, which would ignore it")
        if self.fail:
            raise RuntimeError("device lost")
        self.searches += 1
        return self.index.search(x, k, params=params)


class SelectorBlindCopies(DevicePlacement):
    def __init__(self, *, max_k: int = 2048, fail: bool = False) -> None:
        super().__init__()
        self.max_k = max_k
        self.fail = fail
        self.copies_made = 0
        self.proxies: list[SelectorBlind] = []

    def copy_index(self, index: faiss.Index, kind: str) -> Any:
        # A copy uses the device's resources, as a search does: never beside one.
        assert self.lock.locked(), "copy_index must run under the device lock"
        self.copies_made += 1
        proxy = SelectorBlind(faiss.clone_index(index), self.lock, fail=self.fail)
        self.proxies.append(proxy)
        return proxy

    @property
    def searches(self) -> int:
        return sum(p.searches for p in self.proxies)


@pytest.fixture(scope="module")
def shards_by_kind(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[Path, np.ndarray, np.ndarray]]:
    """kind -> (index_dir, vectors, ids); ids disjoint across kinds, so any mix forms a set."""
    index_dir = tmp_path_factory.mktemp("gpu-kinds")
    out = {}
    for number, kind in enumerate(("flat", "hnsw", "ivf", "ivfpq")):
        n = 10_000 if kind == "ivfpq" else N  # PQ codebooks need 39 * 256 training points
        x = unit_vectors(n, seed=40 + number)
        ids = ids_for(n, offset=number * 1_000_000)
        manifest = write(index_dir, kind, ids, x, kind)
        assert manifest.kind == kind
        out[kind] = (index_dir, x, ids)
    return out


def _deleted(ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.choice(ids, size=int(len(ids) * fraction), replace=False)


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_device_search_drops_tombstones_and_equals_the_cpu(kind: str, shards_by_kind) -> None:
    index_dir, x, ids = shards_by_kind[kind]
    deleted = _deleted(ids, 0.2, seed=1)
    queries = x[:40]
    gpu = SelectorBlindCopies()
    with ShardSet.open(index_dir, [kind], deleted_ids=deleted, gpu=gpu) as on_gpu:
        assert on_gpu.device_shards == [kind]
        got = on_gpu.search(queries, 30, nprobe=8)
    assert gpu.searches == 1
    assert not np.isin(got[1], deleted).any() and (got[1] >= 0).all()
    with ShardSet.open(index_dir, [kind], deleted_ids=deleted) as on_cpu:
        want = on_cpu.search(queries, 30, nprobe=8)
    assert_same_results(got, want)
    if kind == "flat":
        live = ~np.isin(ids, deleted)
        assert_same_results(got, brute_force(queries, ids[live], x[live], 30))


def test_device_ivfpq_is_refined_and_never_worse_than_the_cpu(shards_by_kind) -> None:
    index_dir, x, ids = shards_by_kind["ivfpq"]
    deleted = _deleted(ids, 0.1, seed=2)
    live = np.flatnonzero(~np.isin(ids, deleted))[:40]
    queries = x[live]
    gpu = SelectorBlindCopies()
    with ShardSet.open(index_dir, ["ivfpq"], deleted_ids=deleted, gpu=gpu) as on_gpu:
        scores, labels = on_gpu.search(queries, 10)
    assert gpu.searches == 1
    assert not np.isin(labels, deleted).any() and (labels >= 0).all()
    # Re-scored exactly: each query finds itself with its stored (float16) score.
    np.testing.assert_array_equal(labels[:, 0], ids[live])
    with ShardSet.open(index_dir, ["ivfpq"], deleted_ids=deleted) as on_cpu:
        cpu_scores, _ = on_cpu.search(queries, 10)
    # The device's candidates (top k*refine + tombstones, minus tombstones) include the CPU's
    # (top k*refine of the live ones), and both are scored exactly, so no score is lower.
    assert (scores >= cpu_scores - 1e-6).all()


def test_hnsw_stays_on_the_cpu(shards_by_kind) -> None:
    index_dir, x, ids = shards_by_kind["hnsw"]
    gpu = SelectorBlindCopies()
    with ShardSet.open(index_dir, ["hnsw"], gpu=gpu) as shards:
        assert shards.device_shards == []
        _, labels = shards.search(x[:5], 1)
    assert gpu.copies_made == 0
    np.testing.assert_array_equal(labels[:, 0], ids[:5])


def test_filtered_searches_stay_on_the_cpu(shards_by_kind) -> None:
    index_dir, x, ids = shards_by_kind["flat"]
    allowed = ids[::3]
    gpu = SelectorBlindCopies()
    with ShardSet.open(index_dir, ["flat"], gpu=gpu) as shards:
        got = shards.search(x[:10], 20, allowed_ids=allowed)
    assert gpu.searches == 0
    keep = np.isin(ids, allowed)
    assert_same_results(got, brute_force(x[:10], ids[keep], x[keep], 20))


def test_too_many_tombstones_for_the_device_k_limit_use_the_cpu(shards_by_kind) -> None:
    index_dir, x, ids = shards_by_kind["flat"]
    deleted = _deleted(ids, 0.2, seed=3)  # 600 tombstones + k = 10 > max_k = 500
    gpu = SelectorBlindCopies(max_k=500)
    with ShardSet.open(index_dir, ["flat"], deleted_ids=deleted, gpu=gpu) as shards:
        got = shards.search(x[:10], 10)
    assert gpu.searches == 0
    live = ~np.isin(ids, deleted)
    assert_same_results(got, brute_force(x[:10], ids[live], x[live], 10))


def test_a_failing_device_falls_back_to_the_cpu(shards_by_kind) -> None:
    index_dir, x, _ = shards_by_kind["ivf"]
    gpu = SelectorBlindCopies(fail=True)
    with ShardSet.open(index_dir, ["ivf"], gpu=gpu) as on_gpu:
        got = on_gpu.search(x[:10], 10)
    with ShardSet.open(index_dir, ["ivf"]) as on_cpu:
        want = on_cpu.search(x[:10], 10)
    assert_same_results(got, want)


def test_copies_are_reused_across_sets_and_released_by_retain(shards_by_kind) -> None:
    index_dir, _, _ = shards_by_kind["flat"]
    gpu = SelectorBlindCopies()
    for _ in range(2):
        with ShardSet.open(index_dir, ["flat", "ivf", "hnsw"], gpu=gpu) as shards:
            assert sorted(shards.device_shards) == ["flat", "ivf"]
    assert gpu.copies_made == 2
    assert gpu.placed == ["flat", "ivf"]
    gpu.retain({"ivf", "hnsw"})
    assert gpu.placed == ["ivf"]


def test_a_failed_copy_keeps_that_shard_on_the_cpu(shards_by_kind) -> None:
    class OutOfMemory(SelectorBlindCopies):
        def copy_index(self, index: faiss.Index, kind: str) -> Any:
            if kind == "ivf":
                raise RuntimeError("cudaMalloc error out of memory [2]")
            return super().copy_index(index, kind)

    index_dir, x, ids = shards_by_kind["flat"]
    gpu = OutOfMemory()
    with ShardSet.open(index_dir, ["flat", "ivf"], gpu=gpu) as shards:
        assert shards.device_shards == ["flat"]
        _, labels = shards.search(x[:3], 1)
    np.testing.assert_array_equal(labels[:, 0], ids[:3])


# ------------------------------------------------------------------------------------------
# The setting


def test_resolve_faiss_gpu_modes() -> None:
    assert resolve_faiss_gpu("off", "auto") is False
    assert resolve_faiss_gpu("auto", "cpu") is False
    with pytest.raises(ConfigError, match="CLIPSEARCH_DEVICE=cpu"):
        resolve_faiss_gpu("on", "cpu")
    with pytest.raises(ConfigError) as bad:
        resolve_faiss_gpu("yes", "auto")
    assert bad.value.setting == "CLIPSEARCH_FAISS_GPU"
    assert device_number("cuda:3") == 3 and device_number("auto") == 0


@pytest.mark.skipif(gpu_available(), reason="this FAISS sees a GPU")
def test_on_without_a_gpu_fails_clearly_and_auto_uses_the_cpu() -> None:
    assert resolve_faiss_gpu("auto", "auto") is False
    assert placement_from_settings("auto", "auto") is None
    with pytest.raises(ConfigError) as err:
        resolve_faiss_gpu("on", "cuda")
    assert err.value.setting == "CLIPSEARCH_FAISS_GPU"
    assert "faiss-cpu" in str(err.value)


def test_bad_setting_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPSEARCH_FAISS_GPU", "sometimes")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert err.value.setting == "CLIPSEARCH_FAISS_GPU"
    monkeypatch.setenv("CLIPSEARCH_FAISS_GPU", "off")
    assert load_settings().faiss_gpu == "off"

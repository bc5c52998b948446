"""retrieval.index: shard files, the crash-safety contract, and exact filtered search."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import faiss
import numpy as np
import pytest

from retrieval.errors import CorruptShard, EmptyIndex, ModelMismatch
from retrieval.index.kinds import (
    INDEX_KINDS,
    IndexParams,
    build_index,
    choose_params,
    default_pq_m,
    resolve_params,
)
from retrieval.index.shard import (
    EMBEDDINGS_FILE,
    INDEX_FILE,
    MANIFEST_FILE,
    Shard,
    iter_live_vectors,
    list_shard_dirs,
    read_manifest,
    remove_shard_dir,
    write_shard,
)
from retrieval.index.shard_set import ShardSet

DIM = 64
MODEL = {"name": "tiny", "pretrained": "/tmp/tiny.pt", "sha256": "ab" * 32, "dim": DIM}
# PQ codebooks need 39 * 256 training points; below that "ivfpq" degrades to "ivf".
SIZES = {"flat": 2000, "hnsw": 2000, "ivf": 2000, "ivfpq": 10_000}


def unit_vectors(n: int, dim: int = DIM, *, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered_unit_vectors(
    n: int, dim: int, *, clusters: int, spread: float, seed: int
) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    x = centres[rng.integers(0, clusters, size=n)]
    x += spread * rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(
    queries: np.ndarray, ids: np.ndarray, vectors: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Reference top-k over float16-canonical vectors, padded like ShardSet.search."""
    canonical = vectors.astype(np.float16).astype(np.float32)
    scores = queries @ canonical.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top_s = np.take_along_axis(scores, order, axis=1)
    top_i = ids[order]
    if top_i.shape[1] < k:
        pad = k - top_i.shape[1]
        top_s = np.pad(top_s, ((0, 0), (0, pad)), constant_values=-np.inf)
        top_i = np.pad(top_i, ((0, 0), (0, pad)), constant_values=-1)
    return top_s, top_i


def assert_same_results(got: tuple[np.ndarray, np.ndarray], want: tuple[np.ndarray, np.ndarray]):
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each row of `truth` that `found` contains."""
    hits = [len(set(a) & set(b)) for a, b in zip(found, truth, strict=True)]
    return float(np.mean(hits)) / truth.shape[1]


def ids_for(n: int, *, offset: int = 0) -> np.ndarray:
    # Ids that are not row positions, so the id mapping is exercised.
    return np.arange(n, dtype=np.int64) * 7 + 3 + offset


def write(index_dir: Path, shard_id: str, ids: np.ndarray, x: np.ndarray, kind: str):
    return write_shard(
        index_dir,
        shard_id,
        ids=ids,
        embeddings=x,
        params=choose_params(kind, len(ids), x.shape[1]),
        model=MODEL,
    )


@pytest.fixture(scope="module")
def kind_shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, np.ndarray]]:
    """One shard per kind, written once for the module; maps kind -> (index_dir, vectors)."""
    index_dir = tmp_path_factory.mktemp("kinds")
    out = {}
    for kind in INDEX_KINDS:
        x = unit_vectors(SIZES[kind], seed=INDEX_KINDS.index(kind))
        write(index_dir, kind, ids_for(len(x)), x, kind)
        out[kind] = (index_dir, x)
    return out


# ------------------------------------------------------------------------------------------
# Parameters


def test_choose_params_auto_rule() -> None:
    assert choose_params("auto", 49_999, 512).kind == "flat"
    assert choose_params("auto", 1_000_000, 512).kind == "hnsw"  # ~2.3 GB < 4 GiB
    big = choose_params("auto", 10_000_000, 512)
    assert (big.kind, big.pq_m, big.nlist) == ("ivfpq", 64, 12649)
    assert choose_params("auto", 1_000_000, 512, memory_budget_bytes=2**30).kind == "ivfpq"


def test_params_are_filled_from_n_and_small_shards_degrade() -> None:
    ivf = choose_params("ivf", 100_000, 64)
    assert ivf.nlist == 1265  # 4 * sqrt(n)
    assert choose_params("ivf", 2000, 64).nlist == 2000 // 39  # >= 39 training points per list
    assert choose_params("ivf", 600, 64).kind == "flat"
    assert choose_params("ivfpq", 5000, 64).kind == "ivf"  # too few points for PQ codebooks
    assert choose_params("ivfpq", 20_000, 64).pq_m == 8
    assert resolve_params(IndexParams("ivf", nlist=10_000), 2000, 64).nlist == 51
    assert choose_params("flat", 0, 64).kind == "flat"
    assert [default_pq_m(d) for d in (512, 768, 64, 100)] == [64, 96, 8, 10]
    with pytest.raises(ValueError):
        IndexParams("annoy")
    with pytest.raises(ValueError):
        resolve_params(IndexParams("ivfpq", pq_m=7), 20_000, 64)
    params = choose_params("ivfpq", 20_000, 64)
    assert IndexParams.from_dict(params.to_dict()) == params


def test_build_index_empty_and_tiny() -> None:
    empty = build_index(np.zeros((0, DIM), np.float32), np.zeros(0, np.int64), IndexParams("flat"))
    assert empty.ntotal == 0
    x = unit_vectors(50, seed=1)
    tiny = build_index(x, ids_for(50), IndexParams("ivf"))  # falls back to flat
    assert tiny.ntotal == 50 and faiss.try_extract_index_ivf(tiny) is None
    _, labels = tiny.search(x[:3], 1)
    np.testing.assert_array_equal(labels[:, 0], ids_for(50)[:3])


def test_build_index_ivf_is_deterministic() -> None:
    x = unit_vectors(3000, seed=2)
    params = choose_params("ivf", 3000, DIM)
    a = faiss.serialize_index(build_index(x, ids_for(3000), params))
    b = faiss.serialize_index(build_index(x, ids_for(3000), params))
    assert np.array_equal(a, b)


# ------------------------------------------------------------------------------------------
# Files on disk


@pytest.mark.parametrize("kind", INDEX_KINDS)
def test_write_then_open_round_trip(kind: str, kind_shards) -> None:
    index_dir, x = kind_shards[kind]
    shard = Shard.open(index_dir, kind, verify=True)
    n = SIZES[kind]
    assert (shard.shard_id, shard.kind, shard.count, shard.dim) == (kind, kind, n, DIM)
    np.testing.assert_array_equal(shard.ids, ids_for(n))
    assert shard.embeddings.dtype == np.float16
    assert isinstance(shard.embeddings, np.memmap)
    np.testing.assert_array_equal(shard.embeddings, x.astype(np.float16))
    assert shard.index.ntotal == n

    data = json.loads((index_dir / "shards" / kind / MANIFEST_FILE).read_text())
    assert data["format_version"] == 1
    assert data["shard_id"] == kind and data["kind"] == kind and data["params"]["kind"] == kind
    assert (data["count"], data["dim"], data["model"]) == (n, DIM, MODEL)
    assert datetime.fromisoformat(data["created_at"]).utcoffset() == timedelta(0)
    assert set(data["files"]) == {INDEX_FILE, EMBEDDINGS_FILE, "ids.npy"}
    for name, entry in data["files"].items():
        raw = (index_dir / "shards" / kind / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw)}
    assert read_manifest(index_dir / "shards" / kind) == shard.manifest
    if kind == "ivfpq":
        assert data["params"]["pq_m"] == 8 and data["params"]["nlist"] == 256


def test_rebuild_from_stored_embeddings_scores_bit_identically(tmp_path: Path) -> None:
    x = unit_vectors(1000, seed=3)
    write(tmp_path, "a", ids_for(1000), x, "flat")
    shard = Shard.open(tmp_path, "a")
    rebuilt = build_index(shard.rows_f32(np.arange(1000)), shard.ids, IndexParams("flat"))
    queries = unit_vectors(7, seed=4)
    assert np.array_equal(shard.index.search(queries, 10)[0], rebuilt.search(queries, 10)[0])


def test_write_sorts_ids_and_rejects_bad_input(tmp_path: Path) -> None:
    x = unit_vectors(100, seed=5)
    ids = np.random.default_rng(0).permutation(1000)[:100]
    write(tmp_path, "s1", ids, x, "flat")
    shard = Shard.open(tmp_path, "s1")
    np.testing.assert_array_equal(shard.ids, np.sort(ids))
    found, vectors = shard.vectors(ids[:5])
    np.testing.assert_array_equal(found, ids[:5])
    np.testing.assert_array_equal(vectors, x[:5].astype(np.float16).astype(np.float32))

    with pytest.raises(FileExistsError):
        write(tmp_path, "s1", ids, x, "flat")  # never overwrites a shard
    with pytest.raises(ValueError, match="unique"):
        write(tmp_path, "s2", np.zeros(100, np.int64), x, "flat")
    with pytest.raises(ValueError):
        write(tmp_path, "../escape", ids, x, "flat")
    with pytest.raises(ValueError):
        write(tmp_path, "s3", ids, x * 1e6, "flat")  # beyond float16
    with pytest.raises(TypeError):
        write_shard(
            tmp_path, "s4", ids=ids, embeddings=x, params=IndexParams("flat"), model={"x": object()}
        )
    assert list_shard_dirs(tmp_path) == ["s1"]  # failures left nothing behind


def test_empty_shard_is_valid(tmp_path: Path) -> None:
    write(tmp_path, "empty", np.zeros(0, np.int64), np.zeros((0, DIM), np.float32), "ivf")
    shard = Shard.open(tmp_path, "empty", verify=True)
    assert (shard.count, shard.kind) == (0, "flat")
    with ShardSet([shard]) as shards:
        scores, labels = shards.search(unit_vectors(2, seed=0), 3)
    assert (labels == -1).all() and np.isneginf(scores).all()


@pytest.mark.parametrize("name", [INDEX_FILE, EMBEDDINGS_FILE, "ids.npy"])
def test_verify_detects_a_flipped_byte(tmp_path: Path, name: str) -> None:
    write(tmp_path, "s", ids_for(500), unit_vectors(500, seed=6), "hnsw")
    path = tmp_path / "shards" / "s" / name
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptShard, match="sha256"):
        Shard.open(tmp_path, "s", verify=True)


def test_size_mismatch_is_corrupt_without_verify(tmp_path: Path) -> None:
    write(tmp_path, "s", ids_for(500), unit_vectors(500, seed=7), "flat")
    path = tmp_path / "shards" / "s" / EMBEDDINGS_FILE
    path.write_bytes(path.read_bytes()[:-16])
    with pytest.raises(CorruptShard, match="bytes"):
        Shard.open(tmp_path, "s")


def test_missing_manifest_is_an_orphan(tmp_path: Path) -> None:
    write(tmp_path, "done", ids_for(100), unit_vectors(100, seed=8), "flat")
    write(tmp_path, "killed", ids_for(100), unit_vectors(100, seed=9), "flat")
    # A writer killed before shard.json leaves exactly this.
    (tmp_path / "shards" / "killed" / MANIFEST_FILE).unlink()
    with pytest.raises(CorruptShard, match="never completely written"):
        Shard.open(tmp_path, "killed")
    assert list_shard_dirs(tmp_path) == ["done", "killed"]
    assert remove_shard_dir(tmp_path, "killed") is True
    assert remove_shard_dir(tmp_path, "killed") is False  # idempotent
    assert list_shard_dirs(tmp_path) == ["done"]
    Shard.open(tmp_path, "done", verify=True)  # the other shard is untouched
    assert list_shard_dirs(tmp_path / "nowhere") == []


def test_invalid_manifest_is_corrupt(tmp_path: Path) -> None:
    write(tmp_path, "s", ids_for(100), unit_vectors(100, seed=10), "flat")
    path = tmp_path / "shards" / "s" / MANIFEST_FILE
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "format_version": 2}))
    with pytest.raises(CorruptShard, match="format_version"):
        Shard.open(tmp_path, "s")
    path.write_text(json.dumps({**data, "count": 99}))
    with pytest.raises(CorruptShard):
        Shard.open(tmp_path, "s")
    path.write_text("{not json")
    with pytest.raises(CorruptShard):
        Shard.open(tmp_path, "s")


# ------------------------------------------------------------------------------------------
# Search


@pytest.mark.parametrize("kind", INDEX_KINDS)
def test_every_vector_retrieves_itself(kind: str, kind_shards) -> None:
    index_dir, x = kind_shards[kind]
    with ShardSet.open(index_dir, [kind]) as shards:
        scores, labels = shards.search(x, 1)
    # IVF-PQ passes honestly: its candidates are re-scored exactly from embeddings.npy.
    np.testing.assert_array_equal(labels[:, 0], ids_for(len(x)))
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=2e-3)


@pytest.mark.parametrize("kind", INDEX_KINDS)
def test_tombstones_are_never_returned(kind: str, kind_shards) -> None:
    index_dir, x = kind_shards[kind]
    ids = ids_for(len(x))
    rng = np.random.default_rng(11)
    deleted = rng.choice(ids, size=len(ids) * 3 // 10, replace=False)
    queries = x[rng.choice(len(x), 50, replace=False)]
    with ShardSet.open(index_dir, [kind], deleted_ids=deleted) as shards:
        assert shards.live_count == len(ids) - len(deleted) and shards.count == len(ids)
        scores, labels = shards.search(queries, 50)
        assert not np.isin(labels, deleted).any()
        assert (labels >= 0).all()
        if kind == "flat":
            live = ~np.isin(ids, deleted)
            assert_same_results((scores, labels), brute_force(queries, ids[live], x[live], 50))
        found, _ = shards.vectors(deleted[:3])
        assert found.size == 0


@pytest.mark.parametrize("kind", INDEX_KINDS)
def test_mostly_deleted_shard_is_searched_exactly(kind: str, kind_shards) -> None:
    index_dir, x = kind_shards[kind]
    ids = ids_for(len(x))
    keep = np.arange(0, len(ids), 50)  # 2% live: HNSW/IVF with such a filter would miss results
    deleted = np.delete(ids, keep)
    queries = unit_vectors(5, seed=12)
    with ShardSet.open(index_dir, [kind], deleted_ids=deleted) as shards:
        got = shards.search(queries, 60)
    assert_same_results(got, brute_force(queries, ids[keep], x[keep], 60))


@pytest.fixture(scope="module")
def two_shard_sets(tmp_path_factory: pytest.TempPathFactory):
    """For flat, hnsw and ivf: two shards of 10k vectors each (20k in all)."""
    index_dir = tmp_path_factory.mktemp("pairs")
    x = unit_vectors(20_000, seed=13)
    ids = ids_for(20_000)
    for kind in ("flat", "hnsw", "ivf"):
        write(index_dir, f"{kind}-0", ids[:10_000], x[:10_000], kind)
        write(index_dir, f"{kind}-1", ids[10_000:], x[10_000:], kind)
    return index_dir, ids, x


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
@pytest.mark.parametrize("n_allowed", [1, 10, 300, 6000])
def test_allowed_ids_give_the_exact_top_k(kind: str, n_allowed: int, two_shard_sets) -> None:
    index_dir, ids, x = two_shard_sets
    rng = np.random.default_rng(n_allowed)
    allowed = rng.choice(ids, size=n_allowed, replace=False)  # spans both shards
    deleted = rng.choice(allowed, size=n_allowed // 3, replace=False)
    live = np.isin(ids, allowed) & ~np.isin(ids, deleted)
    queries = unit_vectors(20, seed=14)
    with ShardSet.open(index_dir, [f"{kind}-0", f"{kind}-1"], deleted_ids=deleted) as shards:
        for k in (5, 20):
            got = shards.search(queries, k, allowed_ids=allowed)
            assert_same_results(got, brute_force(queries, ids[live], x[live], k))


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_idselector_path_through_faiss(kind: str, two_shard_sets) -> None:
    """exact_below=0, exact_fraction=0 forces FAISS + IDSelector (incl. via IndexIDMap)."""
    index_dir, ids, x = two_shard_sets
    rng = np.random.default_rng(15)
    allowed = rng.choice(ids, size=8000, replace=False)
    deleted = rng.choice(ids, size=3000, replace=False)
    live = np.isin(ids, allowed) & ~np.isin(ids, deleted)
    queries = unit_vectors(30, seed=16)
    want = brute_force(queries, ids[live], x[live], 10)
    shards = [Shard.open(index_dir, f"{kind}-{i}") for i in range(2)]
    with ShardSet(shards, deleted_ids=deleted, exact_below=0, exact_fraction=0) as shard_set:
        got = shard_set.search(queries, 10, allowed_ids=allowed, nprobe=10_000)
        assert np.isin(got[1], ids[live]).all()
        if kind == "hnsw":
            recall = recall_at(got[1], want[1])
            assert recall >= 0.98
        else:  # flat, and IVF probing every list, are exact
            assert_same_results(got, want)
        # Tombstones alone: the cached IDSelectorNot.
        _, labels = shard_set.search(queries, 10, nprobe=10_000)
        assert (labels >= 0).all() and not np.isin(labels, deleted).any()


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_idselector_with_sparse_ids(kind: str, tmp_path: Path) -> None:
    """Ids too sparse for a bitmap selector go through IDSelectorBatch."""
    x = unit_vectors(1000, seed=26)
    ids = np.arange(1000, dtype=np.int64) * 10**12 + 5
    write(tmp_path, kind, ids, x, kind)
    allowed, deleted = ids[::2], ids[::6]
    live = np.isin(ids, allowed) & ~np.isin(ids, deleted)
    queries = unit_vectors(10, seed=27)
    shards = [Shard.open(tmp_path, kind)]
    with ShardSet(shards, deleted_ids=deleted, exact_below=0, exact_fraction=0) as shard_set:
        got = shard_set.search(queries, 10, allowed_ids=allowed, nprobe=10_000)
    assert np.isin(got[1], ids[live]).all()
    if kind != "hnsw":
        assert_same_results(got, brute_force(queries, ids[live], x[live], 10))


def test_short_ivf_results_are_completed_exactly(kind_shards) -> None:
    index_dir, x = kind_shards["ivf"]
    queries = unit_vectors(4, seed=17)
    with ShardSet.open(index_dir, ["ivf"]) as shards:
        # One probed list of ~40 vectors cannot hold 200 results; the rows are redone exactly.
        got = shards.search(queries, 200, nprobe=1)
    assert_same_results(got, brute_force(queries, ids_for(len(x)), x, 200))


def test_multi_shard_merge_equals_one_flat_index(tmp_path: Path) -> None:
    x = unit_vectors(9000, seed=18)
    ids = ids_for(9000)
    for i in range(3):
        write(tmp_path, f"part{i}", ids[i::3], x[i::3], "flat")
    write(tmp_path, "whole", ids, x, "flat")
    queries = unit_vectors(40, seed=19)
    with ShardSet.open(tmp_path, ["part0", "part1", "part2"], threads=3) as parts:
        with ShardSet.open(tmp_path, ["whole"]) as whole:
            for k in (1, 10, 100):
                assert_same_results(parts.search(queries, k), whole.search(queries, k))


def test_fewer_vectors_than_k_are_padded(tmp_path: Path) -> None:
    x = unit_vectors(5, seed=20)
    write(tmp_path, "s", ids_for(5), x, "flat")
    with ShardSet.open(tmp_path, ["s"]) as shards:
        scores, labels = shards.search(x[:2], 8)
    assert scores.dtype == np.float32 and labels.dtype == np.int64
    assert (labels[:, 5:] == -1).all() and np.isneginf(scores[:, 5:]).all()
    assert (labels[:, :5] >= 0).all()


def test_empty_set_and_bad_queries(tmp_path: Path) -> None:
    with ShardSet([]) as empty:
        scores, labels = empty.search(unit_vectors(3, seed=0), 4)
        assert scores.shape == labels.shape == (3, 4) and (labels == -1).all()
        assert empty.count == empty.live_count == 0
        with pytest.raises(EmptyIndex):
            _ = empty.dim
    write(tmp_path, "s", ids_for(10), unit_vectors(10, seed=21), "flat")
    with ShardSet.open(tmp_path, ["s"]) as shards:
        with pytest.raises(ValueError):
            shards.search(unit_vectors(2, dim=32, seed=0), 3)
        with pytest.raises(ValueError):
            shards.search(unit_vectors(2, seed=0), 0)
    with pytest.raises(RuntimeError):
        shards.search(unit_vectors(2, seed=0), 3)


def test_set_rejects_mixed_models_dims_and_duplicate_ids(tmp_path: Path) -> None:
    x = unit_vectors(10, seed=22)
    write(tmp_path, "a", ids_for(10), x, "flat")
    write(tmp_path, "dup", ids_for(10), x, "flat")
    write_shard(
        tmp_path, "other", ids=ids_for(10, offset=1), embeddings=x,
        params=IndexParams("flat"), model={"name": "other"},
    )  # fmt: skip
    write(tmp_path, "narrow", ids_for(10, offset=2), unit_vectors(10, dim=32, seed=0), "flat")
    with pytest.raises(ModelMismatch):
        ShardSet.open(tmp_path, ["a", "other"])
    with pytest.raises(ValueError, match="dimension"):
        ShardSet.open(tmp_path, ["a", "narrow"])
    with pytest.raises(ValueError, match="more than one shard"):
        ShardSet.open(tmp_path, ["a", "dup"])


def test_vectors_and_iter_live_vectors(tmp_path: Path) -> None:
    x = unit_vectors(300, seed=23)
    ids = ids_for(300)
    write(tmp_path, "a", ids[:150], x[:150], "flat")
    write(tmp_path, "b", ids[150:], x[150:], "hnsw")
    deleted = ids[[3, 160, 299]]
    with ShardSet.open(tmp_path, ["a", "b"], deleted_ids=deleted) as shards:
        wanted = np.array([ids[200], 999_999, ids[3], ids[10]])
        found, vectors = shards.vectors(wanted)
        np.testing.assert_array_equal(found, [ids[200], ids[10]])
        np.testing.assert_array_equal(vectors, x[[200, 10]].astype(np.float16).astype(np.float32))
        chunks = list(iter_live_vectors(shards.shards, deleted))
    live_ids = np.concatenate([c[0] for c in chunks])
    np.testing.assert_array_equal(live_ids, np.delete(ids, [3, 160, 299]))
    live_vectors = np.concatenate([c[1] for c in chunks])
    assert live_vectors.dtype == np.float16
    np.testing.assert_array_equal(live_vectors, np.delete(x, [3, 160, 299], 0).astype(np.float16))


def test_concurrent_searches_agree(kind_shards) -> None:
    index_dir, x = kind_shards["hnsw"]
    deleted = ids_for(len(x))[::4]
    queries = unit_vectors(16, seed=24)
    with ShardSet.open(index_dir, ["hnsw"], deleted_ids=deleted) as shards:
        want = shards.search(queries, 10)
        results: list[tuple[np.ndarray, np.ndarray]] = []

        def worker() -> None:
            for _ in range(5):
                results.append(shards.search(queries, 10))

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(results) == 20
    for got in results:
        np.testing.assert_array_equal(got[1], want[1])


# ------------------------------------------------------------------------------------------
# Recall


@pytest.mark.slow
def test_recall_against_flat_on_100k_clustered_vectors(tmp_path: Path) -> None:
    n, dim, k = 100_000, 64, 10
    data = clustered_unit_vectors(n + 500, dim, clusters=1000, spread=1.0, seed=25)
    x, queries = data[:n], data[n:]
    ids = np.arange(n, dtype=np.int64)
    timings = {}
    for kind in ("flat", "hnsw", "ivf"):
        start = time.perf_counter()
        write_shard(
            tmp_path, kind, ids=ids, embeddings=x, params=choose_params(kind, n, dim), model=MODEL
        )
        timings[f"{kind}_build_s"] = time.perf_counter() - start
    with ShardSet.open(tmp_path, ["flat"]) as flat:
        _, truth = flat.search(queries, k)
    for kind in ("hnsw", "ivf"):
        with ShardSet.open(tmp_path, [kind]) as shards:
            start = time.perf_counter()
            _, found = shards.search(queries, k)
            timings[f"{kind}_search_s"] = time.perf_counter() - start
        recall = recall_at(found, truth)
        timings[f"{kind}_recall"] = recall
        assert recall >= 0.95, (kind, recall)
    print(json.dumps({name: round(float(v), 4) for name, v in timings.items()}))

"""The large-corpus kind (ivfpq-large): a template trained once, shards filled and grown from it
without training, exact filters and tombstones, memory-mapped serving, refusals and corruption."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest

from retrieval.errors import CorruptShard, TrainedTemplateError
from retrieval.index.integrity import check_shard
from retrieval.index.kinds import LARGE_KIND, IndexParams, build_index, choose_params
from retrieval.index.large import write_merged_shard
from retrieval.index.shard import (
    EMBEDDINGS_FILE,
    INDEX_FILE,
    Shard,
    read_index_file,
    shard_path,
    write_shard,
)
from retrieval.index.shard_set import LARGE_REFINE_FACTOR, ShardSet
from retrieval.index.trained import (
    TEMPLATE_FILE,
    load_template,
    template_dir,
    train_template,
    trained_state_bytes,
)
from tests.retrieval.index.test_shards import brute_force, clustered_unit_vectors

DIM = 32
NLIST = 16
KEY = "tinykey"
MODEL = {"name": "tiny", "key": KEY, "dim": DIM}
N = 3000


def vectors(n: int, seed: int) -> np.ndarray:
    x = clustered_unit_vectors(n, DIM, clusters=40, spread=0.6, seed=seed)
    return x.astype(np.float16).astype(np.float32)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    """A template trained on N vectors, a large shard "base" of them, and a shard "grown" that
    adds 300 new vectors to it and drops 100 of its tombstoned ones."""
    index_dir = tmp_path_factory.mktemp("large")
    x = vectors(N, seed=1)
    ids = np.arange(N, dtype=np.int64) * 3 + 10
    info = train_template(
        index_dir, x, nlist=NLIST, pq_m=8, pq_nbits=4, model=MODEL, corpus_count=N, use_gpu=False
    )
    write_shard(
        index_dir, "base", ids=ids, embeddings=x, params=info.params(), model=MODEL, use_gpu=False
    )
    template, info = load_template(index_dir, info.trained_id, model_key=KEY, dim=DIM)
    new_x = vectors(300, seed=2)
    # New ids between and after the old ones: the merge keeps embeddings.npy in id order.
    new_ids = np.sort(np.concatenate([ids[:150] + 1, np.arange(150) + 10 * N]))
    drop = ids[::30]
    write_merged_shard(
        index_dir,
        "grown",
        template=template,
        info=info,
        model=MODEL,
        base_id="base",
        drop_ids=drop,
        new_ids=new_ids,
        new_rows=lambda a, b: new_x[a:b].astype(np.float16),
        use_gpu=False,
        rows_per_block=256,  # several blocks, so new rows interleave with the old ones
    )
    all_ids = np.concatenate([ids, new_ids])
    all_x = np.concatenate([x, new_x])
    live = ~np.isin(all_ids, drop)
    return index_dir, info, template, all_ids[live], all_x[live], drop


def test_the_template_is_empty_trained_and_records_what_it_was_trained_on(built) -> None:
    index_dir, info, template, *_ = built
    assert template.ntotal == 0 and template.is_trained
    assert (info.trained_on, info.corpus_count, info.dim, info.nlist) == (N, N, DIM, NLIST)
    assert info.model["key"] == KEY
    params = Shard.open(index_dir, "base").manifest.params
    assert params["kind"] == LARGE_KIND and params["trained_id"] == info.trained_id


def test_growing_a_shard_trains_nothing(built) -> None:
    index_dir, info, template, ids, x, _ = built
    state = trained_state_bytes(template)
    for shard_id in ("base", "grown"):
        index = faiss.read_index(str(shard_path(index_dir, shard_id) / INDEX_FILE))
        assert trained_state_bytes(index) == state  # byte-identical quantizer and codebooks
    # The template on disk is unchanged too.
    path = template_dir(index_dir, info.trained_id) / TEMPLATE_FILE
    assert hashlib.sha256(path.read_bytes()).hexdigest() == info.sha256
    grown = Shard.open(index_dir, "grown", verify=True)
    order = np.argsort(ids)
    np.testing.assert_array_equal(grown.ids, ids[order])
    np.testing.assert_array_equal(grown.embeddings, x[order].astype(np.float16))
    assert grown.index.ntotal == len(ids)


def test_the_grown_shard_finds_old_and_new_vectors(built) -> None:
    index_dir, _, _, ids, x, drop = built
    with ShardSet.open(index_dir, ["grown"]) as shards:
        queries = x[::25]
        _, found = shards.search(queries, 10, nprobe=NLIST, refine_factor=16)
        _, truth = brute_force(queries, ids, x, 10)
        assert (found[:, 0] == ids[::25]).all()  # re-scored exactly: each finds itself first
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth, strict=True)])
        assert recall > 0.9
        assert not np.isin(found, drop).any()


def test_tombstones_and_filters_stay_exact(built) -> None:
    index_dir, _, _, ids, x, _ = built
    deleted = ids[::7]
    live = ~np.isin(ids, deleted)
    queries = x[1::40]
    allowed = ids[live][::3]
    keep = np.isin(ids, allowed)
    _, truth = brute_force(queries, ids[keep], x[keep], 10)
    with ShardSet.open(index_dir, ["grown"], deleted_ids=deleted) as shards:
        _, found = shards.search(queries, 10, nprobe=4)
        assert not np.isin(found, deleted).any()
        assert (found >= 0).all()
        # A filter through FAISS's IDSelector: only allowed live ids come back.
        shards.exact_below, shards.exact_fraction = 0, 0.0
        _, found = shards.search(queries, 10, allowed_ids=allowed, nprobe=NLIST)
        assert np.isin(found, allowed).all()
        # A selective filter is answered exactly from the stored vectors.
        shards.exact_below = 10**6
        _, found = shards.search(queries, 10, allowed_ids=allowed, nprobe=1)
        np.testing.assert_array_equal(found, truth)


def test_nprobe_is_the_search_depth(built) -> None:
    index_dir, _, _, ids, x, _ = built
    with ShardSet.open(index_dir, ["grown"]) as shards:
        queries = x[::10]
        _, truth = brute_force(queries, ids, x, 10)
        recalls = []
        for nprobe in (1, NLIST):
            _, found = shards.search(queries, 10, nprobe=nprobe, refine_factor=1)
            recalls.append(
                np.mean([len(set(a) & set(b)) for a, b in zip(found, truth, strict=True)])
            )
        assert recalls[0] < recalls[1]


def test_a_large_shard_rescores_at_least_16_candidates_per_result(built) -> None:
    index_dir, _, _, ids, x, _ = built
    with ShardSet.open(index_dir, ["grown"]) as shards:
        queries = x[::10]
        floor = shards.search(queries, 10, nprobe=NLIST, refine_factor=1)
        asked = shards.search(queries, 10, nprobe=NLIST, refine_factor=LARGE_REFINE_FACTOR)
    np.testing.assert_array_equal(floor[1], asked[1])  # 1 is raised to the floor


def test_served_memory_mapped(built) -> None:
    index_dir, *_ = built
    index = read_index_file(shard_path(index_dir, "grown") / INDEX_FILE)
    ivf: Any = faiss.extract_index_ivf(index)
    lists: Any = faiss.downcast_InvertedLists(ivf.invlists)
    # IO_FLAG_MMAP_IFC: the codes of every list point into the mapped file, owned by nobody.
    filled = [i for i in range(NLIST) if lists.list_size(i)]
    owned = [lists.codes.at(i).is_owned for i in filled]
    assert isinstance(lists, faiss.ArrayInvertedLists)
    assert filled and not any(owned)


def test_other_model_or_dimension_is_refused(built, tmp_path: Path) -> None:
    index_dir, info, template, *_ = built
    with pytest.raises(TrainedTemplateError, match="trained for model tinykey"):
        load_template(index_dir, info.trained_id, model_key="otherkey", dim=DIM)
    with pytest.raises(TrainedTemplateError, match="32-d"):
        load_template(index_dir, info.trained_id, model_key=KEY, dim=64)
    # A template of another training run cannot grow this shard.
    other = train_template(
        index_dir,
        vectors(2000, seed=5),
        nlist=NLIST,
        pq_m=8,
        pq_nbits=4,
        model=MODEL,
        corpus_count=2000,
        use_gpu=False,
    )
    other_template, other = load_template(index_dir, other.trained_id, model_key=KEY, dim=DIM)
    with pytest.raises(TrainedTemplateError, match="was not filled from it"):
        write_merged_shard(
            index_dir,
            "never",
            template=other_template,
            info=other,
            model=MODEL,
            base_id="grown",
            drop_ids=np.zeros(0, dtype=np.int64),
            new_ids=np.zeros(0, dtype=np.int64),
            new_rows=lambda a, b: np.zeros((0, DIM), np.float16),
            use_gpu=False,
        )
    assert not shard_path(index_dir, "never").exists()
    with pytest.raises(ValueError, match="from their trained template"):
        build_index(vectors(100, seed=3), np.arange(100), info.params())
    with pytest.raises(ValueError, match="name their trained template"):
        write_shard(
            tmp_path,
            "s",
            ids=np.arange(10),
            embeddings=vectors(10, seed=3),
            params=IndexParams(kind=LARGE_KIND, nlist=NLIST, pq_m=8),
            model=MODEL,
        )


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_corrupt_files_are_detected(built, tmp_path: Path) -> None:
    index_dir, info, template, ids, x, _ = built
    # A copy, so that the module's shards stay sound.
    copy = tmp_path / "index"
    shutil.copytree(index_dir, copy)
    path = template_dir(copy, info.trained_id) / TEMPLATE_FILE
    _flip(path, path.stat().st_size // 2)
    with pytest.raises(TrainedTemplateError, match="differs from its sha256"):
        load_template(copy, info.trained_id, model_key=KEY, dim=DIM)

    big = shard_path(copy, "grown") / INDEX_FILE
    _flip(big, big.stat().st_size // 2)
    check = check_shard(copy, "grown")
    assert INDEX_FILE in check.problems
    with pytest.raises(CorruptShard):
        write_merged_shard(
            copy,
            "never",
            template=template,
            info=info,
            model=MODEL,
            base_id="grown",
            drop_ids=np.zeros(0, dtype=np.int64),
            new_ids=np.zeros(0, dtype=np.int64),
            new_rows=lambda a, b: np.zeros((0, DIM), np.float16),
            use_gpu=False,
        )
    # A corrupt embeddings.npy of the base is found while it is streamed, before shard.json.
    emb = shard_path(copy, "base") / EMBEDDINGS_FILE
    _flip(emb, emb.stat().st_size - 3)
    with pytest.raises(CorruptShard):
        write_merged_shard(
            copy,
            "never2",
            template=template,
            info=info,
            model=MODEL,
            base_id="base",
            drop_ids=np.zeros(0, dtype=np.int64),
            new_ids=np.zeros(0, dtype=np.int64),
            new_rows=lambda a, b: np.zeros((0, DIM), np.float16),
            use_gpu=False,
        )
    assert not (shard_path(copy, "never2") / "shard.json").exists()


def test_the_index_job_writes_auto_shards_for_the_large_kind() -> None:
    # Large shards come from `compact`; a batch of the index job is chosen as `auto` chooses.
    assert choose_params(LARGE_KIND, 1000, DIM) == choose_params("auto", 1000, DIM)
    assert choose_params(LARGE_KIND, 200_000, 512).kind == "hnsw"
    # The per-shard kinds' parameters (shard.json, catalog rows) are as they always were.
    assert "trained_id" not in choose_params("ivfpq", 20_000, 64).to_dict()
    params = IndexParams(kind=LARGE_KIND, nlist=16, pq_m=8, pq_nbits=4, trained_id="t1")
    assert IndexParams.from_dict(params.to_dict()) == params

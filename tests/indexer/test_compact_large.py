"""`compact --kind ivfpq-large`: small shards folded into large ones, trained once, grown without
retraining in one commit each, old files kept for the grace period, tombstones purged."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np
import pytest

from indexer.compact import compact_index
from indexer.compact_large import LargeOptions
from indexer.publish import STAGING_PREFIX, write_shard_record
from retrieval.catalog.database import Catalog
from retrieval.catalog.records import GenerationCommit, ImageRecord
from retrieval.catalog.tables import ACTIVE
from retrieval.errors import ConfigError, TrainedTemplateError
from retrieval.index.kinds import LARGE_KIND
from retrieval.index.shard import INDEX_FILE, Shard, list_shard_dirs, shard_path
from retrieval.index.shard_set import ShardSet
from retrieval.index.trained import (
    TEMPLATE_FILE,
    list_templates,
    load_template,
    template_dir,
    trained_state_bytes,
)
from retrieval.models.identity import ModelIdentity
from tests.retrieval.index.test_shards import brute_force, clustered_unit_vectors

DIM = 32
IDENTITY = ModelIdentity(
    name="tiny",
    pretrained="/tmp/tiny.pt",
    weights_sha256="ab" * 32,
    dim=DIM,
    image_size=64,
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
)
MODEL = IDENTITY.to_dict()
OPTIONS = LargeOptions(shard_size=4000, nlist=16, pq_m=8, pq_nbits=4)


class Index:
    """A catalog and an index dir, filled with synthetic vectors as the index job would."""

    def __init__(self, tmp_path: Path, url: str | None = None) -> None:
        self.index_dir = tmp_path / "index"
        self.catalog = Catalog(url or f"sqlite:///{tmp_path / 'catalog.db'}")
        self.catalog.upgrade()
        self.next_id = 1
        self.vectors: dict[int, np.ndarray] = {}

    def add_shard(self, n: int, seed: int) -> str:
        ids = np.arange(self.next_id, self.next_id + n, dtype=np.int64)
        self.next_id += n
        x = clustered_unit_vectors(n, DIM, clusters=30, spread=0.6, seed=seed)
        x = x.astype(np.float16).astype(np.float32)
        record = write_shard_record(
            self.index_dir, ids, x, kind="flat", model=MODEL, model_key=IDENTITY.key, use_gpu=False
        )
        images = [
            ImageRecord(
                id=int(i),
                path=f"/photos/{i}.jpg",
                sha256=None,
                size=1,
                mtime_ns=1,
                status=ACTIVE,
                width=64,
                height=64,
                format="JPEG",
                shard_id=record.id,
            )
            for i in ids
        ]
        self.catalog.commit(GenerationCommit(model=MODEL, new_shards=[record], upserts=images))
        self.vectors.update(zip(ids.tolist(), x, strict=True))
        return record.id

    def delete(self, ids: list[int]) -> None:
        self.catalog.commit(GenerationCommit(model=MODEL, tombstones=ids))
        for i in ids:
            self.vectors.pop(i)

    def compact(self, options: LargeOptions = OPTIONS, grace: float = 600):
        return compact_index(
            self.catalog,
            self.index_dir,
            kind=LARGE_KIND,
            grace_seconds=grace,
            use_gpu=False,
            progress=False,
            large=options,
        )

    def served(self) -> ShardSet:
        shards = self.catalog.shards()
        return ShardSet.open(self.index_dir, [s.id for s in shards])


@pytest.fixture
def index(tmp_path: Path) -> Iterator[Index]:
    made = Index(tmp_path)
    try:
        yield made
    finally:
        made.catalog.dispose()


@pytest.fixture
def index_any_db(tmp_path: Path, db_url: str) -> Iterator[Index]:
    """As `index`, on SQLite and (where the tests have one) on Postgres."""
    made = Index(tmp_path, db_url)
    try:
        yield made
    finally:
        made.catalog.dispose()


def _state(index_dir: Path, shard_id: str) -> bytes:
    return trained_state_bytes(faiss.read_index(str(shard_path(index_dir, shard_id) / INDEX_FILE)))


def test_fold_trains_once_then_grows_without_retraining(index_any_db: Index) -> None:
    index = index_any_db
    small = [index.add_shard(1200, seed=s) for s in range(3)]
    first = index.compact()
    assert first.large is not None and first.large.trained_now
    assert sorted(first.merged) == sorted(small)
    large = index.catalog.shards()
    assert [s.kind for s in large] == [LARGE_KIND]
    trained_id = large[0].params["trained_id"]
    assert first.large.trained_on == 3600 and first.large.corpus_at_training == 3600
    template_sha = hashlib.sha256(
        (template_dir(index.index_dir, trained_id) / TEMPLATE_FILE).read_bytes()
    ).hexdigest()
    state = _state(index.index_dir, large[0].id)

    # A night: two new small shards and some deletions.
    index.add_shard(300, seed=7)
    index.add_shard(300, seed=8)
    gone = [5, 6, 1500, 3000]
    index.delete(gone)
    second = index.compact()
    assert second.large is not None and not second.large.trained_now
    assert second.large.added_vectors == 600
    assert second.large.carried_vectors == 3600 - len(gone)
    assert second.large.bytes_written > 0 and second.large.bytes_read > 0
    shards = index.catalog.shards()
    # 4196 live vectors: the open shard fills to 4000, the rest starts a new one.
    assert sorted(s.count for s in shards) == [196, 4000]
    assert {s.params["trained_id"] for s in shards} == {trained_id}
    for shard in shards:
        assert _state(index.index_dir, shard.id) == state  # byte-identical: nothing retrained
    after_sha = hashlib.sha256(
        (template_dir(index.index_dir, trained_id) / TEMPLATE_FILE).read_bytes()
    ).hexdigest()
    assert after_sha == template_sha
    # The old large shard is retired, its files kept for the grace period.
    assert large[0].id in list_shard_dirs(index.index_dir)
    assert large[0].id not in {s.id for s in shards}
    # Every live image points at the shard that holds it; the deleted ones are purged.
    for shard in shards:
        held = Shard.open(index.index_dir, shard.id).ids
        assert sorted(m.id for m in index.catalog.shard_members(shard.id)) == held.tolist()
    assert not index.catalog.records(gone)
    assert not list(index.index_dir.glob(STAGING_PREFIX + "*"))

    ids = np.array(sorted(index.vectors), dtype=np.int64)
    x = np.stack([index.vectors[i] for i in ids])
    with index.served() as served:
        queries = x[::50]
        _, found = served.search(queries, 10, nprobe=16, refine_factor=16)
        assert (found[:, 0] == ids[::50]).all()
        assert not np.isin(found, gone).any()
        # Filters stay exact: a small allowed set gives the exact top-k.
        allowed = ids[::13]
        _, found = served.search(queries, 10, allowed_ids=allowed)
        keep = np.isin(ids, allowed)
        np.testing.assert_array_equal(found, brute_force(queries, ids[keep], x[keep], 10)[1])


def test_nothing_to_fold_commits_nothing_and_reports_growth(index: Index) -> None:
    index.add_shard(1000, seed=1)
    index.compact()
    generation = index.catalog.state().generation
    again = index.compact()
    assert again.generation == generation and not again.written
    assert again.large is not None and again.large.growth == 1.0
    assert not again.large.retrain_advised
    # A few deletions alone do not rewrite a large shard (the selector keeps them out)...
    index.delete(list(range(1, 21)))
    generation = index.catalog.state().generation
    assert not index.compact().written
    assert index.catalog.state().generation == generation
    # ...a tenth of it does, and the tombstoned vectors are dropped.
    index.delete(list(range(21, 101)))
    purged = index.compact()
    assert len(purged.written) == 1 and purged.dropped_vectors == 100
    assert [s.count for s in index.catalog.shards()] == [900]


def test_retrain_is_advised_when_the_corpus_outgrows_the_template(index: Index) -> None:
    index.add_shard(700, seed=1)
    index.compact(LargeOptions(shard_size=100_000, nlist=16, pq_m=8, pq_nbits=4))
    for seed in range(2, 6):
        index.add_shard(1800, seed=seed)
    report = index.compact(LargeOptions(shard_size=100_000, nlist=16, pq_m=8, pq_nbits=4))
    assert report.large is not None and report.large.retrain_advised
    assert "retrain" in report.large.advice
    old = index.catalog.shards()[0].params["trained_id"]
    retrained = index.compact(
        LargeOptions(shard_size=100_000, nlist=16, pq_m=8, pq_nbits=4, retrain=True), grace=0
    )
    assert retrained.large is not None and retrained.large.trained_now
    assert retrained.large.corpus_at_training == 700 + 4 * 1800
    assert not retrained.large.retrain_advised
    assert list_templates(index.index_dir) == [index.catalog.shards()[0].params["trained_id"]]
    assert old not in list_templates(index.index_dir)  # no active shard names it any more


def test_other_model_and_too_small_corpus_are_refused(index: Index, tmp_path: Path) -> None:
    index.add_shard(100, seed=1)
    generation = index.catalog.state().generation
    with pytest.raises(ConfigError, match="cannot train"):
        index.compact()
    assert index.catalog.state().generation == generation
    assert list_templates(index.index_dir) == []  # the failed job left no template behind
    index.add_shard(1000, seed=2)
    index.compact()
    trained_id = index.catalog.shards()[0].params["trained_id"]
    with pytest.raises(TrainedTemplateError, match="trained for model"):
        load_template(index.index_dir, trained_id, model_key="another", dim=DIM)
    # A corrupt template stops the next fold before anything is written or committed.
    path = template_dir(index.index_dir, trained_id) / TEMPLATE_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    index.add_shard(100, seed=3)
    generation = index.catalog.state().generation
    shards_before = list_shard_dirs(index.index_dir)
    with pytest.raises(TrainedTemplateError, match="differs from its sha256"):
        index.compact()
    assert index.catalog.state().generation == generation
    assert list_shard_dirs(index.index_dir) == shards_before


def test_cli_compact_and_status_report_the_template(
    index: Index,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.indexer.cli.test_cli import run_cli

    index.add_shard(1000, seed=1)
    monkeypatch.setenv("CLIPSEARCH_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CLIPSEARCH_DATABASE_URL", f"sqlite:///{tmp_path / 'catalog.db'}")
    monkeypatch.setenv("CLIPSEARCH_INDEX_DIR", str(index.index_dir))
    monkeypatch.setenv("CLIPSEARCH_LARGE_NLIST", "16")
    monkeypatch.setenv("CLIPSEARCH_LARGE_PQ_M", "8")
    monkeypatch.setenv("CLIPSEARCH_FAISS_GPU", "off")
    # 1000 vectors cannot train 256 PQ centroids per sub-quantizer: a one-line error, exit 2.
    code, _, err = run_cli(["compact", "--kind", "ivfpq-large"], capsys, monkeypatch)
    assert code == 2 and "cannot train" in err and "Traceback" not in err
    for seed in range(2, 12):
        index.add_shard(1000, seed=seed)
    code, out, _ = run_cli(["compact", "--kind", "ivfpq-large"], capsys, monkeypatch)
    assert code == 0 and "trained now" in out, out
    code, out, _ = run_cli(["status", "--json"], capsys, monkeypatch)
    large = json.loads(out)["large_index"]
    assert code == 0 and large["large_vectors"] == 11_000 and large["growth"] == 1.0
    assert not large["retrain_advised"]
    code, out, _ = run_cli(["status"], capsys, monkeypatch)
    assert "ivfpq-large: 1 shards, 11000 vectors, 1.0x the 11000" in out

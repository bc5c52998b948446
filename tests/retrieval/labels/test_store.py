"""Label sets and stored labels in the catalog, on SQLite always and on Postgres when configured."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import func, select, text

from retrieval.catalog.database import Catalog, make_engine
from retrieval.catalog.migrate import current_revision, head_revision, upgrade_database
from retrieval.catalog.records import GenerationCommit, ImageRecord, ShardRecord
from retrieval.catalog.tables import ACTIVE, ImageLabelRow, LabelledShardRow, utcnow
from retrieval.errors import BadQuery, NotFound
from retrieval.filters import SearchFilters, ids_passing
from retrieval.labels.definitions import LabelSet
from retrieval.labels.scoring import BlockLabels, ClassEmbeddings
from retrieval.labels.store import LabelStore

MODEL = {"name": "m", "key": "k1"}
ANIMAL_NAMES = ["cat", "dog", "bird"]
ANIMALS = {"name": "animals", "labels": ANIMAL_NAMES, "top_k": 2}


def _images(catalog: Catalog, ids: list[int], shard: str = "s1") -> None:
    catalog.commit(
        GenerationCommit(
            model=MODEL,
            new_shards=[
                ShardRecord(id=shard, kind="flat", count=len(ids), dim=4, params={}, model_key="k1")
            ],
            upserts=[
                ImageRecord(
                    id=i,
                    path=f"/p/{shard}/{i}.png",
                    sha256=None,
                    size=1,
                    mtime_ns=1,
                    status=ACTIVE,
                    shard_id=shard,
                )
                for i in ids
            ],
        )
    )


def _block(labels: list[list[int]], scores: list[list[float]]) -> BlockLabels:
    label_arr = np.array(labels, dtype=np.int64)
    score_arr = np.array(scores, dtype=np.float32)
    return BlockLabels(label_arr, score_arr, score_arr / 2, score_arr >= 0.1)


def _write(
    store: LabelStore, version_id: int, shard: str, ids: list[int], block: BlockLabels
) -> None:
    with store.shard_writer(version_id, shard, store_cosine=False) as writer:
        writer.add(np.array(ids, dtype=np.int64), block)


def test_migrations_reach_head_and_keep_cached_label_embeddings(db_url: str) -> None:
    # A catalog at 0002 with a cached class embedding, upgraded to head: the row keeps its
    # vectors and reads back as a softmax model's (no logit bias).
    older = make_engine(db_url)  # the catalog an older clipsearch made
    upgrade_database(older, "0002")
    older.dispose()
    catalog = Catalog(db_url)
    store = LabelStore(catalog)
    stored, _ = store.put(LabelSet.from_dict(ANIMALS))
    vectors = np.eye(3, 4, dtype=np.float32)
    with catalog.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO label_embeddings (version_id, model_key, count, dim, logit_scale, "
                "vectors, created_at) VALUES (:v, 'k1', 3, 4, 50.0, :blob, :now)"
            ),
            {"v": stored.version_id, "blob": vectors.astype("<f4").tobytes(), "now": utcnow()},
        )
    catalog.upgrade()
    assert current_revision(catalog.engine) == head_revision()
    found = LabelStore(catalog).cached_embeddings(stored.version_id, "k1")
    assert found is not None and found.logit_scale == 50.0 and found.logit_bias is None
    np.testing.assert_array_equal(found.vectors, vectors)
    catalog.dispose()


def test_put_versions_only_real_changes(catalog: Catalog) -> None:
    store = LabelStore(catalog)
    first, outcome = store.put(LabelSet.from_dict(ANIMALS))
    assert outcome == "created" and first.version == 1 and first.labelled_version is None
    same, outcome = store.put(LabelSet.from_dict(ANIMALS))
    assert outcome == "unchanged" and same.version_id == first.version_id
    changed, outcome = store.put(LabelSet.from_dict({**ANIMALS, "top_k": 1}))
    assert outcome == "updated" and changed.version == 2
    assert changed.version_id != first.version_id
    assert store.definition(first.version_id).top_k == 2  # old versions stay readable
    assert [s.name for s in store.all()] == ["animals"]
    store.delete("animals")
    assert store.all() == []
    with pytest.raises(NotFound):
        store.get("animals")
    with pytest.raises(NotFound):
        store.delete("animals")


def test_labels_are_served_only_once_published(catalog: Catalog) -> None:
    _images(catalog, [1, 2, 3])
    store = LabelStore(catalog)
    stored, _ = store.put(LabelSet.from_dict(ANIMALS))
    _write(
        store,
        stored.version_id,
        "s1",
        [1, 2, 3],
        _block([[0, 1], [1, 2], [2, 0]], [[0.7, 0.2], [0.6, 0.05], [0.04, 0.03]]),
    )
    assert store.labelled_shards(stored.version_id) == {"s1"}
    assert store.labels_for([1, 2, 3]) == {}  # written, not yet served
    assert store.counts("animals").version is None
    assert store.publish(stored.id, 1) and not store.publish(stored.id, 1)
    served = store.labels_for([1, 2, 3])
    assert [(x.label, round(x.score, 3)) for x in served[1]] == [("cat", 0.7), ("dog", 0.2)]
    assert [x.label for x in served[2]] == ["dog"]  # 0.05 is under the 0.1 kept in the block
    assert 3 not in served  # none of these
    counts = store.counts("animals")
    assert counts.version == 1
    assert counts.counts == {"cat": 1, "dog": 1, "bird": 0} and counts.unlabelled == 1


def test_a_failed_shard_transaction_leaves_nothing(catalog: Catalog) -> None:
    _images(catalog, [1, 2])
    store = LabelStore(catalog)
    stored, _ = store.put(LabelSet.from_dict(ANIMALS))
    with (
        pytest.raises(RuntimeError),
        store.shard_writer(stored.version_id, "s1", store_cosine=False) as writer,
    ):
        writer.add(np.array([1], dtype=np.int64), _block([[0, 1]], [[0.9, 0.1]]))
        raise RuntimeError("killed half-way")
    assert store.labelled_shards(stored.version_id) == set()
    with catalog.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(ImageLabelRow)).scalar() == 0


def test_relabelling_ids_replaces_their_rows(catalog: Catalog) -> None:
    # What a shard written by compaction looks like: ids already labelled under the version.
    _images(catalog, [1, 2])
    store = LabelStore(catalog)
    stored, _ = store.put(LabelSet.from_dict(ANIMALS))
    _write(
        store, stored.version_id, "s1", [1, 2], _block([[0, 1], [1, 0]], [[0.8, 0.15], [0.9, 0.05]])
    )
    _write(
        store, stored.version_id, "s2", [1, 2], _block([[2, 0], [2, 1]], [[0.5, 0.01], [0.6, 0.3]])
    )
    store.publish(stored.id, 1)
    served = store.labels_for([1, 2])
    assert [x.label for x in served[1]] == ["bird"]
    assert [x.label for x in served[2]] == ["bird", "dog"]


def test_label_filters_any_all_min_score_and_unknown_names(catalog: Catalog) -> None:
    _images(catalog, [1, 2, 3, 4])
    store = LabelStore(catalog)
    stored, _ = store.put(LabelSet.from_dict(ANIMALS))
    _write(
        store,
        stored.version_id,
        "s1",
        [1, 2, 3, 4],
        _block(
            [[0, 1], [1, 0], [2, 0], [0, 2]], [[0.6, 0.3], [0.9, 0.1], [0.95, 0.02], [0.5, 0.45]]
        ),
    )

    def ids(**kwargs: object) -> list[int]:
        found = ids_passing(catalog, SearchFilters(**kwargs), store)  # type: ignore[arg-type]
        assert found is not None
        return found.tolist()

    assert ids(labels=("cat",)) == []  # nothing served yet
    store.publish(stored.id, 1)
    assert ids(labels=("cat",)) == [1, 2, 4]
    assert ids(labels=("CAT",), label_min_score=0.55) == [1]
    assert ids(labels=("dog", "bird"), labels_mode="any") == [1, 2, 3, 4]
    assert ids(labels=("cat", "dog"), labels_mode="all") == [1, 2]
    assert ids(labels=("cat", "dog"), labels_mode="all", label_min_score=0.2) == [1]
    assert ids(labels=("cat",), label_set="animals", path_prefix="/p/s1/4") == [4]
    with pytest.raises(BadQuery, match="No label 'fish'"):
        ids(labels=("fish",))
    with pytest.raises(BadQuery, match="No label set named 'plants'"):
        ids(labels=("cat",), label_set="plants")
    # A label added to the set but not labelled yet is known, and matches nothing.
    store.put(LabelSet.from_dict({**ANIMALS, "labels": [*ANIMAL_NAMES, "fish"]}))
    assert ids(labels=("fish",)) == []
    assert ids(labels=("cat",)) == [1, 2, 4]  # version 1 still served


def test_deleted_images_leave_counts_and_purged_ones_lose_their_rows(catalog: Catalog) -> None:
    _images(catalog, [1, 2, 3])
    store = LabelStore(catalog)
    stored, _ = store.put(LabelSet.from_dict(ANIMALS))
    _write(
        store,
        stored.version_id,
        "s1",
        [1, 2, 3],
        _block([[0, 1], [0, 1], [1, 0]], [[0.9, 0.1]] * 3),
    )
    store.publish(stored.id, 1)
    catalog.commit(GenerationCommit(model=MODEL, tombstones=[2]))
    assert store.counts("animals").counts["cat"] == 1
    catalog.commit(GenerationCommit(model=MODEL, purge_ids=[2]))
    with catalog.engine.connect() as conn:
        left = conn.execute(select(ImageLabelRow.image_id).distinct()).scalars().all()
    assert sorted(left) == [1, 3]


def test_stale_versions_are_dropped_and_markers_follow_shards(catalog: Catalog) -> None:
    _images(catalog, [1, 2])
    store = LabelStore(catalog)
    v1, _ = store.put(LabelSet.from_dict(ANIMALS))
    _write(store, v1.version_id, "s1", [1, 2], _block([[0, 1], [1, 0]], [[0.9, 0.1]] * 2))
    store.publish(v1.id, 1)
    v2, _ = store.put(LabelSet.from_dict({**ANIMALS, "top_k": 1}))
    v3, _ = store.put(LabelSet.from_dict({**ANIMALS, "top_k": 3}))
    _write(store, v2.version_id, "s1", [1, 2], _block([[2], [2]], [[0.9], [0.9]]))
    assert store.drop_stale() == 1  # version 2: neither newest (3) nor served (1)
    assert store.labelled_shards(v2.version_id) == set()
    assert store.labelled_shards(v1.version_id) == {"s1"}
    store.carry_labelled_shards(["s1"], ["s9"])
    assert store.labelled_shards(v1.version_id) == {"s1", "s9"}
    assert store.labelled_shards(v3.version_id) == set()  # never labelled s1


def test_forgotten_shards_take_their_markers(catalog: Catalog) -> None:
    _images(catalog, [1], shard="s1")
    store = LabelStore(catalog)
    stored, _ = store.put(LabelSet.from_dict(ANIMALS))
    _write(store, stored.version_id, "s1", [1], _block([[0, 1]], [[0.9, 0.1]]))
    catalog.commit(  # as compaction does: rewrite into s2, retire s1
        GenerationCommit(
            model=MODEL,
            new_shards=[ShardRecord("s2", "flat", 1, 4, {}, "k1")],
            reassign=[(1, "s2")],
            retire_shards=["s1"],
        )
    )
    catalog.forget_shards(["s1"])
    with catalog.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(LabelledShardRow)).scalar() == 0


def test_class_embeddings_are_cached_per_version_and_model(catalog: Catalog) -> None:
    store = LabelStore(catalog)
    stored, _ = store.put(LabelSet.from_dict(ANIMALS))
    vectors = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    store.save_embeddings(stored.version_id, "k1", ClassEmbeddings(vectors, 50.0))
    store.save_embeddings(stored.version_id, "k1", ClassEmbeddings(vectors, 50.0))  # a race
    fresh = LabelStore(catalog)  # another process: reads the catalog, not memory
    found = fresh.cached_embeddings(stored.version_id, "k1")
    assert found is not None and found.logit_scale == 50.0 and found.logit_bias is None
    np.testing.assert_array_equal(found.vectors, vectors)
    assert fresh.cached_embeddings(stored.version_id, "other-model") is None
    sigmoid = ClassEmbeddings(vectors, 10.0, logit_bias=-10.0)
    store.save_embeddings(stored.version_id, "siglip", sigmoid)
    found = LabelStore(catalog).cached_embeddings(stored.version_id, "siglip")
    assert found is not None and (found.logit_scale, found.logit_bias) == (10.0, -10.0)


def test_raw_cosines_are_kept_only_when_asked(catalog: Catalog) -> None:
    _images(catalog, [1, 2])
    store = LabelStore(catalog)
    plain, _ = store.put(LabelSet.from_dict(ANIMALS))
    with_cosine, _ = store.put(LabelSet.from_dict({**ANIMALS, "name": "raw", "store_cosine": True}))
    block = _block([[0, 1], [1, 0]], [[0.8, 0.2], [0.6, 0.4]])  # cosines: the scores / 2
    for stored, keep in ((plain, False), (with_cosine, True)):
        with store.shard_writer(stored.version_id, "s1", store_cosine=keep) as writer:
            writer.add(np.array([1, 2], dtype=np.int64), block)
    with catalog.engine.connect() as conn:
        rows = conn.execute(
            select(ImageLabelRow.version_id, ImageLabelRow.cosine).order_by(
                ImageLabelRow.version_id, ImageLabelRow.image_id, ImageLabelRow.rank
            )
        ).all()
    assert [c for v, c in rows if v == plain.version_id] == [None] * 4
    kept = np.array([c for v, c in rows if v == with_cosine.version_id], dtype=np.float64)
    np.testing.assert_allclose(kept, np.array([0.4, 0.1, 0.3, 0.2]), rtol=1e-6)


def test_chinese_labels_are_stored_served_and_filtered(catalog: Catalog) -> None:
    pets = {"name": "pets-zh", "labels": ["猫", {"name": "狗", "synonyms": ["小狗"]}, "鸟"]}
    _images(catalog, [1, 2, 3])
    store = LabelStore(catalog)
    stored, _ = store.put(LabelSet.from_dict({**pets, "templates": "zh"}))
    assert store.definition(stored.version_id).same_definition(
        LabelSet.from_dict({**pets, "templates": "zh"})
    )
    _write(
        store,
        stored.version_id,
        "s1",
        [1, 2, 3],
        _block([[0, 1], [1, 2], [2, 0]], [[0.7, 0.2], [0.6, 0.05], [0.9, 0.05]]),
    )
    store.publish(stored.id, 1)
    assert [x.label for x in store.labels_for([1])[1]] == ["猫", "狗"]
    assert store.counts("pets-zh").counts == {"猫": 1, "狗": 1, "鸟": 1}
    found = ids_passing(catalog, SearchFilters(labels=("狗",)), store)
    assert found is not None and found.tolist() == [1, 2]

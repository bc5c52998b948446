"""The index job end to end on generated folders: incremental behaviour, bad files, compaction."""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from indexer.compact import compact_index
from indexer.pipeline import IndexJob, IndexReport
from retrieval.catalog.database import Catalog
from retrieval.catalog.tables import ACTIVE, DELETED, ERROR
from retrieval.config import Settings
from retrieval.errors import ConfigError
from retrieval.index.faiss_gpu import gpu_available
from retrieval.index.shard import Shard, list_shard_dirs
from retrieval.models.encoder import Encoder
from retrieval.search import Searcher
from retrieval.training.shapes import draw_shape, generate_shapes
from tests.fixtures.bad_images import write_bad_images, write_good_images
from tests.retrieval.index.test_faiss_gpu import SelectorBlindCopies


class CountingFactory:
    """Hands out the session encoder and counts how often the job asked for it."""

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder
        self.calls = 0

    def __call__(self) -> Encoder:
        self.calls += 1
        return self.encoder


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    generate_shapes(root, 30, seed=3)
    (root / "captions.csv").unlink()
    return root


@pytest.fixture
def run(
    settings: Settings, catalog: Catalog, encoder: Encoder
) -> Callable[..., tuple[IndexReport, CountingFactory]]:
    def go(root: Path, **overrides: object) -> tuple[IndexReport, CountingFactory]:
        factory = CountingFactory(encoder)
        job_settings = settings.model_copy(update=overrides) if overrides else settings
        report = IndexJob(job_settings, catalog, factory, progress=False).run([root])
        return report, factory

    return go


def _searcher(settings: Settings, catalog: Catalog, encoder: Encoder) -> Searcher:
    return Searcher(catalog, settings.resolved_index_dir, encoder)


def _live(catalog: Catalog, root: Path) -> dict[str, int]:
    return {
        path: rec.id
        for path, rec in catalog.records_under([str(root)]).items()
        if rec.status == ACTIVE
    }


def _stored_vector(searcher: Searcher, image_id: int) -> np.ndarray:
    found, vectors = searcher.snapshot().shards.vectors(np.array([image_id]))
    assert found.tolist() == [image_id]
    return vectors[0]


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf", "ivfpq"])
def test_every_image_finds_itself_first(
    kind: str,
    run: Callable[..., tuple[IndexReport, CountingFactory]],
    photos: Path,
    settings: Settings,
    catalog: Catalog,
    encoder: Encoder,
) -> None:
    report, _ = run(photos, index_kind=kind)
    assert report.new == 30 and report.encoded == 30 and not report.failed
    searcher = _searcher(settings, catalog, encoder)
    try:
        for path, image_id in _live(catalog, photos).items():
            result = searcher.search_vector(_stored_vector(searcher, image_id), 1)
            assert result.hits[0].id == image_id, path
            assert result.hits[0].path == path
    finally:
        searcher.close()


def test_no_change_rerun_decodes_nothing(
    run: Callable[..., tuple[IndexReport, CountingFactory]], photos: Path, catalog: Catalog
) -> None:
    first, _ = run(photos)
    second, factory = run(photos)
    assert second.unchanged == 30
    assert second.new == second.changed == second.moved == second.deleted == 0
    assert second.decoded == 0 and second.encoded == 0
    assert factory.calls == 0, "a no-change run must not even load the model"
    assert second.generation == first.generation


def test_added_files_are_indexed_on_rerun(
    run: Callable[..., tuple[IndexReport, CountingFactory]], photos: Path, catalog: Catalog
) -> None:
    run(photos)
    extra = photos / "extra"
    generate_shapes(extra, 5, seed=99)
    (extra / "captions.csv").unlink()
    report, _ = run(photos)
    assert (report.new, report.unchanged, report.encoded) == (5, 30, 5)
    assert len(_live(catalog, photos)) == 35
    assert catalog.max_image_id() == 35


def test_modified_file_gets_a_new_vector(
    run: Callable[..., tuple[IndexReport, CountingFactory]],
    photos: Path,
    settings: Settings,
    catalog: Catalog,
    encoder: Encoder,
) -> None:
    run(photos)
    target = sorted(photos.rglob("*.jpg"))[0]
    old_id = _live(catalog, photos)[str(target)]
    draw_shape("blue", "star", random.Random(5)).save(target, "JPEG")  # new bytes
    os.utime(target, ns=(1, 1))
    report, _ = run(photos)
    assert report.changed == 1 and report.encoded == 1
    new_id = _live(catalog, photos)[str(target)]
    assert new_id != old_id
    assert catalog.record(old_id).status == DELETED
    searcher = _searcher(settings, catalog, encoder)
    try:
        hits = searcher.search_vector(_stored_vector(searcher, new_id), 40).hits
        assert old_id not in [h.id for h in hits]
        assert hits[0].path == str(target)
    finally:
        searcher.close()


def test_touched_file_is_not_reencoded(
    run: Callable[..., tuple[IndexReport, CountingFactory]], photos: Path, catalog: Catalog
) -> None:
    run(photos)
    target = sorted(photos.rglob("*.jpg"))[3]
    os.utime(target, ns=(5_000_000_000, 5_000_000_000))
    report, _ = run(photos)
    assert report.touched == 1 and report.encoded == 0
    assert catalog.records_under([str(photos)])[str(target)].mtime_ns == 5_000_000_000


def test_moved_file_keeps_its_id_and_vector(
    run: Callable[..., tuple[IndexReport, CountingFactory]],
    photos: Path,
    settings: Settings,
    catalog: Catalog,
    encoder: Encoder,
) -> None:
    run(photos)
    source = sorted(photos.rglob("*.jpg"))[2]
    old_id = _live(catalog, photos)[str(source)]
    target = photos / "moved" / "renamed.jpg"
    target.parent.mkdir()
    shutil.move(source, target)
    report, factory = run(photos)
    assert report.moved == 1 and report.encoded == 0 and report.new == 0 and report.deleted == 0
    assert factory.calls == 0
    assert _live(catalog, photos)[str(target)] == old_id
    searcher = _searcher(settings, catalog, encoder)
    try:
        hit = searcher.search_vector(_stored_vector(searcher, old_id), 1).hits[0]
        assert (hit.id, hit.path) == (old_id, str(target))
    finally:
        searcher.close()


def test_copied_file_reuses_the_stored_vector(
    run: Callable[..., tuple[IndexReport, CountingFactory]],
    photos: Path,
    settings: Settings,
    catalog: Catalog,
    encoder: Encoder,
) -> None:
    run(photos)
    source = sorted(photos.rglob("*.jpg"))[4]
    copy = photos / "copy.jpg"
    shutil.copyfile(source, copy)
    report, _ = run(photos)
    assert report.copied == 1 and report.encoded == 0
    live = _live(catalog, photos)
    searcher = _searcher(settings, catalog, encoder)
    try:
        np.testing.assert_array_equal(
            _stored_vector(searcher, live[str(copy)]), _stored_vector(searcher, live[str(source)])
        )
        assert catalog.record(live[str(copy)]).width == catalog.record(live[str(source)]).width
    finally:
        searcher.close()


def test_deleted_file_is_excluded_at_once_and_gone_after_compact(
    run: Callable[..., tuple[IndexReport, CountingFactory]],
    photos: Path,
    settings: Settings,
    catalog: Catalog,
    encoder: Encoder,
) -> None:
    run(photos)
    victim = sorted(photos.rglob("*.jpg"))[5]
    victim_id = _live(catalog, photos)[str(victim)]
    searcher = _searcher(settings, catalog, encoder)
    vector = _stored_vector(searcher, victim_id)
    searcher.close()
    victim.unlink()
    report, _ = run(photos)
    assert report.deleted == 1
    searcher = _searcher(settings, catalog, encoder)
    try:
        ids = [h.id for h in searcher.search_vector(vector, 30).hits]
        assert victim_id not in ids and len(ids) == 29
    finally:
        searcher.close()
    compacted = compact_index(
        catalog, settings.resolved_index_dir, shard_size=settings.shard_size, grace_seconds=0
    )
    assert compacted.dropped_vectors == 1 and compacted.live_vectors == 29
    all_ids = np.concatenate(
        [Shard.open(settings.resolved_index_dir, s.id).ids for s in catalog.shards()]
    )
    assert victim_id not in all_ids.tolist() and len(all_ids) == 29
    assert victim_id not in catalog.records([victim_id])
    # retired shard files are removed once the grace period (0 here) has passed
    assert sorted(list_shard_dirs(settings.resolved_index_dir)) == sorted(
        s.id for s in catalog.shards()
    )


def test_an_id_freed_by_compaction_is_never_handed_out_again(
    run: Callable[..., tuple[IndexReport, CountingFactory]],
    photos: Path,
    settings: Settings,
    catalog: Catalog,
) -> None:
    # /images/{id}/file and thumbnails are cached by id: a reused id would show another
    # picture under a cached URL.
    run(photos)
    live = _live(catalog, photos)
    newest = max(live, key=live.__getitem__)
    highest = live[newest]
    Path(newest).unlink()
    run(photos)
    compact_index(
        catalog, settings.resolved_index_dir, shard_size=settings.shard_size, grace_seconds=0
    )
    assert catalog.max_image_id() == highest - 1  # the purge lowered max(id)
    draw_shape("red", "circle", random.Random(99)).save(photos / "zz-new.jpg", "JPEG")
    report, _ = run(photos)
    assert report.new == 1
    assert _live(catalog, photos)[str(photos / "zz-new.jpg")] == highest + 1


def test_searcher_follows_generations_on_a_device_placement(
    run: Callable[..., tuple[IndexReport, CountingFactory]],
    photos: Path,
    settings: Settings,
    catalog: Catalog,
    encoder: Encoder,
) -> None:
    # The device copies are CPU clones that refuse selectors
    # (see tests/retrieval/index/test_faiss_gpu.py).
    run(photos)
    victim = sorted(photos.rglob("*.jpg"))[7]
    victim_id = _live(catalog, photos)[str(victim)]
    gpu = SelectorBlindCopies()
    searcher = Searcher(catalog, settings.resolved_index_dir, encoder, gpu=gpu)
    try:
        vector = _stored_vector(searcher, victim_id)
        assert searcher.search_vector(vector, 1).hits[0].id == victim_id
        first_shards = gpu.placed
        assert first_shards == [s.id for s in catalog.shards()]
        victim.unlink()
        run(photos)
        searcher.refresh()
        before = gpu.searches
        ids = [h.id for h in searcher.search_vector(vector, 30).hits]
        assert gpu.searches > before  # the tombstone was dropped on the device path
        assert victim_id not in ids and len(ids) == 29
        compact_index(catalog, settings.resolved_index_dir, merge_all=True, grace_seconds=600)
        searcher.refresh()
        assert gpu.placed == [s.id for s in catalog.shards()]
        assert not set(first_shards) & set(gpu.placed)  # the compacted-away copies were released
    finally:
        searcher.close()


def test_faiss_gpu_on_without_a_gpu_refuses_before_any_work(
    settings: Settings, catalog: Catalog, encoder: Encoder, photos: Path
) -> None:
    if gpu_available():
        pytest.skip("this FAISS sees a GPU")
    with pytest.raises(ConfigError) as err:
        IndexJob(settings.model_copy(update={"faiss_gpu": "on"}), catalog, CountingFactory(encoder))
    assert err.value.setting == "CLIPSEARCH_FAISS_GPU"
    assert catalog.state().generation == 0


def test_compact_merges_small_shards_without_reencoding(
    run: Callable[..., tuple[IndexReport, CountingFactory]],
    photos: Path,
    settings: Settings,
    catalog: Catalog,
    encoder: Encoder,
) -> None:
    report, _ = run(photos, shard_size=8)
    assert len(report.shards_written) == 4  # 30 images, about 8 per shard
    searcher = _searcher(settings, catalog, encoder)
    before = {i: _stored_vector(searcher, i) for i in _live(catalog, photos).values()}
    searcher.close()
    compacted = compact_index(
        catalog, settings.resolved_index_dir, shard_size=1000, grace_seconds=0
    )
    assert compacted.shards_before == 4 and compacted.shards_after == 1
    searcher = _searcher(settings, catalog, encoder)
    try:
        for image_id, vector in before.items():
            np.testing.assert_array_equal(_stored_vector(searcher, image_id), vector)
            assert searcher.search_vector(vector, 1).hits[0].id == image_id
    finally:
        searcher.close()


def test_bad_files_are_recorded_and_good_ones_indexed(
    run: Callable[..., tuple[IndexReport, CountingFactory]], tmp_path: Path, catalog: Catalog
) -> None:
    root = tmp_path / "mixed"
    expected = write_bad_images(root / "bad")
    good = write_good_images(root / "good", 6)
    report, _ = run(root)
    reasons = {Path(f.path).name: f.reason for f in report.failed}
    assert reasons == expected
    live = _live(catalog, root)
    assert sorted(live) == sorted(str(p) for p in good)
    errors = {Path(r.path).name: r.error_reason for r in catalog.errors()}
    assert errors == expected
    # unchanged bad files are not retried
    again, _ = run(root)
    assert again.decoded == 0 and again.unchanged == len(expected) + len(good)
    # a bad file that is fixed is picked up and keeps its row id
    broken = root / "bad" / "truncated.jpg"
    old_id = catalog.records_under([str(root)])[str(broken)].id
    broken.write_bytes(good[0].read_bytes())
    os.utime(broken, ns=(7, 7))
    fixed, _ = run(root)
    record = catalog.records_under([str(root)])[str(broken)]
    assert record.status == ACTIVE and record.id == old_id
    assert fixed.failed == []
    assert catalog.counts()[ERROR] == len(expected) - 1


def test_missing_root_is_a_clear_error(
    settings: Settings, catalog: Catalog, encoder: Encoder, tmp_path: Path
) -> None:
    from retrieval.errors import ConfigError

    with pytest.raises(ConfigError, match="not a directory"):
        IndexJob(settings, catalog, CountingFactory(encoder)).run([tmp_path / "nope"])

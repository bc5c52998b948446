"""A lost, reset or mismatched catalog: every writer refuses and deletes nothing, and only
`--rebuild-catalog` starts over, setting the old index aside. SQLite and Postgres alike."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from sqlalchemy import update

from indexer.binding import SET_ASIDE_DIR, claim_index, hand_over
from indexer.cli.app import main
from indexer.compact import compact_index
from indexer.labelling import LabelJob
from indexer.lock import IndexLock
from indexer.pipeline import IndexJob
from retrieval.catalog.copy import copy_catalog
from retrieval.catalog.database import Catalog
from retrieval.catalog.identity import INDEX_FILE, read_index_id
from retrieval.catalog.tables import IndexStateRow
from retrieval.config import Settings
from retrieval.errors import CatalogMismatch
from retrieval.index.shard import list_shard_dirs
from retrieval.labels.definitions import LabelSet
from retrieval.labels.store import LabelStore
from retrieval.models.encoder import Encoder
from retrieval.search import Searcher
from retrieval.training.shapes import generate_shapes
from tests.fixtures.catalogs import drop_catalog, index_dir_files


@pytest.fixture
def small(settings: Settings) -> Settings:
    return settings.model_copy(update={"shard_size": 5})


@pytest.fixture
def pics(tmp_path: Path) -> Path:
    generate_shapes(tmp_path / "pics", 12, seed=8)
    return tmp_path / "pics"


def _index(
    settings: Settings,
    catalog: Catalog,
    encoder: Encoder,
    pics: Path,
    rebuild_catalog: bool = False,
) -> None:
    IndexJob(
        settings, catalog, lambda: encoder, progress=False, rebuild_catalog=rebuild_catalog
    ).run([pics])


def _lost(catalog: Catalog) -> Catalog:
    """The catalog deleted (SQLite) or reset (Postgres), and opened again as the next job would."""
    catalog.dispose()
    drop_catalog(catalog.url)
    fresh = Catalog(catalog.url)
    fresh.upgrade()
    return fresh


def test_a_first_run_records_one_identity_in_catalog_and_index_dir(
    small: Settings, catalog: Catalog, encoder: Encoder, pics: Path
) -> None:
    _index(small, catalog, encoder, pics)
    index_id = read_index_id(small.resolved_index_dir)
    assert index_id and catalog.state().index_id == index_id
    _index(small, catalog, encoder, pics)  # a later run keeps it
    assert catalog.state().index_id == read_index_id(small.resolved_index_dir) == index_id


def test_a_lost_catalog_is_refused_by_every_writer_and_nothing_is_deleted(
    small: Settings, catalog: Catalog, encoder: Encoder, pics: Path
) -> None:
    _index(small, catalog, encoder, pics)
    index_dir = small.resolved_index_dir
    before = index_dir_files(index_dir)
    assert len(list_shard_dirs(index_dir)) == 3
    catalog = _lost(catalog)
    try:
        with pytest.raises(CatalogMismatch) as refused:
            _index(small, catalog, encoder, pics)
        assert refused.value.reason == "catalog_lost"
        assert "--rebuild-catalog" in str(refused.value)
        with pytest.raises(CatalogMismatch):
            compact_index(catalog, index_dir, merge_all=True, grace_seconds=0)
        LabelStore(catalog).put(LabelSet.from_dict({"labels": ["circle", "square"]}, name="shapes"))
        with pytest.raises(CatalogMismatch):
            LabelJob(small, catalog, lambda: encoder, progress=False).run()
        with pytest.raises(CatalogMismatch):
            Searcher(catalog, index_dir, encoder).refresh()
        assert index_dir_files(index_dir) == before  # not one file deleted or changed
        assert not catalog.holds_anything()  # nor any shard or image row written
        assert [job.kind for job in catalog.jobs() if job.kind == "index"] == []
    finally:
        catalog.dispose()


def test_rebuild_catalog_sets_the_old_index_aside_and_indexes_everything_again(
    small: Settings, catalog: Catalog, encoder: Encoder, pics: Path
) -> None:
    _index(small, catalog, encoder, pics)
    index_dir = small.resolved_index_dir
    old_id = read_index_id(index_dir)
    old_files = index_dir_files(index_dir)
    catalog = _lost(catalog)
    try:
        job = IndexJob(small, catalog, lambda: encoder, progress=False, rebuild_catalog=True)
        report = job.run([pics])
        assert report.new == 12 and report.set_aside is not None
        aside = Path(report.set_aside)
        assert aside.parent == index_dir / SET_ASIDE_DIR
        # Every old file is kept, byte for byte, under the set-aside folder.
        assert index_dir_files(aside) == old_files
        assert read_index_id(aside) == old_id
        new_id = read_index_id(index_dir)
        assert new_id and new_id != old_id and catalog.state().index_id == new_id
        assert sorted(list_shard_dirs(index_dir)) == sorted(s.id for s in catalog.shards())
        assert len(Searcher(catalog, index_dir, encoder).search_text("a red circle", 50).hits) == 12
        # The flag on an index its catalog owns changes nothing.
        again = IndexJob(small, catalog, lambda: encoder, progress=False, rebuild_catalog=True)
        assert again.run([pics]).set_aside is None
        assert read_index_id(index_dir) == new_id
    finally:
        catalog.dispose()


def test_another_index_catalog_is_refused_even_with_the_rebuild_flag(
    small: Settings, catalog: Catalog, encoder: Encoder, pics: Path, tmp_path: Path
) -> None:
    _index(small, catalog, encoder, pics)
    other = small.model_copy(update={"index_dir": tmp_path / "other-index"})
    other_catalog = Catalog(f"sqlite:///{tmp_path / 'other.db'}")
    try:
        _index(other, other_catalog, encoder, pics)
        before = index_dir_files(other.resolved_index_dir)
        for rebuild in (False, True):
            with pytest.raises(CatalogMismatch) as refused:
                _index(other, catalog, encoder, pics, rebuild_catalog=rebuild)
            assert refused.value.reason == "other_index"
        assert "only starts over in a catalog that holds no shard" in str(refused.value)
        assert index_dir_files(other.resolved_index_dir) == before
    finally:
        other_catalog.dispose()


def test_an_empty_index_dir_beside_a_full_catalog_is_refused(
    small: Settings, catalog: Catalog, encoder: Encoder, pics: Path, tmp_path: Path
) -> None:
    _index(small, catalog, encoder, pics)
    elsewhere = small.model_copy(update={"index_dir": tmp_path / "empty-index"})
    with pytest.raises(CatalogMismatch) as refused:
        _index(elsewhere, catalog, encoder, pics)
    assert refused.value.reason == "index_dir_lost"
    assert not (tmp_path / "empty-index" / INDEX_FILE).exists()


def test_a_catalog_from_before_identities_is_claimed_with_its_shards(
    small: Settings, catalog: Catalog, encoder: Encoder, pics: Path
) -> None:
    _index(small, catalog, encoder, pics)
    index_dir = small.resolved_index_dir
    (index_dir / INDEX_FILE).unlink()
    with catalog.session() as session:
        session.execute(update(IndexStateRow).values(index_id=None))
    orphan = index_dir / "shards" / "orphan-of-a-killed-job"
    orphan.mkdir()
    _index(small, catalog, encoder, pics)
    assert catalog.state().index_id == read_index_id(index_dir) is not None
    assert sorted(list_shard_dirs(index_dir)) == sorted(s.id for s in catalog.shards())


def test_a_lost_index_json_beside_all_the_catalogs_shards_is_written_again(
    small: Settings, catalog: Catalog, encoder: Encoder, pics: Path
) -> None:
    _index(small, catalog, encoder, pics)
    index_dir = small.resolved_index_dir
    index_id = read_index_id(index_dir)
    (index_dir / INDEX_FILE).unlink()
    assert Searcher(catalog, index_dir, encoder).search_text("a red circle", 3).hits
    _index(small, catalog, encoder, pics)
    assert read_index_id(index_dir) == index_id == catalog.state().index_id


def test_after_a_catalog_copy_only_the_copy_writes_and_both_read(
    small: Settings, catalog: Catalog, encoder: Encoder, pics: Path, tmp_path: Path
) -> None:
    _index(small, catalog, encoder, pics)
    index_dir = small.resolved_index_dir
    copy = Catalog(f"sqlite:///{tmp_path / 'copy.db'}")
    try:
        with IndexLock(index_dir):
            copy_catalog(catalog, copy)
            new_id = hand_over(catalog, copy, index_dir)
        assert new_id and copy.state().index_id == new_id == read_index_id(index_dir)
        more = tmp_path / "more"
        generate_shapes(more, 4, seed=9)
        copied = small.model_copy(update={"database_url": copy.url})
        _index(copied, copy, encoder, more)  # the copy writes on
        before = index_dir_files(index_dir)
        with pytest.raises(CatalogMismatch) as refused:  # the old catalog would delete its shards
            _index(small, catalog, encoder, pics)
        assert refused.value.reason == "read_only_catalog"
        assert "migrate-to" in str(refused.value)
        with pytest.raises(CatalogMismatch):
            compact_index(catalog, index_dir, merge_all=True, grace_seconds=0)
        assert index_dir_files(index_dir) == before
        for reader in (catalog, copy):  # both still search the index
            assert Searcher(reader, index_dir, encoder).search_text("a red circle", 3).hits
    finally:
        copy.dispose()


def test_a_pre_identity_index_dir_beside_an_empty_catalog_is_refused(
    small: Settings, catalog: Catalog, encoder: Encoder, pics: Path
) -> None:
    _index(small, catalog, encoder, pics)
    index_dir = small.resolved_index_dir
    (index_dir / INDEX_FILE).unlink()  # as an index written before identities existed
    before = index_dir_files(index_dir)
    catalog = _lost(catalog)
    try:
        with pytest.raises(CatalogMismatch) as refused:
            claim_index(catalog, index_dir)
        assert refused.value.reason == "catalog_lost"
        assert index_dir_files(index_dir) == before
    finally:
        catalog.dispose()


def test_an_index_dir_with_nothing_but_its_identity_is_adopted(
    small: Settings, catalog: Catalog, encoder: Encoder, pics: Path
) -> None:
    index_dir = small.resolved_index_dir
    index_id = claim_index(catalog, index_dir).index_id
    catalog = _lost(catalog)  # nothing was indexed: there is nothing to lose
    try:
        _index(small, catalog, encoder, pics)
        assert catalog.state().index_id == read_index_id(index_dir) == index_id
    finally:
        catalog.dispose()


def test_an_unreadable_index_json_is_refused_with_its_path(
    small: Settings, catalog: Catalog, encoder: Encoder, pics: Path
) -> None:
    _index(small, catalog, encoder, pics)
    (small.resolved_index_dir / INDEX_FILE).write_text("{not json")
    with pytest.raises(CatalogMismatch) as refused:
        _index(small, catalog, encoder, pics)
    assert refused.value.reason == "unreadable_identity"
    assert INDEX_FILE in str(refused.value)


def _cli(args: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(sys, "argv", ["clipsearch", *args])
    try:
        main()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_the_cli_exits_8_with_the_way_out_and_rebuilds_only_when_asked(
    small: Settings,
    catalog: Catalog,
    encoder: Encoder,
    pics: Path,
    db_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if not db_url.startswith("sqlite"):
        pytest.skip("exit codes do not depend on the database; the job tests run on both")
    _index(small, catalog, encoder, pics)
    before = index_dir_files(small.resolved_index_dir)
    catalog.dispose()
    drop_catalog(catalog.url)
    for name, value in {
        "CLIPSEARCH_DATA_DIR": str(small.data_dir),
        "CLIPSEARCH_DATABASE_URL": small.resolved_database_url,
        "CLIPSEARCH_MODEL": small.model,
        "CLIPSEARCH_PRETRAINED": small.pretrained,
        "CLIPSEARCH_DEVICE": "cpu",
        "CLIPSEARCH_WORKERS": "0",
    }.items():
        monkeypatch.setenv(name, value)
    capsys.readouterr()
    for extra in ([], ["--since-last-run"]):
        assert _cli(["index", str(pics), "--no-progress", *extra], monkeypatch) == 8
        err = capsys.readouterr().err
        assert "holds no index" in err and "--rebuild-catalog" in err
        assert "Traceback" not in err
    assert _cli(["status"], monkeypatch) == 8  # not an empty index: a lost catalog
    assert "holds no index" in capsys.readouterr().err
    assert index_dir_files(small.resolved_index_dir) == before
    assert (
        _cli(["index", str(pics), "--no-progress", "--rebuild-catalog", "--json"], monkeypatch) == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["new"] == 12 and report["set_aside"].startswith(str(small.resolved_index_dir))

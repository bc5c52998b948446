"""copy_catalog: every table and id, foreign-key order, sequences, refusals, verification."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import MetaData, insert, select, text

from retrieval.catalog.copy import copy_catalog
from retrieval.catalog.database import Catalog
from retrieval.catalog.migrate import current_revision
from retrieval.catalog.records import GenerationCommit, ImageRecord, ShardRecord
from retrieval.catalog.tables import ACTIVE, ImageRow
from retrieval.errors import CatalogCopyError, CatalogNotEmpty
from tests.conftest import BOTH_DATABASES, fresh_database
from tests.fixtures.catalogs import downgrade_catalog

MODEL = {"name": "fake", "key": "fake"}


@pytest.fixture
def source(tmp_path: Path) -> Iterator[Catalog]:
    catalog = Catalog(f"sqlite:///{tmp_path / 'source.db'}")
    catalog.upgrade()
    yield catalog
    catalog.dispose()


@pytest.fixture(params=BOTH_DATABASES)
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Catalog]:
    directory = tmp_path / "target"
    directory.mkdir()
    for url in fresh_database(request.param, directory):
        catalog = Catalog(url)
        yield catalog
        catalog.dispose()


def _image(image_id: int, shard: str) -> ImageRecord:
    return ImageRecord(
        id=image_id,
        path=f"/pics/{image_id:04d}.jpg",
        sha256=f"{image_id:064x}",
        size=1000 + image_id,
        mtime_ns=1_700_000_000_000_000_000 + image_id,
        status=ACTIVE,
        width=64,
        height=48,
        format="JPEG",
        shard_id=shard,
    )


def populate(catalog: Catalog, images: int = 30) -> None:
    """Two shards, tombstones, a move, and a few jobs, through the catalog's own commit."""
    half = images // 2
    for number, ids in enumerate((range(1, half + 1), range(half + 1, images + 1))):
        shard = f"shard-{number}"
        commit = GenerationCommit(model=MODEL)
        commit.new_shards.append(ShardRecord(shard, "flat", len(ids), 8, {"k": number}, "fake"))
        commit.upserts = [_image(i, shard) for i in ids]
        catalog.commit(commit)
    catalog.commit(
        GenerationCommit(
            model=MODEL, tombstones=[2, 3], moves=[(5, "/pics/moved.jpg", 1005, 1_700_000_000)]
        )
    )
    for status in ("succeeded", "failed", "succeeded"):
        job = catalog.start_job("index", ["/pics"])
        catalog.finish_job(job, status, {"new": 1}, 3, "boom" if status == "failed" else None)


def _utc(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)
    return value


def dump(catalog: Catalog) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table (timestamps as UTC instants), in primary-key order."""
    metadata = MetaData()
    with catalog.engine.connect() as conn:
        metadata.reflect(bind=conn)
        return {
            name: [
                tuple(_utc(v) for v in row)
                for row in conn.execute(
                    select(table).order_by(
                        *(list(table.primary_key.columns) or list(table.columns))
                    )
                )
            ]
            for name, table in metadata.tables.items()
            if name != "alembic_version"
        }


def test_copy_keeps_every_row_and_id(source: Catalog, target: Catalog) -> None:
    populate(source)
    before = dump(source)
    report = copy_catalog(source, target, batch_size=7)  # several batches per table
    assert dump(target) == before
    assert dump(source) == before  # the source is left as it was
    tables = report.to_dict()["tables"]
    assert tables["images"] == 30 and tables["shards"] == 2 and tables["index_jobs"] == 3
    assert tables["index_state"] == 1
    assert report.rows == sum(len(rows) for rows in before.values())
    assert target.state() == source.state()
    assert [r.status for r in target.records([2, 3, 5]).values()] == ["deleted"] * 2 + ["active"]
    assert (target.tombstoned_ids() == source.tombstoned_ids()).all()


def test_postgres_sequences_continue_after_the_copied_ids(source: Catalog, target: Catalog) -> None:
    populate(source)
    report = copy_catalog(source, target)
    if target.engine.dialect.name == "postgresql":
        assert "index_jobs.id" in report.sequences_reset
    assert target.start_job("index", ["/pics"]) == 4  # not 1: that id was copied


def test_a_non_empty_target_is_refused_unless_forced(source: Catalog, target: Catalog) -> None:
    populate(source)
    copy_catalog(source, target)
    target.commit(GenerationCommit(model=MODEL, tombstones=[7]))  # the target moves on
    changed = dump(target)
    with pytest.raises(CatalogNotEmpty) as refused:
        copy_catalog(source, target)
    assert refused.value.rows["images"] == 30 and "--force" in str(refused.value)
    assert dump(target) == changed  # untouched
    report = copy_catalog(source, target, force=True)
    assert report.replaced_rows == sum(len(rows) for rows in changed.values())
    assert dump(target) == dump(source)


def _create_notes(catalog: Catalog) -> None:
    """A table no migration knows, pointing at images: like a later migration's table."""
    serial = "SERIAL" if catalog.engine.dialect.name == "postgresql" else "INTEGER"
    with catalog.engine.begin() as conn:
        conn.execute(
            text(
                f"CREATE TABLE image_notes (id {serial} PRIMARY KEY, "
                "image_id BIGINT NOT NULL REFERENCES images(id), note TEXT)"
            )
        )


def test_tables_are_found_not_listed_and_copied_parents_first(
    source: Catalog, target: Catalog
) -> None:
    populate(source)
    _create_notes(source)
    target.upgrade()
    _create_notes(target)
    with source.engine.begin() as conn:
        conn.execute(text("INSERT INTO image_notes (id, image_id, note) VALUES (1, 30, 'x')"))
        conn.execute(text("INSERT INTO image_notes (id, image_id, note) VALUES (9, 4, 'y')"))
    report = copy_catalog(source, target)
    names = [table.name for table in report.tables]
    # Alphabetically image_notes < images < shards: Postgres enforces the foreign keys at
    # once, so only parents-first order copies at all.
    assert names.index("shards") < names.index("images") < names.index("image_notes")
    assert dump(target)["image_notes"] == [(1, 30, "x"), (9, 4, "y")]
    with target.engine.begin() as conn:
        conn.execute(text("INSERT INTO image_notes (image_id, note) VALUES (1, 'z')"))
        new_id = conn.execute(text("SELECT max(id) FROM image_notes")).scalar()
    assert new_id == 10


def test_a_table_only_in_the_source_is_refused(source: Catalog, target: Catalog) -> None:
    populate(source)
    _create_notes(source)
    with pytest.raises(CatalogCopyError, match="image_notes"):
        copy_catalog(source, target)
    assert not any(dump(target).values())


def test_a_write_during_the_copy_fails_verification_and_commits_nothing(
    source: Catalog, target: Catalog
) -> None:
    populate(source)
    written: list[str] = []

    def write_to_source(table: str, rows: int, total: int) -> None:
        if not written:  # the first batch: images are copied later
            with source.engine.begin() as conn:
                conn.execute(insert(ImageRow), [_image(99, "shard-0").to_row()])
            written.append(table)

    with pytest.raises(CatalogCopyError, match="images: 31 rows in the target"):
        copy_catalog(source, target, on_progress=write_to_source)
    assert not any(dump(target).values())


def test_the_same_database_is_refused(source: Catalog) -> None:
    with pytest.raises(CatalogCopyError, match="same database"):
        copy_catalog(source, Catalog(source.url))


def test_a_source_at_an_older_revision_is_refused_and_left_unmigrated(
    source: Catalog, target: Catalog
) -> None:
    downgrade_catalog(source.url, "0006")
    with pytest.raises(CatalogCopyError, match="revision 0006, not .* `clipsearch db upgrade`"):
        copy_catalog(source, target)
    assert current_revision(source.engine) == "0006"  # read, never migrated

"""Catalog and migrations, on SQLite always and on Postgres when configured."""

from __future__ import annotations

import numpy as np
import pytest
from alembic import command
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from retrieval.catalog.database import Catalog
from retrieval.catalog.migrate import (
    alembic_config,
    current_revision,
    head_revision,
    migrations_dir,
)
from retrieval.catalog.records import GenerationCommit, ImageRecord, ShardRecord
from retrieval.catalog.tables import ACTIVE, DELETED, ERROR
from retrieval.errors import NotFound

MODEL = {"name": "m", "key": "k1"}


def _rec(image_id: int, path: str, shard: str | None = "s1", status: str = ACTIVE) -> ImageRecord:
    return ImageRecord(
        id=image_id,
        path=path,
        sha256=f"{image_id:064x}",
        size=10,
        mtime_ns=1,
        status=status,
        width=4,
        height=3,
        format="PNG",
        shard_id=shard,
    )


def _shard(shard_id: str = "s1", count: int = 2) -> ShardRecord:
    return ShardRecord(id=shard_id, kind="flat", count=count, dim=4, params={}, model_key="k1")


def test_upgrade_creates_tables_and_is_idempotent(catalog: Catalog) -> None:
    catalog.upgrade()
    tables = set(inspect(catalog.engine).get_table_names())
    assert {"images", "shards", "index_jobs", "index_state", "alembic_version"} <= tables
    assert current_revision(catalog.engine) == head_revision()


def test_head_revision_is_the_newest_migration_file() -> None:
    numbered = sorted(
        path.name.split("_")[0] for path in (migrations_dir() / "versions").glob("[0-9]*_*.py")
    )
    assert head_revision() == numbered[-1]


def test_the_next_id_migration_starts_past_the_highest_id(db_url: str) -> None:
    # A catalog written before the counter existed: committed at head, then taken back to
    # 0005 (which drops the column), then upgraded again.
    catalog = Catalog(db_url)
    try:
        catalog.upgrade()
        catalog.commit(
            GenerationCommit(
                model=MODEL, new_shards=[_shard()], upserts=[_rec(7, "/a"), _rec(41, "/b")]
            )
        )
        with catalog.engine.connect() as connection:
            command.downgrade(alembic_config(connection), "0005")
            connection.commit()
        assert "next_image_id" not in {
            c["name"] for c in inspect(catalog.engine).get_columns("index_state")
        }
        catalog.upgrade()
        assert catalog.next_image_id() == 42
        catalog.commit(GenerationCommit(model=MODEL, purge_ids=[41]))
        assert catalog.max_image_id() == 7 and catalog.next_image_id() == 42
    finally:
        catalog.dispose()


def test_sqlite_uses_wal_and_busy_timeout(catalog: Catalog) -> None:
    if catalog.engine.dialect.name != "sqlite":
        pytest.skip("SQLite pragmas")
    with catalog.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 30000


def test_commit_bumps_generation_and_stores_rows(catalog: Catalog) -> None:
    assert catalog.state().generation == 0
    gen = catalog.commit(
        GenerationCommit(
            model=MODEL,
            new_shards=[_shard()],
            upserts=[_rec(1, "/r/a.png"), _rec(2, "/r/b.png")],
        )
    )
    assert gen == 1
    assert catalog.state().model == MODEL
    assert [s.id for s in catalog.shards()] == ["s1"]
    assert catalog.record(2).path == "/r/b.png"
    assert catalog.max_image_id() == 2
    assert set(catalog.records_under(["/r"])) == {"/r/a.png", "/r/b.png"}
    assert catalog.records_under(["/other"]) == {}


def test_tombstone_then_same_path_again(catalog: Catalog) -> None:
    catalog.commit(
        GenerationCommit(model=MODEL, new_shards=[_shard()], upserts=[_rec(1, "/r/a.png")])
    )
    # A changed file: the old row is tombstoned and a new row takes the path, in one commit.
    catalog.commit(
        GenerationCommit(
            model=MODEL,
            new_shards=[_shard("s2", 1)],
            tombstones=[1],
            upserts=[_rec(2, "/r/a.png", shard="s2")],
        )
    )
    assert catalog.record(1).status == DELETED
    assert catalog.records_under(["/r"])["/r/a.png"].id == 2
    np.testing.assert_array_equal(catalog.tombstoned_ids(), [1])
    assert {k: v.tolist() for k, v in catalog.tombstones_by_shard().items()} == {"s1": [1]}


def test_two_live_rows_for_one_path_are_refused(catalog: Catalog) -> None:
    catalog.commit(
        GenerationCommit(model=MODEL, new_shards=[_shard()], upserts=[_rec(1, "/r/a.png")])
    )
    with pytest.raises(IntegrityError):
        catalog.commit(
            GenerationCommit(model=MODEL, upserts=[_rec(2, "/r/a.png", shard=None, status=ERROR)])
        )
    # the failed transaction changed nothing
    assert catalog.state().generation == 1
    assert catalog.max_image_id() == 1


def test_like_prefix_escapes_wildcards(catalog: Catalog) -> None:
    catalog.commit(
        GenerationCommit(
            model=MODEL,
            new_shards=[_shard()],
            upserts=[_rec(1, "/r_1/a.png"), _rec(2, "/rx1/b.png")],
        )
    )
    assert set(catalog.records_under(["/r_1"])) == {"/r_1/a.png"}


def test_moves_touches_and_reassign(catalog: Catalog) -> None:
    catalog.commit(
        GenerationCommit(model=MODEL, new_shards=[_shard()], upserts=[_rec(1, "/r/a.png")])
    )
    catalog.commit(GenerationCommit(model=MODEL, moves=[(1, "/r/z.png", 11, 5)]))
    moved = catalog.record(1)
    assert (moved.path, moved.size, moved.mtime_ns) == ("/r/z.png", 11, 5)
    catalog.commit(
        GenerationCommit(
            model=MODEL,
            new_shards=[_shard("s2")],
            reassign=[(1, "s2")],
            retire_shards=["s1"],
        )
    )
    assert catalog.record(1).shard_id == "s2"
    assert [s.id for s in catalog.shards()] == ["s2"]
    assert [s.id for s in catalog.shards(status="retired")] == ["s1"]


def test_record_not_found(catalog: Catalog) -> None:
    with pytest.raises(NotFound):
        catalog.record(99)


def test_jobs_left_running_are_marked_killed(catalog: Catalog) -> None:
    first = catalog.start_job("index", ["/r"])
    second = catalog.start_job("index", ["/r"])
    statuses = {job.id: job.status for job in catalog.jobs()}
    assert statuses[first] == "killed"
    assert statuses[second] == "running"
    catalog.finish_job(second, "succeeded", {"new": 1}, 3)
    assert catalog.jobs()[0].stats == {"new": 1}


def test_records_by_sha_only_rows_with_vectors(catalog: Catalog) -> None:
    catalog.commit(
        GenerationCommit(
            model=MODEL,
            new_shards=[_shard()],
            upserts=[_rec(1, "/r/a.png"), _rec(2, "/r/b.png", shard=None, status=ERROR)],
        )
    )
    found = catalog.records_by_sha([f"{1:064x}", f"{2:064x}"])
    assert list(found) == [f"{1:064x}"]


def test_recorded_model_reads_the_model_alone_and_creates_nothing(db_url: str) -> None:
    bare = Catalog(db_url)
    try:
        assert bare.recorded_model() is None  # no tables at all: nothing recorded
        if bare.file_watch is not None:
            assert not bare.file_watch.path.exists()  # not even an empty file
        else:
            assert "index_state" not in inspect(bare.engine).get_table_names()
        bare.upgrade()
        assert bare.recorded_model() is None  # nothing indexed yet
        bare.commit(GenerationCommit(model=MODEL, new_shards=[_shard()], upserts=[_rec(1, "/a")]))
        assert bare.recorded_model() == MODEL
    finally:
        bare.dispose()

"""Migration 0007: the photo columns (capture time, camera, position), on both databases."""

from __future__ import annotations

import datetime as dt

from alembic import command
from sqlalchemy import inspect

from retrieval.catalog.database import Catalog
from retrieval.catalog.migrate import alembic_config, current_revision
from retrieval.catalog.records import GenerationCommit, ImageRecord, PhotoFields, ShardRecord
from retrieval.catalog.tables import ACTIVE

MODEL = {"name": "m", "key": "k1"}
PHOTO_COLUMNS = {
    "taken_at",
    "taken_at_source",
    "camera_make",
    "camera_model",
    "latitude",
    "longitude",
}
TAKEN = dt.datetime(2023, 7, 14, 16, 30, 5, tzinfo=dt.UTC)


def _record(image_id: int, photo: PhotoFields) -> ImageRecord:
    return ImageRecord(
        id=image_id,
        path=f"/r/{image_id}.heic",
        sha256=f"{image_id:064x}",
        size=10,
        mtime_ns=1,
        status=ACTIVE,
        shard_id="s1",
        photo=photo,
    )


def _columns(catalog: Catalog) -> set[str]:
    return {column["name"] for column in inspect(catalog.engine).get_columns("images")}


def test_rows_indexed_before_0007_get_null_photo_columns(db_url: str) -> None:
    # A catalog written before the columns existed: committed at head, taken back to 0006
    # (which drops them), then upgraded again, as a user's `clipsearch index` would.
    catalog = Catalog(db_url)
    try:
        catalog.upgrade()
        photo = PhotoFields(TAKEN, "exif", "Apple", "iPhone 15 Pro", 48.8581944, 2.2945)
        shard = ShardRecord(id="s1", kind="flat", count=1, dim=4, params={}, model_key="k1")
        catalog.commit(
            GenerationCommit(model=MODEL, new_shards=[shard], upserts=[_record(1, photo)])
        )
        assert catalog.record(1).photo == photo
        with catalog.engine.connect() as connection:
            command.downgrade(alembic_config(connection), "0006")
            connection.commit()
        assert current_revision(catalog.engine) == "0006"
        assert not _columns(catalog) & PHOTO_COLUMNS
        assert "ix_images_taken_at" not in {
            index["name"] for index in inspect(catalog.engine).get_indexes("images")
        }
        catalog.upgrade()
        assert current_revision(catalog.engine) == "0007"
        assert PHOTO_COLUMNS <= _columns(catalog)
        assert "ix_images_taken_at" in {
            index["name"] for index in inspect(catalog.engine).get_indexes("images")
        }
        # The row is kept, with nothing read yet: the next index run fills it in.
        record = catalog.record(1)
        assert (record.path, record.status, record.photo) == ("/r/1.heic", ACTIVE, PhotoFields())
    finally:
        catalog.dispose()

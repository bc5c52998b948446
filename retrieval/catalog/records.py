"""Catalog rows as plain data, and the description of one commit (`GenerationCommit`)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from retrieval.catalog.tables import utcnow


@dataclass(frozen=True)
class PhotoFields:
    """A row's photo columns: capture time (and whether EXIF or the file's mtime gave it), camera
    and position. All None: not read yet (a row indexed before they were kept) or a failed file.
    """

    taken_at: dt.datetime | None = None
    taken_at_source: str | None = None  # "exif" or "file"
    camera_make: str | None = None
    camera_model: str | None = None
    latitude: float | None = None
    longitude: float | None = None

    def to_row(self) -> dict[str, Any]:
        return {
            "taken_at": self.taken_at,
            "taken_at_source": self.taken_at_source,
            "camera_make": self.camera_make,
            "camera_model": self.camera_model,
            "latitude": self.latitude,
            "longitude": self.longitude,
        }


@dataclass(frozen=True)
class ImageRecord:
    """One catalog row as plain data."""

    id: int
    path: str
    sha256: str | None
    size: int
    mtime_ns: int
    status: str
    width: int | None = None
    height: int | None = None
    format: str | None = None
    error_reason: str | None = None
    error_detail: str | None = None
    shard_id: str | None = None
    indexed_at: dt.datetime | None = None
    photo: PhotoFields = PhotoFields()

    def to_row(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "path": self.path,
            "sha256": self.sha256,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "status": self.status,
            "width": self.width,
            "height": self.height,
            "format": self.format,
            "error_reason": self.error_reason,
            "error_detail": self.error_detail,
            "shard_id": self.shard_id,
            "indexed_at": self.indexed_at or utcnow(),
            **self.photo.to_row(),
        }


@dataclass(frozen=True)
class ShardRecord:
    id: str
    kind: str
    count: int
    dim: int
    params: dict[str, Any]
    model_key: str
    bytes: int = 0
    manifest_sha256: str | None = None


@dataclass(frozen=True)
class IndexState:
    generation: int
    model: dict[str, Any] | None
    index_id: str | None = None  # the index dir this catalog belongs to (index.json)


@dataclass
class GenerationCommit:
    """Everything one commit changes; applied in one transaction by Catalog.commit.

    Order inside the transaction matters for the live-path unique index: tombstones
    first, then moves, then new rows.
    """

    model: dict[str, Any]
    new_shards: list[ShardRecord] = field(default_factory=list)
    tombstones: list[int] = field(default_factory=list)
    moves: list[tuple[int, str, int, int]] = field(default_factory=list)  # id, path, size, mtime
    touches: list[tuple[int, int, int]] = field(default_factory=list)  # id, size, mtime_ns
    upserts: list[ImageRecord] = field(default_factory=list)
    reassign: list[tuple[int, str]] = field(default_factory=list)  # id -> shard (compaction)
    # Every image of one shard -> another, one UPDATE each (a large shard rewritten whole).
    move_shard_images: list[tuple[str, str]] = field(default_factory=list)
    retire_shards: list[str] = field(default_factory=list)
    purge_ids: list[int] = field(default_factory=list)
    # Images whose labels no longer match their vector (re-encoded, or lost by a repair).
    drop_labels: list[int] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not (
            self.new_shards
            or self.tombstones
            or self.moves
            or self.touches
            or self.upserts
            or self.reassign
            or self.move_shard_images
            or self.retire_shards
            or self.purge_ids
            or self.drop_labels
        )
